"""Config loading: YAML + base chains, dotted overrides, validation errors naming the closest key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segadapt.config import PACKAGED_CONFIGS, deep_merge, load_config, parse_override, resolved_yaml, save_config, with_absolute_paths
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
        cfg = with_absolute_paths(cfg)  # as a run stores it: its data/... paths are the working directory's
        save_config(cfg, tmp_path / "resolved.yaml")  # what a run directory stores reproduces the config
        assert load_config(tmp_path / "resolved.yaml") == cfg, path
        for transforms in (cfg.data.train_transforms, cfg.data.val_transforms):
            if transforms:
                build_transforms(transforms)  # a misspelt transform or key in a shipped config fails here


# ---------------------------------------------------------------- the time-constant rule (issue 16, finding 1)

from segadapt.config import scaled_iterations, scaled_momentum, teacher_momentum  # noqa: E402


def test_scaled_momentum_keeps_the_half_life_as_the_same_fraction_of_the_run() -> None:
    import math

    for paper, paper_iters, iters in [(0.999, 90000, 300), (0.99, 250000, 400), (0.999, 40000, 400), (0.9, 100, 1000)]:
        scaled = scaled_momentum(paper, paper_iters, iters)
        half_life_fraction = math.log(0.5) / math.log(paper) / paper_iters
        assert math.log(0.5) / math.log(scaled) / iters == pytest.approx(half_life_fraction, rel=1e-9)
        # what is left of an old contribution after the same fraction of either run is the same
        assert scaled ** (iters / 10) == pytest.approx(paper ** (paper_iters / 10), rel=1e-9)
    assert scaled_momentum(0.999, 90000, 300) == pytest.approx(0.7407, abs=1e-4)
    assert scaled_iterations(1500, 40000, 400) == 15 and scaled_iterations(30000, 40000, 400) == 300
    assert scaled_iterations(1, 40000, 400) == 1 and scaled_iterations(0, 40000, 400) == 0
    with pytest.raises(ValueError, match="momentum"):
        scaled_momentum(1.0, 100, 10)


def test_teacher_momentum_keeps_the_papers_window_while_the_run_holds_ten_of_them() -> None:
    # the paper's own run, or any run at least ten windows long, keeps the paper's momentum exactly
    assert teacher_momentum(0.99, 250000) == 0.99 and teacher_momentum(0.999, 40000) == 0.999
    assert teacher_momentum(0.999, 10000) == 0.999
    for paper, iters in [(0.999, 300), (0.99, 400), (0.999, 400), (0.9999, 5000)]:
        momentum = teacher_momentum(paper, iters)
        assert 1 / (1 - momentum) == pytest.approx(iters / 10)  # the window: a tenth of the run
        assert momentum**iters < 5e-5  # the start is forgotten by the end (about exp(-10))
        assert momentum < paper
    assert teacher_momentum(0.999, 300) == pytest.approx(0.9667, abs=1e-4)
    assert teacher_momentum(0.999, 5) == 0.0  # a run under ten steps: the teacher is the student
    with pytest.raises(ValueError, match="momentum"):
        teacher_momentum(1.0, 100)


def test_the_teacher_momentum_tag_resolves_against_train_iters_and_names_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("recipe: dacs\ntrain: {iters: 400}\nmethod: {ema_momentum: !teacher_momentum {paper: 0.99}}\n")
    assert load_config(path).method["ema_momentum"] == pytest.approx(0.975)
    assert load_config(path, ["train.iters=4000"]).method["ema_momentum"] == 0.99
    for text, message in [
        ("!teacher_momentum 0.99", "takes a mapping"),
        ("!teacher_momentum {paper: 0.99, paper_iters: 100}", "exactly the key paper"),
        ("!teacher_momentum {paper: 1.0}", "'method.ema_momentum': !teacher_momentum"),
    ]:
        path.write_text(f"recipe: dacs\nmethod: {{ema_momentum: {text}}}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_time_constant_tags_resolve_against_the_runs_train_iters(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "recipe: cpsl\ntrain: {iters: 300}\n"
        "method: {ema_momentum: !scaled_momentum {paper: 0.999, paper_iters: 90000}}\n"
        "schedule: {warmup_iters: !scaled_iterations {paper: 1500, paper_iters: 40000}}\n"
    )
    cfg = load_config(path)
    assert cfg.method["ema_momentum"] == pytest.approx(0.999**300) and cfg.schedule.warmup_iters == 11
    longer = load_config(path, ["train.iters=900"])  # a longer run rescales them
    assert longer.method["ema_momentum"] == pytest.approx(0.999**100) and longer.schedule.warmup_iters == 34
    assert load_config(path, ["method.ema_momentum=0.5"]).method["ema_momentum"] == 0.5  # a plain value replaces it
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)  # the run directory's config.yaml holds the number the run used
    assert "!scaled" not in saved.read_text() and load_config(saved).method["ema_momentum"] == cfg.method["ema_momentum"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("!scaled_momentum {paper: 0.999}", "exactly the keys paper and paper_iters"),
        ("!scaled_momentum 0.999", "takes a mapping"),
        ("!scaled_momentum {paper: 0.999, paper_iters: many}", "paper_iters an integer"),
        ("!scaled_momentum {paper: 1.5, paper_iters: 100}", "'method.ema_momentum': !scaled_momentum"),
        ("!scaled_iterations {paper: 2.5, paper_iters: 100}", "whole number"),
    ],
)
def test_a_bad_time_constant_tag_names_the_file_or_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"recipe: cpsl\nmethod: {{ema_momentum: {text}}}\n" if "iterations" not in text else f"schedule: {{warmup_iters: {text}}}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) or "'method." in str(err.value) or "'schedule." in str(err.value)


PAPER_TIME_CONSTANTS = {
    # benchmark config: (momentum key, the paper's momentum, the paper's iterations or None for an EMA teacher)
    "cpsl": ("ema_momentum", 0.999, None),  # CPSL Sec. 4.1: the momentum networks are teachers
    "bicl_static": ("prototype_momentum", 0.999, 100000),  # BiCL supplement Sec. 1: feature memories
    "bicl_dynamic": ("prototype_momentum", 0.999, 100000),
    "bicl_hybrid": ("prototype_momentum", 0.999, 100000),
    "dacs": ("ema_momentum", 0.99, None),  # DACS
    "dacs_blv": ("ema_momentum", 0.99, None),
    "dacs_mitb0": ("ema_momentum", 0.999, None),  # DAFormer
    "daformer": ("ema_momentum", 0.999, None),
    "hrda": ("ema_momentum", 0.999, None),
    "mic_hrda": ("ema_momentum", 0.999, None),
    "mic_daformer": ("ema_momentum", 0.999, None),
    "mic_cpsl": ("ema_momentum", 0.999, None),
}


@pytest.mark.parametrize("name", sorted(PAPER_TIME_CONSTANTS))
def test_every_benchmark_momentum_follows_its_time_constant_rule(name: str) -> None:
    key, paper, paper_iters = PAPER_TIME_CONSTANTS[name]
    cfg = load_config(f"benchmark/{name}")
    if paper_iters is None:  # an EMA teacher: the teacher rule
        assert cfg.method[key] == pytest.approx(teacher_momentum(paper, cfg.train.iters))
    else:
        assert cfg.method[key] == pytest.approx(scaled_momentum(paper, paper_iters, cfg.train.iters))
    if cfg.recipe == "cpsl":
        assert cfg.method["distribution_momentum"] == pytest.approx(scaled_momentum(0.999, 90000, cfg.train.iters))
    if cfg.recipe == "daformer" or name == "dacs_mitb0":
        assert cfg.schedule.warmup_iters == scaled_iterations(1500, 40000, cfg.train.iters)
    assert load_config("benchmark/dacs_blv_tv").loss.blv.t_mid == scaled_iterations(30000, 40000, 400)
