"""Outputs never replace a user's files: the output folders of ``predict``, ``pseudo-label`` and ``rounds``.

Each test is a row of docs/reliability.md ("Outputs never replace a user's files"). The rule
(segadapt.engine.output_folder): an output folder is never a folder of the data (nor inside one,
nor one that holds one) and never holds files the command did not write; ``--overwrite`` replaces
only the command's own earlier outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segadapt.cli import main
from segadapt.commands.rounds import claim_run_directory
from segadapt.config import load_config
from segadapt.engine.output_folder import MANIFEST, OutputFolder
from segadapt.errors import ConfigError

from data_fixtures import make_toy, toy_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A private copy of the toy dataset (5 classes, ignore 7) and a 2-iteration checkpoint trained on it."""
    data = make_toy(tmp_path_factory.mktemp("outputs") / "data")
    runs = data.parent / "runs"
    assert main(["train", "benchmark/source_only", *toy_overrides(data), f"output_dir={runs}", "name=run"]) == 0
    return data, runs / "run" / "checkpoints" / "last.pt"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    """The one ``segadapt ...: error:`` line of a command's stderr (no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("segadapt ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(path)


def test_outputs_pointed_at_the_data_are_refused_and_every_input_file_is_unchanged(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, checkpoint = trained
    before = snapshot(data)
    target = [f"data.target.root={data}", "data.target.split=target"]
    no_iters = [item for item in toy_overrides(data) if not item.startswith("train.iters")]
    # every image and label folder of every split, the folders above them and one below
    places = [data / kind / split for kind in ("images", "labels") for split in ("source", "target", "val")]
    places += [data, data / "images", data / "labels", data / "labels" / "target" / "pseudo"]
    for out in places:
        commands = {
            "pseudo-label": ["pseudo-label", str(checkpoint), str(out), *target],
            "predict": ["predict", str(checkpoint), str(data / "images" / "val"), str(out)],
            "rounds": ["rounds", "benchmark/semi_supervised", *no_iters, "rounds.iters=[1,1,1]", f"output_dir={out.parent}", f"name={out.name}"],
            "train": ["train", "benchmark/source_only", *toy_overrides(data), f"output_dir={out.parent}", f"name={out.name}"],
        }
        for name, command in commands.items():
            assert main(command) == 2, (name, out)
            line = error_line(capsys.readouterr().err)
            where = "run directory" if name in ("rounds", "train") else "output folder"
            assert line.startswith(f"segadapt {name}: error: {where} {out}"), line
            assert "nothing was written" in line and ("outside the data" in line or "outside the dataset" in line), line
    assert snapshot(data) == before  # every input byte-identical, and no file added anywhere in the dataset

    # the message says what the folder is and how to fix it
    assert main(["pseudo-label", str(checkpoint), str(data / "labels" / "target"), *target]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"output folder {data / 'labels' / 'target'} is a folder of data.target (folder, split target)" in line
    assert "choose a new folder for the pseudo labels" in line
    assert main(["predict", str(checkpoint), str(data / "images" / "val"), str(data / "images")]) == 2
    assert f"holds {data / 'images' / 'val'}, the input folder" in capsys.readouterr().err


def test_an_output_folder_with_files_of_others_is_refused_and_overwrite_replaces_only_the_commands_own(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, checkpoint = trained
    for command in (["pseudo-label", str(checkpoint)], ["predict", str(checkpoint), str(data / "images" / "val")]):
        out = tmp_path / command[0]
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        assert main([*command, str(out)]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"output folder {out} holds {out / 'notes.txt'} that `segadapt {command[0]}` did not write" in line
        assert main([*command, str(out), "--overwrite"]) == 2  # --overwrite never replaces what the command did not write
        capsys.readouterr()
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

        (out / "notes.txt").unlink()  # an empty folder is fine
        assert main([*command, str(out)]) == 0
        written = snapshot(out)
        assert json.loads(written[MANIFEST])["command"] == command[0]
        assert main([*command, str(out)]) == 2  # its own earlier outputs: only with --overwrite
        line = error_line(capsys.readouterr().err)
        assert f"holds the outputs of an earlier `segadapt {command[0]}`" in line and "pass --overwrite to replace them" in line
        assert snapshot(out) == written
        (out / "stale.png").write_bytes(b"x")  # e.g. a file a user saved among the outputs
        assert main([*command, str(out), "--overwrite"]) == 2
        assert f"holds {out / 'stale.png'} that" in capsys.readouterr().err and snapshot(out) == {**written, "stale.png": b"x"}
        (out / "stale.png").unlink()
        assert main([*command, str(out), "--overwrite"]) == 0
        assert set(snapshot(out)) == set(written)
        capsys.readouterr()


def test_overwrite_deletes_the_earlier_outputs_so_the_folder_holds_one_run(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, checkpoint = trained
    photos, out = tmp_path / "photos", tmp_path / "out"
    for name in ("a", "b"):
        write_image(photos / f"{name}.png")
    assert main(["predict", str(checkpoint), str(photos), str(out)]) == 0
    (photos / "b.png").unlink()
    assert main(["predict", str(checkpoint), str(photos), str(out), "--overwrite"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["color/a.png", "trainid/a.png"]


def test_rounds_refuses_a_run_directory_with_files_of_others_and_continues_its_own(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "semi"
    run.mkdir()
    (run / "config.yaml").write_text("my own config\n")
    assert main(["rounds", "benchmark/semi_supervised", f"output_dir={tmp_path}", "name=semi"]) == 2
    assert f"run directory {run} holds {run / 'config.yaml'} that `segadapt rounds` did not write" in error_line(capsys.readouterr().err)
    assert (run / "config.yaml").read_text() == "my own config\n"

    # a run directory of a version that kept no record (config.yaml and round_<k>/ only) is continued, then recorded
    (run / "round_0" / "checkpoints").mkdir(parents=True)
    (run / "round_0" / "metrics.jsonl").write_text("")
    claim_run_directory(load_config("benchmark/semi_supervised", [f"output_dir={tmp_path}", "name=semi"]))
    assert json.loads((run / MANIFEST).read_text()) == {"command": "rounds", "files": None}
    (run / "round_1").mkdir()
    (run / "round_1" / "last.pt").write_bytes(b"")
    OutputFolder(run, "rounds").check("fix", continues=True)  # all of it is the command's now
    with pytest.raises(ConfigError, match="did not write"):
        OutputFolder(run, "predict").check("fix")  # but no other command's


def test_predict_refuses_two_inputs_that_would_share_an_output_name(trained: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    _, checkpoint = trained
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_image(photos / "x.png", 0)
    write_image(photos / "x.jpg", 1)
    assert main(["predict", str(checkpoint), str(photos), str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{photos / 'x.jpg'} and {photos / 'x.png'} would both be predicted into x.png" in line
    assert "rename one of them" in line and not out.exists()

    (photos / "x.jpg").unlink()
    write_image(photos / "city" / "x.JPG", 1)  # the same stem in another folder: its own output
    assert main(["predict", str(checkpoint), str(photos), str(out)]) == 0
    assert "wrote predictions for 2 images" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "color/city/x.png", "color/x.png", "trainid/city/x.png", "trainid/x.png"
    ]


def test_predict_skips_an_unreadable_image_predicts_the_rest_and_lists_it(trained: tuple[Path, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    _, checkpoint = trained
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_image(photos / "a.png", 0)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(photos / "b.jpg")
    truncated = photos / "b.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-400])  # a cut download: the header reads, the pixels do not
    write_image(photos / "c.png", 2)
    assert main(["predict", str(checkpoint), str(photos), str(out)]) == 2
    captured = capsys.readouterr()
    assert f"wrote predictions for 2 of 3 images to {out}" in captured.out
    assert f"skipped {truncated}: image file is truncated" in captured.err
    line = error_line(captured.err)
    assert "1 of 3 images could not be read and were skipped (listed above)" in line and "check-data" not in line
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "color/a.png", "color/c.png", "trainid/a.png", "trainid/c.png"
    ]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(truncated)  # replaced: the hint's rerun predicts all three
    assert main(["predict", str(checkpoint), str(photos), str(out), "--overwrite"]) == 0
    assert "wrote predictions for 3 images" in capsys.readouterr().out


def test_every_dataset_layout_names_the_folders_that_hold_its_files(tmp_path: Path) -> None:
    """The class of the bug: for every registered dataset, each image and label file lies in a folder no output may touch."""
    from segadapt.data import DATASETS, build_dataset
    from segadapt.engine.output_folder import DataFolder, check_not_data, stream_folders

    from data_fixtures import make_cityscapes, make_folder, make_gta5, make_scannet_25k, make_synthia

    layouts = {"cityscapes": (make_cityscapes, "train"), "gta5": (make_gta5, "all"), "synthia": (make_synthia, "all"),
               "scannet": (make_scannet_25k, "train"), "folder": (make_folder, "train")}
    assert set(layouts) == set(DATASETS)  # a new dataset gets its layout checked here
    for name, (make, split) in layouts.items():
        root = tmp_path / name
        make(root)
        dataset = build_dataset(name, root, split)
        cfg = load_config(None, [f"data.target.dataset={name}", f"data.target.root={root}", f"data.target.split={split}"])
        folders = [folder for folder in stream_folders(cfg) if "data.target" in folder.what]
        files = [path for item in dataset.items for path in (item.image, item.label) if path is not None]
        assert files and any(item.label is not None for item in dataset.items), name
        for path in files:
            assert any(path.resolve().is_relative_to(folder.path.resolve()) for folder in folders), (name, path)
            with pytest.raises(ConfigError, match="a folder of data.target"):
                check_not_data(path.parent, folders, "fix")
    with pytest.raises(ConfigError, match="the input folder"):  # predict's input: not it, not above it; inside it is allowed
        check_not_data(tmp_path, [DataFolder(tmp_path / "folder", "the input folder", output_may_lie_inside=True)], "fix")
    check_not_data(tmp_path / "folder" / "out", [DataFolder(tmp_path / "folder", "the input folder", output_may_lie_inside=True)], "fix")
