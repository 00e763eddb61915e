"""What a user writes and reads: their own configs on packaged ones, error messages that name the key
to set as the command line takes it, options and overrides in any order, one-line errors from
DataLoader workers, and predict into a folder inside its input."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segadapt.cli import build_parser, main
from segadapt.config import PACKAGED_CONFIGS, load_config
from segadapt.engine.builders import build_dataset_from_spec
from segadapt.errors import ConfigError, DataError

from data_fixtures import TINY, make_folder, tiny_args

REPO = Path(__file__).resolve().parents[1]


def folder_source(root: Path, *extra: str) -> list[str]:
    """Overrides training source_only on a folder dataset alone (no target, no validation)."""
    return [
        "data.source.dataset=folder", f"data.source.root={root}", "data.target=null", "data.val=null",
        "data.train_transforms=[]", "data.batch_size=2", *extra,
    ]


# ---------------------------------------------------------------------------------------------
# 4. configs a user writes


def test_user_config_bases_on_a_packaged_config_name_and_a_file_beside_it_wins(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: benchmark/source_only\nname: mine\ntrain: {iters: 7}\n")
    (tmp_path / "suffixed.yaml").write_text("base: benchmark/oracle.yaml\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert (cfg.name, cfg.recipe, cfg.train.iters, cfg.model.name) == ("mine", "source_only", 7, "small")
    assert load_config(tmp_path / "suffixed.yaml").recipe == "oracle"

    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "source_only.yaml").write_text("name: the_local_file\n")
    assert load_config(tmp_path / "mine.yaml").name == "mine"  # the file's own keys still win over its base
    (tmp_path / "bare.yaml").write_text("base: benchmark/source_only.yaml\n")
    assert load_config(tmp_path / "bare.yaml").name == "the_local_file"  # an existing file beside wins

    (tmp_path / "typo.yaml").write_text("base: benchmark/source_onyl\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: base: .*did you mean 'benchmark/source_only.yaml'\?"):
        load_config(tmp_path / "typo.yaml")


def test_missing_config_file_names_the_path_instead_of_a_packaged_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "my_confg.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'my_confg.yaml'} does not exist" in err
    assert "did you mean" not in err and "cpsl" not in err
    assert main(["train", "configs/mine.yaml"]) == 2
    assert f"config file {tmp_path / 'configs' / 'mine.yaml'} does not exist" in capsys.readouterr().err
    assert main(["rounds", "benchmark/semi_supervisd"]) == 2  # looks like a packaged name: keeps the suggestion
    assert "did you mean 'benchmark/semi_supervised.yaml'?" in capsys.readouterr().err


def test_mistyped_method_key_fails_before_the_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "benchmark/cpsl", "method.queue_sise=64", f"output_dir={tmp_path}", "name=run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'method.queue_sise'; did you mean 'method.queue_size'?" in err
    assert not (tmp_path / "run").exists()
    assert main(["train", "benchmark/source_only", "recipe=cpls", f"output_dir={tmp_path}", "name=run"]) == 2
    assert "unknown recipe 'cpls'; did you mean 'cpsl'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rounds_rejects_train_iters_that_rounds_iters_would_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["rounds", "benchmark/semi_supervised", f"output_dir={tmp_path}", "name=semi"]
    assert main([*base, "train.iters=20"]) == 2
    err = capsys.readouterr().err
    assert "train.iters=20 would be ignored: rounds.iters=[500, 300, 300] sets the iterations of every round" in err
    assert "Set rounds.iters=[20,20,20] instead, or rounds.iters=null" in err
    assert main([*base, "method.target_wieght=2"]) == 2  # each round's recipe options, before round 0
    assert "did you mean 'method.target_weight'?" in capsys.readouterr().err
    assert not (tmp_path / "semi").exists()


def test_text_keys_keep_the_typed_text() -> None:
    cfg = load_config(None, ["name=001", "output_dir=2024", "data.val.dataset=folder", "data.val.split=2007", "name='a: b'"])
    assert (cfg.name, cfg.output_dir, cfg.data.val.split) == ("a: b", "2024", "2007")
    cfg = load_config(None, ["name=001", "model.pretrained=null", "optim.lr=1e-3"])
    assert cfg.run_dir == Path("runs") / "001"
    assert cfg.model.pretrained is None and cfg.optim.lr == 0.001  # non-text keys still read as YAML


def test_dataset_errors_name_the_config_key_of_their_stream(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.val.dataset=folder"])
    with pytest.raises(ConfigError, match=r"dataset 'folder' needs a root: set data\.val\.root=/path/to/folder"):
        build_dataset_from_spec(cfg.data.val)
    cfg = load_config(None, ["data.target.dataset=cityscape", "data.target.root=/nowhere"])
    with pytest.raises(ConfigError, match=r"data\.target\.dataset: unknown dataset 'cityscape'.*did you mean 'cityscapes'\?"):
        build_dataset_from_spec(cfg.data.target)

    tree = make_folder(tmp_path / "folder")
    (tree.root / "labels" / "train" / "a.png").unlink()
    cfg = load_config(None, ["data.source.dataset=folder", f"data.source.root={tree.root}"])
    with pytest.raises(DataError) as err:
        build_dataset_from_spec(cfg.data.source)
    assert "set data.source.options.missing_files=skip to drop these items" in str(err.value)
    assert "missing_files='skip'" not in str(err.value) and "<source|target|val>" not in str(err.value)
    skipped = load_config(None, ["data.source.dataset=folder", f"data.source.root={tree.root}", "data.source.options.missing_files=skip"])
    assert build_dataset_from_spec(skipped.data.source).names == ["b"]  # the hint, pasted, works


# ---------------------------------------------------------------------------------------------
# 5. the command line


def test_every_subcommand_documents_its_positionals_without_markup(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._get_positional_actions():
            assert action.help, f"segadapt {name} {action.dest} has no help"
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and ":class:" not in text, name
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "benchmark/source_only" in text and str(PACKAGED_CONFIGS) in text


def test_options_and_overrides_in_any_order_and_predict_into_its_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=run", "train.iters=1")]) == 0
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.pt")
    scores = tmp_path / "scores.json"
    assert main(["eval", checkpoint, "--json", str(scores), "eval.flip=true", *TINY]) == 0
    assert scores.is_file()

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    out = photos / "out"
    for again in ([], ["--overwrite"]):  # the second run must not predict the first run's outputs
        assert main(["predict", checkpoint, str(photos), "--formats", "color,trainid", str(out), "eval.flip=false", *again]) == 0
        assert f"wrote predictions for 2 images to {out}" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "color/a.png", "color/b.png", "trainid/a.png", "trainid/b.png"
    ]


def test_dataloader_worker_errors_are_the_same_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = make_folder(tmp_path / "folder")
    corrupt = tree.root / "labels" / "train" / "a.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    messages = []
    for workers in (0, 2):
        overrides = folder_source(tree.root, f"data.num_workers={workers}", "train.iters=1", f"output_dir={tmp_path}", f"name=w{workers}")
        assert main(["train", "benchmark/source_only", *overrides]) == 2
        err = capsys.readouterr().err
        assert str(corrupt) in err and "is corrupt" in err
        assert "Traceback" not in err and "DataLoader worker process" not in err
        assert len(err.strip().splitlines()) == 1, err
        messages.append(err)
    assert messages[0] == messages[1]


def test_readme_layer_table_names_real_paths() -> None:
    rows = re.findall(r"^\| [a-z ]+ \| `([^`]+)` \|", (REPO / "README.md").read_text(), re.MULTILINE)
    assert len(rows) >= 7
    for path in rows:
        assert (REPO / path).exists(), path
