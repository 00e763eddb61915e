"""Messages that point the right way (issue "the second reliability round", section 3): every message a user
reads names the real cause and offers only fixes that work, whatever command or input produced it."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.cli import SIGPIPE_STATUS, build_parser, main
from segadapt.config import METHOD_PATH_OPTIONS, load_config
from segadapt.data.check import check_folder_root, check_named_dataset
from segadapt.data.folder import FolderDataset
from segadapt.errors import CheckpointError, DataError
from segadapt.models.small import SmallSegNet
from segadapt.models.weights import load_checkpoint_weights

from data_fixtures import make_folder, make_gta5, toy_overrides

REPO = Path(__file__).resolve().parents[1]


def folder_run(root: Path, output: Path, name: str, *extra: str) -> list[str]:
    """``segadapt train`` arguments of source_only on a folder dataset's train split alone, 1 iteration."""
    return [
        "train", "benchmark/source_only", "data.source.dataset=folder", f"data.source.root={root}", "data.target=null",
        "data.val=null", "data.train_transforms=[]", "data.batch_size=2", "data.num_workers=0", "train.iters=1",
        "train.threads=1", f"output_dir={output}", f"name={name}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory, toy: Path) -> Path:
    """A finished 2-iteration source-only run on the 5-class toy data, with an evaluation on its val split."""
    output = tmp_path_factory.mktemp("runs")
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), f"output_dir={output}", "name=toy"]) == 0
    return output / "toy"


# ---------------------------------------------------------------------------------------------
# checkpoints of another class count


def test_a_checkpoint_of_another_class_count_offers_only_fixes_that_work(
    toy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tree = make_folder(tmp_path / "three")  # 3 classes; the toy checkpoint has 5
    checkpoint = toy_run / "checkpoints" / "last.pt"
    assert main(folder_run(tree.root, tmp_path, "warm", f"model.checkpoint={checkpoint}")) == 2
    err = capsys.readouterr().err
    assert "checkpoint has 5 classes" in err and "has 3 (the data's class count" in err
    assert "use a checkpoint trained on 3 classes, or train on data labelled with its 5 classes" in err
    assert "model.num_classes=" not in err  # the data has 3: model.num_classes=5 would be refused
    assert "model.pretrained" not in err  # SmallSegNet has no ImageNet backbone


def test_a_model_with_an_imagenet_backbone_is_offered_model_pretrained(tmp_path: Path) -> None:
    class WithBackbone(SmallSegNet):
        backbone_module_names = ("encoder",)  # as the DeepLab, PSPNet and DAFormer models declare theirs

    path = tmp_path / "six.pth"
    torch.save(SmallSegNet(num_classes=6, feature_dim=8, width=4).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_weights(WithBackbone(num_classes=4, feature_dim=8, width=4), path)
    assert "start from ImageNet weights instead: model.checkpoint=null model.pretrained=FILE (a torchvision-format ResNet-101" in str(err.value)
    assert "model.num_classes=" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# eval / predict / pseudo-label take a run directory


def test_eval_takes_a_run_directory_and_says_a_missing_checkpoint_does_not_exist(
    toy_run: Path, toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    by_file = tmp_path / "file.json"
    by_dir = tmp_path / "dir.json"
    assert main(["eval", str(toy_run / "checkpoints" / "last.pt"), "--json", str(by_file)]) == 0
    assert main(["eval", str(toy_run), "--json", str(by_dir)]) == 0  # RUN_DIR: its last.pt and config.yaml
    assert by_dir.read_text() == by_file.read_text()
    capsys.readouterr()

    missing = tmp_path / "nowhere" / "last.pt"
    assert main(["eval", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {missing} does not exist" in err and "--config" not in err
    assert main(["predict", str(missing), str(toy / "images" / "val"), str(tmp_path / "out")]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    shutil.copy(toy_run / "config.yaml", tmp_path / "empty_run" / "config.yaml")
    assert main(["eval", str(tmp_path / "empty_run")]) == 2
    assert "is a run directory without checkpoints/last.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# report


def test_report_takes_a_run_stopped_before_its_first_log_line(toy_run: Path, tmp_path: Path) -> None:
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(toy_run / "config.yaml", early / "config.yaml")  # what a run killed at its first iteration has
    assert main(["report", str(early), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "curves.png").is_file()


def test_report_refuses_runs_of_different_classes_naming_them(toy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = make_folder(tmp_path / "three_data")  # the run directory tmp_path/three lies beside the data, never in it
    assert main(folder_run(tree.root, tmp_path, "three")) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(toy_run), str(tmp_path / "three"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the runs predict different classes (toy: 5 classes (road, grass, sky, car, ...); three: 3 classes (road, car, sky))" in err
    assert "report the runs of each label space separately" in err
    assert not out.exists()


def test_ctrl_c_in_report_says_interrupted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from segadapt.commands import report

    def interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    assert main(["report", "some_run"]) == 130
    assert capsys.readouterr().err == "segadapt report: interrupted\n"


# ---------------------------------------------------------------------------------------------
# overrides and configs


def test_override_errors_name_the_override_not_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "benchmark/source_only", "train.iters=abc", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "override train.iters=abc: 'train.iters': Input should be a valid integer" in err
    assert "benchmark/source_only: invalid config" not in err
    assert main(["train", "benchmark/source_only", "data.crop_size=[48]", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "override data.crop_size=[48]: 'data.crop_size': expected 2 integers [h, w] in a list, got [48]" in err
    assert "Field required" not in err and "crop_size.1" not in err

    mine = tmp_path / "mine.yaml"  # a bad value in a file is still the file's
    mine.write_text("base: benchmark/source_only\ntrain: {iters: abc}\ndata: {crop_size: [1, 2, 3]}\n")
    assert main(["train", str(mine), "optim.lr=-1", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{mine.resolve()}: invalid config" in err or f"{mine}: invalid config" in err
    assert "\n  'train.iters': Input should be a valid integer" in err
    assert "\n  'data.crop_size': expected 2 integers [h, w] in a list, got [1, 2, 3]" in err
    assert "\n  override optim.lr=-1: 'optim.lr': Input should be greater than 0" in err
    assert not any(tmp_path.glob("run*"))


def test_paths_in_a_users_yaml_are_relative_to_the_file_like_base(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "configs" / "shared").mkdir(parents=True)
    shutil.copytree(toy, project / "data" / "toy")
    (project / "configs" / "shared" / "data.yaml").write_text(
        "base: benchmark/source_only\ndata:\n  source: {dataset: folder, root: ../../data/toy, split: source}\n"
    )
    (project / "configs" / "mine.yaml").write_text(
        "base: shared/data.yaml\ndata:\n  val: {dataset: folder, root: ../data/toy, split: val}\n  target: null\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory has no say in a file's paths
    cfg = load_config(project / "configs" / "mine.yaml")
    assert cfg.data.source.root == cfg.data.val.root == str(project / "data" / "toy")
    # command-line overrides stay relative to the working directory; packaged configs' data/... too
    assert load_config(project / "configs" / "mine.yaml", ["data.val.root=here"]).data.val.root == "here"
    assert load_config("gta5_to_cityscapes/source_only").data.source.root == "data/gta5"

    overrides = [o for o in toy_overrides(toy) if not o.startswith(("data.source", "data.target", "data.val"))]
    assert main(["train", str(project / "configs" / "mine.yaml"), *overrides, "output_dir=runs", "name=mine"]) == 0
    saved = load_config(elsewhere / "runs" / "mine" / "config.yaml")
    assert saved.data.source.root == str(project / "data" / "toy")


def test_method_path_options_are_the_recipes_path_fields(tmp_path: Path) -> None:
    from segadapt.engine.recipes import RECIPES

    path_fields = {
        name for recipe in RECIPES.values() for name, field in recipe.Options.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("path")
    }  # fmt: skip
    assert path_fields == METHOD_PATH_OPTIONS
    (tmp_path / "distil.yaml").write_text("base: benchmark/cpsl_distill\nmethod: {teacher: runs/cpsl/checkpoints/last.pt}\n")
    cfg = load_config(tmp_path / "distil.yaml")
    assert cfg.method["teacher"] == str(tmp_path / "runs" / "cpsl" / "checkpoints" / "last.pt")
    assert load_config(tmp_path / "distil.yaml", ["method.teacher=t.pt"]).method["teacher"] == "t.pt"


# ---------------------------------------------------------------------------------------------
# the command line


def test_eval_without_arguments_names_only_the_checkpoint_as_required(capsys: pytest.CaptureFixture) -> None:
    for command, required in (("eval", "checkpoint"), ("train", "config"), ("pseudo-label", "checkpoint, out")):
        with pytest.raises(SystemExit):
            main([command])
        err = capsys.readouterr().err
        assert err.strip().endswith(f"error: the following arguments are required: {required}"), err


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"segadapt {name} {action.option_strings or action.dest} has no help"


def test_a_closed_standard_output_ends_quietly(toy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "segadapt.cli", "check-data", str(toy)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # `| head` that has read all it wanted, before segadapt prints its report
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == SIGPIPE_STATUS == 141
    assert stderr == ""


# ---------------------------------------------------------------------------------------------
# check-data and the folder dataset


def test_folder_dataset_and_check_data_read_sub_folders_like_predict(tmp_path: Path) -> None:
    tree = make_folder(tmp_path / "data")
    for kind in ("images", "labels"):
        (tree.root / kind / "train" / "cityA").mkdir()
    shutil.copy(tree.root / "images" / "train" / "a.png", tree.root / "images" / "train" / "cityA" / "x.png")
    shutil.copy(tree.root / "labels" / "train" / "a.png", tree.root / "labels" / "train" / "cityA" / "x.png")
    dataset = FolderDataset(tree.root, "train")
    assert dataset.names == ["a", "b", "cityA/x"]
    assert np.array_equal(dataset.load_label(2), tree.labels["a"])  # the label mirrors the image's path
    train = next(report for report in check_folder_root(tree.root) if " train " in report.description)
    assert (train.num_images, train.num_labels, train.problems) == (3, 3, [])


def test_check_data_names_unsupported_formats_as_such(tmp_path: Path) -> None:
    tree = make_folder(tmp_path / "data")
    images, labels = tree.root / "images" / "train", tree.root / "labels" / "train"
    Image.open(images / "a.png").save(images / "t.tif")
    shutil.copy(labels / "a.png", labels / "t.png")  # the .tif's label is fine
    Image.open(images / "a.png").save(images / "w.png")
    Image.open(labels / "a.png").save(labels / "w.jpg")  # a JPEG label: lossy, refused
    train = next(report for report in check_folder_root(tree.root) if " train " in report.description)
    found = {(p.kind, Path(p.path).name): p.detail for p in train.problems}
    assert set(found) == {("unsupported_format", "t.tif"), ("unsupported_format", "w.jpg")}  # no missing_pair
    assert "convert it to PNG" in found[("unsupported_format", "t.tif")]
    assert "save it as w.png" in found[("unsupported_format", "w.jpg")]
    with pytest.raises(DataError, match=r"2 missing or unsupported file\(s\):\n  .*t\.tif: a \.tif image"):
        FolderDataset(tree.root, "train")  # training says the same, before any work


def test_check_data_gives_the_fix_for_out_of_range_ids_and_never_points_at_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = make_folder(tmp_path / "data")
    label = np.array(Image.open(tree.root / "labels" / "train" / "a.png"))
    label[0, 0] = 9
    Image.fromarray(label).save(tree.root / "labels" / "train" / "a.png")
    (tree.root / "images" / "train" / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (tree.root / "labels" / "train" / "orphan.png").write_bytes((tree.root / "labels" / "train" / "a.png").read_bytes())
    with caplog.at_level("WARNING"):
        train = next(report for report in check_folder_root(tree.root) if " train " in report.description)
    details = {p.kind: p.detail for p in train.problems}
    assert details["unknown_ids"] == (
        "ids [9] not in the label format; train ids are 0..2 and 255 (ignore): relabel those pixels to a class or to 255, "
        "or add the missing classes to the dataset's class list"
    )
    assert "segadapt check-data" not in details["unreadable"] and "missing_pair" in details
    assert not [r for r in caplog.records if "segadapt check-data" in r.getMessage()]

    gta5 = check_named_dataset("gta5", make_gta5(tmp_path / "gta5").root, unknown_ids="error")[0]
    unknown = next(p for p in gta5.problems if p.kind == "unknown_ids")
    assert "set data.<source|target|val>.options.unknown_ids=ignore to map them to ignore (255)" in unknown.detail


# ---------------------------------------------------------------------------------------------
# documents


def test_docs_cite_only_scripts_that_exist() -> None:
    cited = {
        path for page in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
        for path in re.findall(r"`((?:benchmarks|tests|src/segadapt)/[\w/]+\.py)", page.read_text())
    }
    assert "benchmarks/step_cost.py" in cited
    assert sorted(path for path in cited if not (REPO / path).exists()) == []


def test_readme_states_the_torch_floor_of_pyproject() -> None:
    required = re.search(r'"torch>=([\d.]+),<(\d+)"', (REPO / "pyproject.toml").read_text())
    assert required is not None
    floor, ceiling = required.groups()
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"segadapt needs torch {floor} or newer, below {ceiling}" in readme
    assert f"`torch>={floor},<{ceiling}`" in (REPO / "docs" / "dependencies.md").read_text()
    assert "any torch 2.x" not in readme
