"""Config loading: YAML + base chains, dotted overrides, validation errors naming the closest key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segadapt.config import PACKAGED_CONFIGS, deep_merge, load_config, parse_override, resolved_yaml, save_config
from segadapt.data.transforms import build_transforms
from segadapt.errors import ConfigError


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_parsed_as_yaml_values() -> None:
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 0.001)
    assert parse_override("eval.flip=true") == ("eval.flip", True)
    assert parse_override("eval.scales=[0.5, 1.0]") == ("eval.scales", [0.5, 1.0])
    assert parse_override("name=my run") == ("name", "my run")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")


def test_amp_off_survives_yaml_reading_off_as_false(tmp_path: Path) -> None:
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    (tmp_path / "run.yaml").write_text("train: {amp: off}\n")
    assert load_config(tmp_path / "run.yaml").train.amp == "off"
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=true"])


def test_base_chain_merges_nested_sections_and_file_wins(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", {"optim": {"lr": 0.1, "momentum": 0.5}, "train": {"iters": 7}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "optim": {"lr": 0.2}})
    cfg = load_config(child, ["train.iters=9"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.iters) == (0.2, 0.5, 9)


def test_unknown_key_in_file_names_closest_valid_key(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", {"optim": {"lrate": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate'; did you mean 'optim.lr'\?") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_override_is_rejected_before_creating_a_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config(None, ["trian.iters=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'data.batch_size'"):
        load_config(None, ["data.batchsize=3"])


def test_free_form_options_accept_any_key() -> None:
    cfg = load_config(None, ["model.options.width=16"])
    assert cfg.model.options == {"width": 16}


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'train.iters'.*integer"):
        load_config(None, ["train.iters=many"])
    with pytest.raises(ConfigError, match=r"'optim.lr'.*greater than 0"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"unknown protocol"):
        load_config(None, ["eval.protocols=[19, 17]"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=0.05", "data.source.dataset=folder", "data.source.root=/data/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert "head_lr_mult: 10.0" in resolved_yaml(cfg)  # defaults are written out


def test_deep_merge_replaces_lists() -> None:
    assert deep_merge({"a": {"b": [1, 2], "c": 1}}, {"a": {"b": [3]}}) == {"a": {"b": [3], "c": 1}}


def test_every_shipped_config_validates_and_round_trips(tmp_path: Path) -> None:
    from segadapt.engine.recipes import check_recipe_config
    from segadapt.models import MODELS

    configs = sorted(PACKAGED_CONFIGS.rglob("*.yaml"))
    assert len(configs) > 20  # the settings' folders are found
    for path in configs:
        if path.name.startswith("_"):
            continue  # partial bases are validated through the files that use them
        cfg = load_config(path)
        check_recipe_config(cfg)  # a known recipe, and its method section matches the recipe's options
        assert cfg.model.name in MODELS, path
        save_config(cfg, tmp_path / "resolved.yaml")  # what a run directory stores reproduces the config
        assert load_config(tmp_path / "resolved.yaml") == cfg, path
        for transforms in (cfg.data.train_transforms, cfg.data.val_transforms):
            if transforms:
                build_transforms(transforms)  # a misspelt transform or key in a shipped config fails here
