"""BLV as the engine's segmentation loss (loss.name=blv) and the DACS recipe it is trained with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segadapt.config import RunConfig, SubsetSpec
from segadapt.engine.builders import build_dataset_from_spec
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.losses import COUNTS_FILE, BLVSegLoss, CrossEntropySegLoss, blv_class_counts, build_seg_loss
from segadapt.engine.run_cache import key_path
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError
from segadapt.methods.blv import blv_logits, blv_offsets

from data_fixtures import tiny_config


def make_trainer(monkeypatch: pytest.MonkeyPatch, cfg: RunConfig, resume: bool = False) -> Trainer:
    return Trainer(cfg, resume=resume, log=lambda _: None)


def config(tmp_path: Path, name: str, *extra: str, path: str = "benchmark/source_only") -> RunConfig:
    return tiny_config(tmp_path, f"name={name}", *extra, config=path)


def test_blv_with_sigma_zero_is_cross_entropy_in_a_training_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ce = make_trainer(monkeypatch, config(tmp_path, "ce", "train.iters=1"))
    blv = make_trainer(monkeypatch, config(tmp_path, "blv", "train.iters=1", "loss.name=blv", "loss.blv.sigma=0"))
    assert isinstance(blv.recipe.seg_loss, BLVSegLoss) and type(ce.recipe.seg_loss) is CrossEntropySegLoss
    ce_losses, blv_losses = ce._step(ce._loaders()), blv._step(blv._loaders())
    assert ce_losses["loss"] == blv_losses["loss"]
    for key, value in ce.recipe.model.state_dict().items():
        assert torch.equal(blv.recipe.model.state_dict()[key], value), key


def test_noise_is_drawn_in_training_only_and_follows_the_offsets() -> None:
    counts = [1000.0, 100.0, 10.0]
    loss = BLVSegLoss(counts, sigma=4.0, ignore_index=255)
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (2, 8, 10), generator=torch.Generator().manual_seed(2))
    labels[0, 0] = 255
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    plain = F.cross_entropy(up, labels, ignore_index=255)

    torch.manual_seed(7)
    noisy = loss.train()(logits, labels)
    torch.manual_seed(7)
    expected = F.cross_entropy(blv_logits(up, blv_offsets(counts), 4.0), labels, ignore_index=255)
    assert torch.equal(noisy, expected) and noisy != plain
    assert loss.eval()(logits, labels) == plain  # evaluation is noise-free
    # the variation raises the rare classes' logits: a head-class pixel costs more, on average
    head = torch.zeros(1, 8, 10, dtype=torch.long)
    zeros = torch.zeros(1, 3, 8, 10)
    assert loss.train()(zeros, head) > F.cross_entropy(zeros, head) + 0.3


def test_temporal_sigma_rises_to_t_mid_then_falls_and_the_trainer_loss_follows_train_eval() -> None:
    loss = BLVSegLoss([3.0, 1.0], sigma=6.0, ignore_index=255, t_mid=30, total_iters=40)
    sigmas = []
    for iteration in (0, 15, 30, 35, 40):
        loss.set_iteration(iteration)
        sigmas.append(loss.sigma)
    assert sigmas == [0.0, 3.0, 6.0, 3.0, 0.0]
    loss.set_iteration(0)
    logits, labels = torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)
    assert loss.train()(logits, labels) == F.cross_entropy(logits, labels)  # sigma(0) = 0
    with pytest.raises(ConfigError, match=r"loss.blv.t_mid=50 must lie in \[0, train.iters=40\]"):
        BLVSegLoss([1.0, 1.0], sigma=6.0, ignore_index=255, t_mid=50, total_iters=40)


def test_weighted_loss_is_the_dacs_mean_over_all_pixels() -> None:
    logits, labels = torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 255]]])
    weight = torch.tensor([[[1.0, 0.5, 0.0, 1.0]]]).view(1, 2, 2)
    pixelwise = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert torch.allclose(CrossEntropySegLoss(255)(logits, labels, weight=weight), (weight * pixelwise).sum() / 4)


def test_class_counts_from_source_labeled_pseudo_and_given(tmp_path: Path) -> None:
    cfg = config(tmp_path, "counts", "loss.name=blv")
    source = build_dataset_from_spec(cfg.data.source, with_labels=True)
    expected = sum(torch.bincount(torch.from_numpy(source.load_label(i).astype(np.int64)).flatten(), minlength=256)[:19]
                   for i in range(len(source)))  # fmt: skip
    counts = blv_class_counts(cfg, 19)
    assert counts.tolist() == expected.double().tolist()
    cached = json.loads((cfg.run_dir / COUNTS_FILE).read_text())
    assert cached["counts"] == counts.tolist()
    assert json.loads(key_path(cfg.run_dir / COUNTS_FILE).read_text())["loss.blv.class_counts"] == "source"
    cached["counts"][0] = 1.0  # a reused cache is read, not recounted
    (cfg.run_dir / COUNTS_FILE).write_text(json.dumps(cached))
    assert blv_class_counts(cfg, 19)[0] == 1.0
    half = cfg.data.source.model_copy(update={"subset": SubsetSpec(ratio=0.5)})  # other data counted: recounted
    lines: list[str] = []
    recounted = blv_class_counts(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": half})}), 19, lines.append)
    assert "changed: data.source" in lines[0] and recounted[0] != 1.0 and recounted.sum() < counts.sum()

    with pytest.raises(ConfigError, match=r"class_counts=labeled counts the labelled part .* use loss.blv.class_counts=source"):
        blv_class_counts(config(tmp_path, "l1", "loss.name=blv", "loss.blv.class_counts=labeled"), 19)
    labeled = config(tmp_path, "l2", "loss.name=blv", "loss.blv.class_counts=labeled", path="benchmark/semi_supervised")
    subset = build_dataset_from_spec(labeled.data.source, with_labels=True)
    manual = torch.zeros(19, dtype=torch.float64)
    for i in range(len(subset)):
        label = torch.from_numpy(subset.load_label(i).astype(np.int64)).flatten()
        manual += torch.bincount(label[label != 255], minlength=19).double()
    assert blv_class_counts(labeled, 19).tolist() == manual.tolist()

    with pytest.raises(ConfigError, match=r"set data.target.pseudo_labels=DIR"):
        blv_class_counts(config(tmp_path, "p1", "loss.name=blv", "loss.blv.class_counts=pseudo"), 19)
    folder = tmp_path / "pseudo"
    folder.mkdir()
    target = build_dataset_from_spec(cfg.data.target, with_labels=False)
    for k, name in enumerate(target.names):
        label = np.full((32, 64), 255, np.uint8)
        label[:, : 8 * (k + 1)] = 4  # 256, 512, 768, 1024 pixels of class 4
        label[0, 0] = 18
        Image.fromarray(label).save(folder / f"{name}.png")
    pseudo = config(tmp_path, "p2", "loss.name=blv", "loss.blv.class_counts=pseudo", f"data.target.pseudo_labels={folder}")
    counts = blv_class_counts(pseudo, 19)
    assert counts[4] == 256 * 10 - 4 and counts[18] == 4 and counts.sum() == 2560

    given = config(tmp_path, "g", "loss.name=blv", "loss.blv.class_counts=given", f"loss.blv.given_counts={list(range(1, 20))}")
    assert blv_class_counts(given, 19).tolist() == list(map(float, range(1, 20)))
    with pytest.raises(ConfigError, match=r"given_counts has 19 values but the data has 3 classes"):
        blv_class_counts(given, 3)
    loss = build_seg_loss(given.loss, 255, run=given, num_classes=19)
    assert torch.allclose(loss.offsets, blv_offsets(list(range(1, 20))))


def test_config_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"schedule=temporal needs loss.blv.t_mid"):
        config(tmp_path, "x", "loss.name=blv", "loss.blv.schedule=temporal")
    with pytest.raises(ConfigError, match=r"class_counts=given needs loss.blv.given_counts"):
        config(tmp_path, "x", "loss.name=blv", "loss.blv.class_counts=given")
    with pytest.raises(ConfigError, match=r"unknown key 'loss.blv.sigam'; did you mean 'loss.blv.sigma'"):
        config(tmp_path, "x", "loss.blv.sigam=4")
    with pytest.raises(ConfigError, match=r"needs the run config"):
        build_seg_loss(config(tmp_path, "x", "loss.name=blv").loss, 255)


def test_dacs_blv_trains_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = [  # a constant learning rate and teacher momentum: the poly schedule and the time-constant rule depend on
        # train.iters, which the resume raises
        "schedule.name=constant", "loss.blv.sigma=4", "method.ema_momentum=0.99",
        "data.train_transforms=[{name: random_crop, size: [24, 48]}, {name: random_horizontal_flip}]",
    ]
    straight = make_trainer(monkeypatch, config(tmp_path, "straight", "train.iters=3", *common, path="benchmark/dacs_blv"))
    straight.fit()
    first = config(tmp_path, "resumed", "train.iters=2", *common, path="benchmark/dacs_blv")
    make_trainer(monkeypatch, first).fit()
    resumed = make_trainer(monkeypatch, first.model_copy(update={"train": first.train.model_copy(update={"iters": 3})}), resume=True)
    resumed.fit()

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["iteration"] == b["iteration"] == 3
    for key, value in a["recipe"].items():  # student, EMA teacher and the BLV offsets
        assert torch.equal(b["recipe"][key], value), key
    assert any(key.startswith("teacher.") for key in a["recipe"]) and "seg_loss.offsets" in a["recipe"]
    assert resumed.recipe.teacher.momentum == pytest.approx(min(1 - 1 / 4, 0.99))  # DACS's warm-up after 3 steps
    records = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["pseudo_weight"] <= 1.0 and math.isfinite(r["loss_mix"]) for r in records)
