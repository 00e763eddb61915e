"""The label space comes from the data: every recipe, end to end, on data that is not the benchmark's shape.

A folder dataset with 5 classes and ``ignore_index: 7`` (neither 19 classes nor 255): a literal 255
anywhere (crop padding, a recipe's mask, a method's count) becomes a target out of range for the
loss, and a literal 19 a shape mismatch, so each recipe run here would fail. Every packaged
benchmark config is run, train -> eval -> predict -> pseudo-label -> report, and the ScanNet
semi-supervised configs run on 20-class data in ScanNet's own format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segadapt.cli import main
from segadapt.config import PACKAGED_CONFIGS, load_config
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.recipes import RECIPES
from segadapt.errors import ConfigError

from data_fixtures import TOY_CLASSES as CLASSES
from data_fixtures import TOY_IGNORE as IGNORE
from data_fixtures import toy_overrides as data_overrides

WARMED_UP = {"st", "cbst", "dars_sd", "dars_td", "dars_paper", "dacs", "dacs_blv", "bicl_static", "bicl_dynamic", "bicl_hybrid"}
WARMED_UP_MITB0 = {"dacs_mitb0", "daformer", "daformer_blv", "mic_daformer", "hrda", "mic_hrda"}  # start from benchmark/source_only_mitb0
DISTILLED = {"cpsl_distill", "bicl_distill"}
BENCHMARK_CONFIGS = sorted(
    path.stem for path in (PACKAGED_CONFIGS / "benchmark").glob("*.yaml") if not path.stem.startswith("_") and path.stem != "semi_supervised"
)


@pytest.fixture(scope="module")
def warmup(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warmup")
    assert main(["train", "benchmark/source_only", *data_overrides(toy), f"output_dir={out}", "name=warmup"]) == 0
    return out / "warmup" / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def warmup_mitb0(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warmup_mitb0")
    assert main(["train", "benchmark/source_only_mitb0", *data_overrides(toy), f"output_dir={out}", "name=warmup"]) == 0
    return out / "warmup" / "checkpoints" / "last.pt"


def recipe_overrides(config: str, warmup: Path, warmup_mitb0: Path) -> list[str]:
    extra = []
    host = config.removeprefix("mic_")  # MIC on a recipe starts as the recipe does
    if config in WARMED_UP_MITB0:
        extra.append(f"model.checkpoint={warmup_mitb0}")
    if "daformer" in config or "hrda" in config:  # the toy data's thing classes (the configs name Cityscapes'), and its small images
        extra += ["method.feature_distance_classes=[car,sign]", "method.rare_class_min_pixels=10"]
    if "hrda" in config:  # HRDA's context view of a MiT network needs sides of 58 (MiT: 29 at half scale)
        extra += ["data.crop_size=[64,96]", "eval.size=[64,96]", "pseudo_label.size=[64,96]", "model.options.detail_crop_size=[32,48]"]
    if host in WARMED_UP or host.startswith("cpsl") and host not in DISTILLED:
        extra.append(f"model.checkpoint={warmup}")
    if config in DISTILLED:
        extra.append(f"method.teacher={warmup}")
    if host.startswith("cpsl") and host not in DISTILLED:
        extra += ["method.pixels_per_image=8", "method.queue_size=64"]  # the 4x6 output grid of a 32x48 crop
    if host in ("dars_td", "dars_paper"):
        extra.append("pseudo_label.given_distribution=[40,20,30,8,2]")
    return extra


def test_every_recipe_has_a_benchmark_config_run_here() -> None:
    used = {load_config(PACKAGED_CONFIGS / "benchmark" / f"{name}.yaml").recipe for name in BENCHMARK_CONFIGS}
    assert used == set(RECIPES)  # a recipe added without a benchmark config would escape the test below


@pytest.mark.slow
@pytest.mark.parametrize("config", BENCHMARK_CONFIGS)
def test_recipe_end_to_end_on_five_classes_with_ignore_7(config: str, toy: Path, warmup: Path, warmup_mitb0: Path, tmp_path: Path) -> None:
    run = tmp_path / config
    overrides = recipe_overrides(config, warmup, warmup_mitb0)
    args = ["train", f"benchmark/{config}", *data_overrides(toy), *overrides, f"output_dir={tmp_path}", f"name={config}"]
    assert main(args) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and tuple(state["classes"]["names"]) == CLASSES and state["classes"]["ignore_index"] == IGNORE

    scores = tmp_path / "scores.json"
    assert main(["eval", str(run / "checkpoints" / "last.pt"), "--json", str(scores)]) == 0
    flat = json.loads(scores.read_text())
    assert [key for key in flat if key.startswith("iou/")] == [f"iou/{name}" for name in CLASSES] and 0.0 <= flat["miou"] <= 1.0
    assert not any(key.startswith("miou1") for key in flat)  # no Cityscapes protocol on non-Cityscapes data

    assert main(["predict", str(run / "checkpoints" / "last.pt"), str(toy / "images" / "val"), str(tmp_path / "pred")]) == 0
    predicted = np.array(Image.open(tmp_path / "pred" / "trainid" / "val0.png"))
    assert predicted.shape == (40, 56) and predicted.max() < len(CLASSES)

    labels = tmp_path / "pseudo"
    assert main(["pseudo-label", str(run / "checkpoints" / "last.pt"), str(labels), "pseudo_label.rule=cbst"]) == 0
    values = np.unique(np.concatenate([np.array(Image.open(p)).ravel() for p in labels.glob("*.png")]))
    assert set(values.tolist()) <= set(range(len(CLASSES))) | {IGNORE} and IGNORE in values

    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--images", "1"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| {config} | {100 * flat['miou']:.1f} |" in report  # the run's last evaluation, on the 5 classes
    assert all((tmp_path / "report" / name).is_file() for name in ("class_iou.png", "predictions.png"))


@pytest.mark.slow
def test_semi_supervised_rounds_on_five_classes(toy: Path, tmp_path: Path) -> None:
    folder = [
        "data.source.dataset=folder", f"data.source.root={toy}", "data.source.split=target",
        "data.target.dataset=folder", f"data.target.root={toy}", "data.target.split=target",
        "data.val.dataset=folder", f"data.val.root={toy}", "data.val.split=val",
    ]  # fmt: skip
    fast = [item for item in data_overrides(toy) if not item.startswith(("data.source", "data.target", "data.val", "train.iters"))]
    assert main(["rounds", "benchmark/semi_supervised", *folder, *fast, "rounds.iters=[2,1,1]", f"output_dir={tmp_path}", "name=rounds"]) == 0
    for index, iters in enumerate((2, 1, 1)):
        assert load_checkpoint(tmp_path / "rounds" / f"round_{index}" / "checkpoints" / "last.pt")["iteration"] == iters
    summary = json.loads((tmp_path / "rounds" / "round_2" / "pseudo_labels" / "summary.json").read_text())
    assert summary["rule"] == "dars" and len(summary["thresholds"]) == len(CLASSES)


def test_cityscapes_protocols_on_other_data_fail_before_the_run_directory(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "benchmark/source_only", *data_overrides(toy), "eval.protocols=[19]", f"output_dir={tmp_path}", "name=p"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.protocols=[19]: protocol mIoU19 needs Cityscapes classes" in err
    assert "remove the key (or set eval.protocols=[])" in err
    assert not (tmp_path / "p").exists()


def test_per_class_list_of_another_length_names_its_key_before_any_work(
    toy: Path, warmup: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["train", "benchmark/dars_td", *data_overrides(toy), f"model.checkpoint={warmup}", f"output_dir={tmp_path}", "name=td"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pseudo_label.given_distribution has 19 entries but the data ('toy5') has 5 classes (road, grass, sky, car, sign)" in err
    assert not (tmp_path / "td").exists()  # checked before the pseudo-label pass and the run directory
    code = main(["pseudo-label", str(warmup), str(tmp_path / "pl"), "pseudo_label.rule=dars", "pseudo_label.distribution=given",
                 "pseudo_label.given_distribution=[1,2,3]"])  # fmt: skip
    assert code == 2 and "pseudo_label.given_distribution has 3 entries" in capsys.readouterr().err
    assert not (tmp_path / "pl").exists()


def test_datasets_with_different_ignore_values_are_refused(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    (other / "images" / "val").mkdir(parents=True)
    (other / "labels" / "val").mkdir(parents=True)
    (other / "dataset.yaml").write_text((toy / "dataset.yaml").read_text().replace(f"ignore_index: {IGNORE}", "ignore_index: 255"))
    for path in (toy / "images" / "val").iterdir():
        (other / "images" / "val" / path.name).write_bytes(path.read_bytes())
        (other / "labels" / "val" / path.name).write_bytes((toy / "labels" / "val" / path.name).read_bytes())
    code = main(["train", "benchmark/source_only", *data_overrides(toy), f"data.val.root={other}", f"output_dir={tmp_path}", "name=mixed"])
    err = capsys.readouterr().err
    assert code == 2 and "ignore_index per stream: {'source': 7, 'val': 255}" in err and "dataset.yaml" in err


def test_transforms_take_the_data_ignore_index(toy: Path) -> None:
    from segadapt.data.transforms import build_transforms

    pipeline = build_transforms([{"name": "random_crop", "size": [64, 64]}], ignore_index=IGNORE)
    assert pipeline.transforms[0].ignore_index == IGNORE
    with pytest.raises(ConfigError, match="ignore_index 255 differs from the data's ignore index 7; remove the key"):
        build_transforms([{"name": "random_crop", "size": 8, "ignore_index": 255}], ignore_index=IGNORE)


def _scannet(root: Path, frames: int = 16) -> None:
    """ScanNet's ``scannet_frames_25k`` layout: NYU40-id labels (all 20 benchmark classes present), 4:3 frames."""
    rng = np.random.default_rng(3)
    nyu40_of_train_id = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
    for scene, count in (("scene0000_00", frames), ("scene0001_00", 2)):
        for index in range(count):
            ids = rng.choice(np.array(nyu40_of_train_id + [0, 13]), size=(30, 40)).astype(np.uint8)
            (root / scene / "color").mkdir(parents=True, exist_ok=True)
            (root / scene / "label").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)).save(root / scene / "color" / f"{index:06d}.jpg")
            Image.fromarray(ids).save(root / scene / "label" / f"{index:06d}.png")
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannetv2_val.txt").write_text("scene0001_00\n")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["scannet_semi/pspnet50_1-8", "scannet_semi/pspnet50_1-4"])
def test_scannet_configs_on_twenty_classes(config: str, tmp_path: Path) -> None:
    root = tmp_path / "scannet"
    _scannet(root)
    small = [
        *(f"data.{part}.root={root}" for part in ("source", "target", "val")),
        "model.pretrained=null", "data.crop_size=[33,33]", "data.batch_size=2", "data.num_workers=0",
        "data.val_transforms=[]", "pseudo_label.size=null", "pseudo_label.flip=false", "eval.flip=false",
        "rounds.iters=[1,1,1]", "train.log_every=1", "train.threads=1", f"output_dir={tmp_path}", "name=rounds",
    ]  # fmt: skip
    assert main(["rounds", config, *small]) == 0
    last = load_checkpoint(tmp_path / "rounds" / "round_2" / "checkpoints" / "last.pt")
    assert len(last["classes"]["names"]) == 20 and last["classes"]["ignore_index"] == 255
    summary = json.loads((tmp_path / "rounds" / "round_1" / "pseudo_labels" / "summary.json").read_text())
    assert len(summary["thresholds"]) == 20
