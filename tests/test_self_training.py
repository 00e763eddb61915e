"""Offline pseudo labels end to end: generation, the pseudo-labelled dataset, self-training, rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segadapt.cli import main
from segadapt.commands.rounds import round_config
from segadapt.config import load_config
from segadapt.data.classes import ClassInfo
from segadapt.data.pseudo_label_folder import PseudoLabeledDataset
from segadapt.engine.builders import build_dataset_from_spec
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.pseudo_labelling import generate_pseudo_labels, pseudo_label_key
from segadapt.engine.recipes.self_training import SelfTraining, SelfTrainingOptions
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError, DataError
from segadapt.methods.thresholds import apply_thresholds, cbst_thresholds_exact
from segadapt.models.base import SegOutput

from data_fixtures import tiny_args, tiny_config


class PixelwiseModel(nn.Module):
    """A fixed 1x1 convolution: flip-equivariant, so flip averaging leaves its probabilities unchanged."""

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 4)
            self.conv.bias.copy_(torch.randn(num_classes, generator=generator))

    def forward(self, images: torch.Tensor) -> SegOutput:
        logits = self.conv(images)
        return SegOutput(logits, logits)


def target_set(tmp_path: Path, *extra: str):
    cfg = tiny_config(tmp_path, *extra, config="benchmark/cbst")
    spec = cfg.data.target.model_copy(update={"with_labels": True})
    return cfg, build_dataset_from_spec(spec, with_labels=True)


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path)).astype(np.int64))


def test_cbst_labels_match_the_exact_thresholds_on_every_image(tmp_path: Path) -> None:
    cfg, dataset = target_set(tmp_path, "pseudo_label.ratio=0.3")
    model = PixelwiseModel()
    summary = generate_pseudo_labels(model, dataset, cfg, tmp_path / "labels", torch.device("cpu"), log=lambda _: None)

    with torch.no_grad():
        probs = [model(dataset[i]["image"][None]).logits.softmax(1) for i in range(len(dataset))]
    confidence_per_class = [[] for _ in range(19)]
    for p in probs:
        conf, pred = p.max(1)
        for j in range(19):
            confidence_per_class[j].append(conf[pred == j])
    exact = cbst_thresholds_exact([torch.cat(c) for c in confidence_per_class], 0.3)
    for index, p in enumerate(probs):
        written = read_png(tmp_path / "labels" / f"{dataset.names[index]}.png")
        expected = apply_thresholds(p, *exact)[0]
        # the histogram threshold is the lower edge of the exact one's bin: it may keep a few more
        disagree = written != expected
        assert bool((expected[disagree] == 255).all())
        assert disagree.float().mean() < 0.02

    labels = torch.stack([read_png(tmp_path / "labels" / f"{n}.png") for n in dataset.names])
    truth = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    valid = truth != 255
    assert summary["density"] == pytest.approx(float((labels[valid] != 255).float().mean()))
    labelled = valid & (labels != 255)
    assert summary["accuracy"] == pytest.approx(float((labels[labelled] == truth[labelled]).float().mean()))
    assert summary["class_counts"] == torch.bincount(labels[labels != 255], minlength=19).tolist()
    saved = json.loads((tmp_path / "labels" / "summary.json").read_text())
    assert saved["rule"] == "cbst" and saved["ratio"] == 0.3 and len(saved["thresholds"]) == 19
    assert "| class | threshold |" in (tmp_path / "labels" / "summary.md").read_text()


def test_st_threshold_bounds_and_dars_labels_the_requested_fraction(tmp_path: Path) -> None:
    model = PixelwiseModel()
    cfg, dataset = target_set(tmp_path, "pseudo_label.rule=st", "pseudo_label.threshold=0.0")
    everything = generate_pseudo_labels(model, dataset, cfg, tmp_path / "st0", torch.device("cpu"), log=lambda _: None)
    assert everything["density"] == pytest.approx(1.0)

    cfg, dataset = target_set(tmp_path, "pseudo_label.rule=dars", "pseudo_label.ratio=0.4", "pseudo_label.distribution=predicted")
    dars = generate_pseudo_labels(model, dataset, cfg, tmp_path / "dars", torch.device("cpu"), log=lambda _: None)
    total = sum(dataset[i]["image"][0].numel() for i in range(len(dataset)))
    # per class int(quota) and per image int(n - n * sp) round down: at most a few pixels per class and image over
    assert 0.4 * total - 19 <= sum(dars["class_counts"]) <= 0.4 * total + 19 * len(dataset)
    assert dars["distribution"] == "predicted" and dars["kl_to_reference"] >= 0


def test_pseudo_labelled_dataset_reports_missing_and_foreign_files(tmp_path: Path) -> None:
    _, dataset = target_set(tmp_path)
    folder = tmp_path / "labels"
    folder.mkdir()
    with pytest.raises(DataError, match=r"4 of 4 items have no pseudo label .* regenerate it"):
        PseudoLabeledDataset(dataset, folder)
    for name in dataset.names:
        Image.fromarray(np.full((32, 64), 3, np.uint8)).save(folder / f"{name}.png")
    Image.fromarray(np.full((16, 32), 40, np.uint8)).save(folder / f"{dataset.names[1]}.png")
    wrapped = PseudoLabeledDataset(dataset, folder)
    assert wrapped[0]["label"].unique().tolist() == [3] and wrapped[0]["image"].shape == (3, 32, 64)
    with pytest.raises(DataError, match=rf"{dataset.names[1]}.png: pseudo label holds ids \[40\]"):
        wrapped[1]


def test_self_training_generates_its_labels_once_and_trains_on_them(tmp_path: Path) -> None:
    # 10 iterations: a 2-iteration model's argmax falls almost only on classes DARS-SD's source share gives no pixel
    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=warmup", "train.iters=10")]) == 0
    warmup = tmp_path / "warmup" / "checkpoints" / "last.pt"
    assert main(["pseudo-label", str(warmup), str(tmp_path / "st"), "pseudo_label.rule=st", "pseudo_label.threshold=0"]) == 0
    st = json.loads((tmp_path / "st" / "summary.json").read_text())
    assert st["rule"] == "st" and st["density"] == 1.0 and st["num_images"] == 4 and 0 <= st["accuracy"] <= 1
    args = ["train", "benchmark/dars_sd", *tiny_args(tmp_path, "name=dars", f"model.checkpoint={warmup}")]
    assert main([*args, "train.iters=2"]) == 0
    run = tmp_path / "dars"
    summary = json.loads((run / "pseudo_labels" / "summary.json").read_text())
    assert summary["rule"] == "dars" and summary["distribution"] == "source" and 0 < summary["density"] <= 0.5 + 1e-3
    saved = load_config(run / "config.yaml")
    assert saved.data.target.pseudo_labels is None  # config.yaml is the run as asked: a moved run remakes or reuses its labels
    assert all("loss_target" in r for r in read_metrics(run) if "loss" in r)
    stamp = (run / "pseudo_labels" / "summary.json").stat().st_mtime_ns
    assert main([*args, "train.iters=3", "resume=true"]) == 0  # resumed: the labels are reused
    assert (run / "pseudo_labels" / "summary.json").stat().st_mtime_ns == stamp
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 3


def test_run_pseudo_labels_are_remade_when_the_checkpoint_or_the_rule_changes(tmp_path: Path) -> None:
    import shutil

    from segadapt.engine.pseudo_labelling import with_pseudo_labels
    from segadapt.engine.run_cache import key_path

    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=w", "train.iters=2")]) == 0
    first = tmp_path / "w" / "checkpoints" / "last.pt"
    cfg = tiny_config(tmp_path, "name=st", f"model.checkpoint={first}", config="benchmark/cbst")
    run_dir, summary = tmp_path / "st", tmp_path / "st" / "pseudo_labels" / "summary.json"
    lines: list[str] = []

    def label(cfg, checkpoint) -> str:
        lines.clear()
        out = with_pseudo_labels(cfg, checkpoint, run_dir, lines.append, shard=False)
        assert out.data.target.pseudo_labels == str(run_dir / "pseudo_labels")
        return lines[0]

    assert "(not made yet)" in label(cfg, first) and key_path(run_dir / "pseudo_labels").is_file()
    stamp = summary.stat().st_mtime_ns
    assert "reusing" in label(cfg, first) and summary.stat().st_mtime_ns == stamp  # same inputs
    moved = tmp_path / "moved.pt"
    shutil.copy(first, moved)
    assert "reusing" in label(cfg, moved)  # the same weights elsewhere: the same input
    ratio = cfg.model_copy(update={"pseudo_label": cfg.pseudo_label.model_copy(update={"ratio": 0.2})})
    assert "changed: pseudo_label)" in label(ratio, first) and json.loads(summary.read_text())["ratio"] == 0.2
    assert "reusing" in label(ratio, first)
    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=w2", "train.iters=1")]) == 0
    assert "changed: checkpoint)" in label(ratio, tmp_path / "w2" / "checkpoints" / "last.pt")
    key_path(run_dir / "pseudo_labels").unlink()  # e.g. a folder of an earlier version: no record of its inputs
    assert "no record of what made it" in label(ratio, first)


def test_self_training_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"set model.checkpoint=runs/<warm-up run>/checkpoints/best.pt"):
        Trainer(tiny_config(tmp_path, config="benchmark/cbst"))
    with pytest.raises(ConfigError, match=r"unknown key 'method.target_wieght'; did you mean 'method.target_weight'"):
        Trainer(tiny_config(tmp_path, "method.target_wieght=2", "name=b", config="benchmark/cbst"))
    with pytest.raises(ConfigError, match=r"given_distribution: one value per class"):
        cfg, dataset = target_set(tmp_path, "pseudo_label.rule=dars", "pseudo_label.distribution=given")
        generate_pseudo_labels(PixelwiseModel(), dataset, cfg, tmp_path / "x", torch.device("cpu"), log=lambda _: None)


def test_rounds_follow_the_progressive_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "rounds", "benchmark/semi_supervised", *tiny_args(tmp_path, "name=ssl"),
        "rounds.labeling_ratios=[0.2,0.5]", "rounds.scale_growth=[0.2,0.5]", "rounds.iters=[2,1,1]",
    ]  # fmt: skip
    assert main(args) == 0
    cfg = load_config(tmp_path / "ssl" / "config.yaml")
    first, second = round_config(cfg, 1, Path("prev.pt")), round_config(cfg, 2, Path("prev.pt"))
    assert first.recipe == second.recipe == "self_training" and first.model.checkpoint == "prev.pt"
    scale = {t["name"]: t for t in second.data.train_transforms}["random_scale"]
    base = {t["name"]: t for t in cfg.data.train_transforms}["random_scale"]
    assert (scale["min"], scale["max"]) == pytest.approx((base["min"] * 0.8, base["max"] * 1.5))
    for index, ratio in ((1, 0.2), (2, 0.5)):
        summary = json.loads((tmp_path / "ssl" / f"round_{index}" / "pseudo_labels" / "summary.json").read_text())
        assert summary["rule"] == "dars" and summary["ratio"] == ratio
        assert load_checkpoint(tmp_path / "ssl" / f"round_{index}" / "checkpoints" / "last.pt")["iteration"] == 1
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing retrained
    assert capsys.readouterr().err.count("finished already") == 3
    assert [round_config(cfg, k, Path("prev.pt")).schedule.offset for k in range(3)] == [0, 0, 0]  # restart


def test_rounds_can_continue_one_poly_schedule_as_the_reference_does() -> None:
    cfg = load_config("benchmark/semi_supervised", ["rounds.iters=[200,300,300]", "rounds.schedule=continue"])
    rounds = [round_config(cfg, k, Path("prev.pt") if k else None) for k in range(3)]
    # equally many epochs per round: round k resumes epoch 200k of 200(k+1) in the reference
    assert [(r.schedule.offset, r.train.iters) for r in rounds] == [(0, 200), (300, 300), (600, 300)]
    with pytest.raises(ConfigError, match=r"rounds.schedule.*'restart' or 'continue'"):
        load_config("benchmark/semi_supervised", ["rounds.schedule=resume"])


# ------------------------------------------------------------- the DARS code's choices (issue 28, items 8-10)


class MirroredLogits(nn.Module):
    """Logits (4, 0) on the left half and (0, 2) on the right half of any image, whatever its content;
    the other classes far below. Flip averaging pairs each left pixel with a right one."""

    def forward(self, images: torch.Tensor) -> SegOutput:
        n, _, height, width = images.shape
        logits = torch.full((n, 19, height, width), -30.0)
        logits[:, 0, :, : width // 2], logits[:, 1, :, : width // 2] = 4.0, 0.0
        logits[:, 0, :, width // 2 :], logits[:, 1, :, width // 2 :] = 0.0, 2.0
        return SegOutput(logits, logits)


def test_dars_labels_by_default_from_the_float16_softmax_of_flip_averaged_logits(tmp_path: Path) -> None:
    rule = ["pseudo_label.rule=dars", "pseudo_label.ratio=0.5", "pseudo_label.distribution=predicted", "pseudo_label.flip=true"]
    summaries = {}
    for name, extra in {"default": [], "paper": ["pseudo_label.confidence_dtype=float32", "pseudo_label.average=probabilities"]}.items():
        cfg, dataset = target_set(tmp_path, *rule, *extra)
        summaries[name] = generate_pseudo_labels(MirroredLogits(), dataset, cfg, tmp_path / name, torch.device("cpu"), log=lambda _: None)
    default, paper = summaries["default"], summaries["paper"]
    assert (default["confidence_dtype"], default["average"]) == ("float16", "logits")
    assert (paper["confidence_dtype"], paper["average"]) == ("float32", "probabilities")
    # every pixel is class 0 with one confidence: softmax of the mean logits (2, 1), or the mean of the softmaxes
    assert default["thresholds"][0] == float(torch.tensor(1.0).sigmoid().half())  # 0.731 in float16
    assert paper["thresholds"][0] == pytest.approx((float(torch.tensor(4.0).sigmoid()) + float(torch.tensor(-2.0).sigmoid())) / 2, abs=2**-12)
    for summary in (default, paper):  # all pixels tie: half of them are kept at random
        assert summary["sampling_ratio"][0] == pytest.approx(0.5, abs=1e-3) and summary["density"] == pytest.approx(0.5, abs=0.01)


def test_the_labelling_key_changes_only_when_the_resolved_precision_or_averaging_does(tmp_path: Path) -> None:
    checkpoint = tmp_path / "w.pt"
    checkpoint.write_bytes(b"weights")
    def key(*overrides: str) -> dict:
        return pseudo_label_key(tiny_config(tmp_path, *overrides, config="benchmark/cbst"), checkpoint)["pseudo_label"]
    assert "confidence_dtype" not in key() and "average" not in key()  # cbst's labels of before the options stay valid
    assert key() == key("pseudo_label.confidence_dtype=float32", "pseudo_label.average=probabilities")
    dars = key("pseudo_label.rule=dars")
    assert (dars["confidence_dtype"], dars["average"]) == ("float16", "logits")
    assert dars == key("pseudo_label.rule=dars", "pseudo_label.confidence_dtype=float16", "pseudo_label.average=logits")
    assert "confidence_dtype" not in key("pseudo_label.rule=dars", "pseudo_label.confidence_dtype=float32")


class BatchNormNet(nn.Module):
    """1x1 convolution, BatchNorm, 1x1 classifier: the smallest network whose output depends on its batch."""

    aux_weight = 0.4

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.body, self.norm, self.classifier = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            for conv in (self.body, self.classifier):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))

    def forward(self, images: torch.Tensor) -> SegOutput:
        features = self.norm(self.body(images))
        return SegOutput(self.classifier(features), features)


def self_training_step(batch_norm: str | None, batches: dict) -> tuple[BatchNormNet, dict[str, torch.Tensor]]:
    model = BatchNormNet().train()
    overrides = ["recipe=self_training"] + ([f"method.batch_norm={batch_norm}"] if batch_norm else [])
    cfg = load_config(None, overrides)
    classes = ClassInfo("toy", ("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    recipe = SelfTraining(cfg, model, build_seg_loss(cfg.loss, ignore_index=255), classes)
    losses = recipe.training_step(batches, 1)
    losses["loss"].backward()
    return model, losses


def test_separate_forwards_normalise_each_batch_by_its_own_statistics_as_the_dars_code() -> None:
    generator = torch.Generator().manual_seed(0)
    def stream(shift: float) -> dict[str, torch.Tensor]:  # two domains with different feature statistics
        return {"image": torch.rand(2, 3, 6, 6, generator=generator) + shift, "label": torch.randint(0, 3, (2, 6, 6), generator=generator)}
    batches = {"source": stream(0.0), "target": stream(2.0)}
    separate, separate_losses = self_training_step(None, batches)  # the default
    joint, joint_losses = self_training_step("joint", batches)
    assert SelfTrainingOptions().batch_norm == "separate"

    with torch.no_grad():  # the pre-BatchNorm features of each batch, from the same initial weights
        body = BatchNormNet().body
        source_mean = body(batches["source"]["image"]).mean(dim=(0, 2, 3))
        target_mean = body(batches["target"]["image"]).mean(dim=(0, 2, 3))
        both = torch.cat([batches["source"]["image"], batches["target"]["image"]])
        joint_mean = body(both).mean(dim=(0, 2, 3))
    # separate: two BatchNorm updates per step (momentum 0.1), source then target; joint: one of both together
    assert torch.allclose(separate.norm.running_mean, 0.9 * (0.1 * source_mean) + 0.1 * target_mean, atol=1e-6)
    assert torch.allclose(joint.norm.running_mean, 0.1 * joint_mean, atol=1e-6)
    assert int(separate.norm.num_batches_tracked) == 2 and int(joint.norm.num_batches_tracked) == 1

    # the outputs differ: each loss equals a forward of its batch alone (separate) or of both (joint)
    loss = build_seg_loss(load_config(None).loss, ignore_index=255)
    with torch.no_grad():
        alone = loss(BatchNormNet().train()(batches["source"]["image"]).logits, batches["source"]["label"])
        together = loss(BatchNormNet().train()(both).logits[:2], batches["source"]["label"])
    assert float(separate_losses["loss_source"]) == pytest.approx(float(alone), rel=1e-6)
    assert float(joint_losses["loss_source"]) == pytest.approx(float(together), rel=1e-6)
    assert abs(float(alone) - float(together)) > 1e-3
    assert not torch.allclose(separate.body.weight.grad, joint.body.weight.grad, atol=1e-4)
    assert load_config("benchmark/dars_td").method == {} and load_config("benchmark/dars_paper").method == {"batch_norm": "joint"}
