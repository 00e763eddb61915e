"""BiCL (ECCV 2022, docs/bicl.md): prototypes, contrastive losses, dynamic/hybrid labels, weighted sampling, the recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError
from segadapt.methods.bicl import (
    PrototypeMemory,
    class_sampling_probabilities,
    domain_biases,
    dynamic_pseudo_labels,
    entropy_loss,
    hybrid_pseudo_labels,
    occurrence_table,
    pixel_prototype_contrastive_loss,
    sample_source_indices,
    self_distillation_loss,
)

from data_fixtures import tiny_args, tiny_config


def test_prototype_memory_momentum_arithmetic() -> None:
    memory = PrototypeMemory(num_classes=3, dim=2, momentum=0.9)
    # class 0: two pixels [3, 4] and [0, 2] -> normalised [0.6, 0.8], [0, 1] -> mean [0.3, 0.9]
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [5.0, 5.0]])
    memory.update(features, torch.tensor([0, 0, 1, 255]))
    assert torch.allclose(memory.prototypes, torch.tensor([[0.3, 0.9], [1.0, 0.0], [0.0, 0.0]]))
    assert memory.initialized.tolist() == [True, True, False]
    memory.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))  # only class 0 moves
    assert torch.allclose(memory.prototypes[0], torch.tensor([0.9 * 0.3, 0.9 * 0.9 + 0.1]))
    assert torch.equal(memory.prototypes[1], torch.tensor([1.0, 0.0]))
    # [N, D, h, w] maps are the same pixels
    memory2 = PrototypeMemory(3, 2, momentum=0.9)
    memory2.update(features.t().reshape(1, 2, 2, 2), torch.tensor([[[0, 0], [1, 255]]]))
    assert torch.allclose(memory2.prototypes, torch.tensor([[0.3, 0.9], [1.0, 0.0], [0.0, 0.0]]))


def test_contrastive_loss_by_hand_on_three_pixels() -> None:
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])  # normalised: e1, e2, -e1
    features = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 255])
    tau = 0.5
    c = 1 / math.sqrt(2)
    pixel0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(-1 / tau)))
    pixel1 = -math.log(math.exp(c / tau) / (math.exp(c / tau) + math.exp(c / tau) + math.exp(-c / tau)))
    loss = pixel_prototype_contrastive_loss(features, labels, prototypes, tau)
    assert float(loss) == pytest.approx((pixel0 + pixel1) / 2, rel=1e-5)
    # a class without a prototype is neither a positive nor a negative
    available = torch.tensor([True, True, False])
    pixel0_without = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    loss = pixel_prototype_contrastive_loss(features[:1], labels[:1], prototypes, tau, available)
    assert float(loss) == pytest.approx(pixel0_without, rel=1e-5)
    # gradients reach the features, never the (memory) prototypes
    features.requires_grad_(True)
    prototypes.requires_grad_(True)
    pixel_prototype_contrastive_loss(features, labels, prototypes, tau).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0 and prototypes.grad is None


def test_dynamic_labels_threshold_and_calibration_on_hand_made_prototypes() -> None:
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])  # the target domain's classes sit rotated
    # pixel a lies on target class 0, pixel b on the source prototype of class 1, pixel c in between
    pixels = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 1.0]]).t().reshape(1, 2, 1, 3)
    tau = 0.1

    labels, confidence = dynamic_pseudo_labels(pixels, source, tau, threshold=0.7)
    scores = F.normalize(pixels.reshape(2, 3).t(), dim=1) @ source.t() / tau
    assert torch.allclose(confidence.flatten(), scores.softmax(1).max(1).values)
    # uncalibrated: a -> class 1 (cos 0.8 vs 0.6: p = 0.88), b -> 1, c is a tie (p = 0.5 < T)
    assert labels.flatten().tolist() == [1, 1, 255]

    biases = domain_biases(source, target)
    assert torch.allclose(biases, target - source)
    labels, confidence = dynamic_pseudo_labels(pixels, source, tau, threshold=0.7, biases=biases)
    calibrated = F.normalize(F.normalize(pixels.reshape(2, 3).t(), dim=1).unsqueeze(1) - biases.unsqueeze(0), dim=2)
    scores = (calibrated * source.unsqueeze(0)).sum(2) / tau
    assert torch.allclose(confidence.flatten(), scores.softmax(1).max(1).values)
    assert labels.flatten()[0] == 0  # calibration moves a back to the class it belongs to in the target domain
    assert labels.flatten().tolist() == [int(k) if p >= 0.7 else 255 for p, k in zip(*scores.softmax(1).max(1))]

    # the threshold T is inclusive and bounds the label-transfer probability
    p_a = float(F.softmax(torch.tensor([0.6, 0.8]) / tau, 0)[1])
    assert dynamic_pseudo_labels(pixels[..., :1], source, tau, threshold=p_a - 1e-6)[0].item() == 1
    assert dynamic_pseudo_labels(pixels[..., :1], source, tau, threshold=p_a + 1e-6)[0].item() == 255
    # a class without a source prototype is never assigned
    only0 = dynamic_pseudo_labels(pixels, source, tau, threshold=0.0, available=torch.tensor([True, False]))[0]
    assert only0.flatten().tolist() == [0, 0, 0]


def test_hybrid_rule_unites_the_labels_and_resolves_conflicts() -> None:
    static = torch.tensor([0, 255, 1, 2, 255])
    dynamic = torch.tensor([255, 3, 1, 0, 255])
    assert hybrid_pseudo_labels(static, dynamic).tolist() == [0, 3, 1, 255, 255]
    assert hybrid_pseudo_labels(static, dynamic, "static").tolist() == [0, 3, 1, 2, 255]
    assert hybrid_pseudo_labels(static, dynamic, "dynamic").tolist() == [0, 3, 1, 0, 255]


def test_weighted_sampling_on_a_hand_made_occurrence_table() -> None:
    labels = [torch.tensor([[0, 0], [1, 255]]), torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 2], [2, 2]]), torch.tensor([[0, 0], [0, 1]])]
    table = occurrence_table(labels, num_classes=4)
    assert table.int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]]
    # p = [1, 1/2, 1/4, 0] -> inverse [1, 2, 4] over the classes that occur; class 3 has no image
    probabilities = class_sampling_probabilities(table)
    assert probabilities.tolist() == pytest.approx([1 / 7, 2 / 7, 4 / 7, 0.0])
    draws = sample_source_indices(table, 14000, torch.Generator().manual_seed(0))
    frequency = torch.bincount(draws, minlength=4).double() / draws.numel()
    # image 2 is the only one with class 2: P(2) + P(0)/4; images 0 and 3 share class 1's half
    expected = torch.tensor([1 / 28 + 1 / 7, 1 / 28, 1 / 28 + 4 / 7, 1 / 28 + 1 / 7], dtype=torch.float64)
    assert torch.allclose(frequency, expected, atol=0.015)
    again = sample_source_indices(table, 14000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_self_distillation_and_entropy_values() -> None:
    student, teacher = torch.zeros(1, 2, 1, 1), torch.tensor([[[[math.log(3.0)]], [[0.0]]]])  # q_t = [3/4, 1/4]
    total, kl = self_distillation_loss(student, teacher, torch.tensor(1.0))
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kl) == pytest.approx(expected, rel=1e-5) and float(total) == pytest.approx(1 + expected, rel=1e-5)
    assert float(entropy_loss(torch.zeros(1, 4, 2, 2))) == pytest.approx(1.0)  # uniform: normalised entropy 1
    assert float(entropy_loss(torch.tensor([[[[50.0]], [[0.0]]]]))) == pytest.approx(0.0, abs=1e-6)


def run_args(tmp_path: Path, name: str, config: str, *extra: str) -> list[str]:
    crop = "data.train_transforms=[{name: random_crop, size: [24, 48]}, {name: random_horizontal_flip}]"
    return ["train", config, *tiny_args(tmp_path, f"name={name}", "schedule.name=constant", crop, *extra)]


def test_bicl_dynamic_trains_and_resumes_exactly(tmp_path: Path) -> None:
    # the recipe's own source sampler must resume exactly too; dynamic labels alone, no static labels read
    weighted, alone = "method.weighted_sampling=true", "method.target_ce_labels=same"
    assert main(run_args(tmp_path, "straight", "benchmark/bicl_dynamic", "train.iters=3", weighted, alone)) == 0
    assert main(run_args(tmp_path, "resumed", "benchmark/bicl_dynamic", "train.iters=2", weighted, alone)) == 0
    assert main(run_args(tmp_path, "resumed", "benchmark/bicl_dynamic", "train.iters=3", "resume=true", weighted, alone)) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["iteration"] == b["iteration"] == 3
    for key, value in a["recipe"].items():  # network and both prototype memories
        assert torch.equal(b["recipe"][key], value), key
    assert b["recipe"]["source_memory.initialized"].any()
    records = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2, 3]
    for record in records:  # the target ground truth is read for the measurement only
        assert 0.0 <= record["label_density"] <= 1.0 and {"loss_fc", "loss_bc", "loss_ent_target"} <= record.keys()
    saved = load_config(tmp_path / "resumed" / "config.yaml")
    assert saved.data.target.with_labels is False and saved.data.target.pseudo_labels is None
    # every recipe option is written out, defaults included, so a later default change cannot alter the run
    assert saved.method["labels"] == "dynamic" and saved.method["weighted_sampling"] is True
    # the benchmark's 0.999 over BiCL's 100,000 iterations, scaled to this 3-iteration run, as a number
    assert saved.method["prototype_momentum"] == pytest.approx(0.999 ** (100000 / 3)) and saved.method["threshold"] == 0.7


def test_bicl_hybrid_uses_the_static_cbst_labels(tmp_path: Path) -> None:
    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=warmup", "train.iters=1")]) == 0
    warmup = tmp_path / "warmup" / "checkpoints" / "last.pt"
    with pytest.raises(ConfigError, match=r"method.labels=hybrid uses static \(CBST\) pseudo labels .* set model.checkpoint="):
        Trainer(tiny_config(tmp_path, "name=x", config="benchmark/bicl_hybrid"))
    args = run_args(tmp_path, "hybrid", "benchmark/bicl_hybrid", "train.iters=2", f"model.checkpoint={warmup}", "method.threshold=0")
    assert main(args) == 0
    run = tmp_path / "hybrid"
    assert (run / "pseudo_labels" / "summary.json").is_file()
    assert load_config(run / "config.yaml").data.target.pseudo_labels is None  # the run as asked; resume reuses the labels
    records = [r for r in read_metrics(run) if "loss" in r]
    # T = 0 labels every pixel with a source prototype: the union is (nearly) dense, and it is measured
    assert all(r["label_density"] > 0.5 and 0.0 <= r["label_accuracy"] <= 1.0 for r in records)
    with pytest.raises(ConfigError, match=r"unknown key 'method.lambda_cf'; did you mean 'method.lambda_fc'"):
        Trainer(tiny_config(tmp_path, "name=y", "method.lambda_cf=1", config="benchmark/bicl_dynamic"))


def test_label_kinds_feed_the_contrastive_learning_and_the_target_ce_keeps_the_static_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BiCL supplement Tab. 1-2: static / dynamic / hybrid are the labels of the contrastive learning (L_FC, L_BC,
    the target memory); the CCM baseline's target cross-entropy keeps its CBST labels (``target_ce_labels: static``)."""
    import segadapt.engine.recipes.bicl as bicl_recipe

    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=warmup", "train.iters=1")]) == 0
    warmup = tmp_path / "warmup" / "checkpoints" / "last.pt"
    with pytest.raises(ConfigError, match=r"method.target_ce_labels=static \(the baseline's cross-entropy\) uses static \(CBST\)"):
        Trainer(tiny_config(tmp_path, "name=x", config="benchmark/bicl_dynamic"))
    seen: dict[str, torch.Tensor] = {}
    contrastive = bicl_recipe.pixel_prototype_contrastive_loss
    baseline = bicl_recipe.baseline_losses

    def spy_contrastive(features: torch.Tensor, labels: torch.Tensor, *args: object) -> torch.Tensor:
        seen.setdefault("contrastive", labels)  # the first call is L_FC, on the target grid
        return contrastive(features, labels, *args)

    def spy_baseline(options, supervised, source, source_labels, target, target_labels):  # type: ignore[no-untyped-def]
        seen["ce"] = target_labels
        return baseline(options, supervised, source, source_labels, target, target_labels)

    monkeypatch.setattr(bicl_recipe, "pixel_prototype_contrastive_loss", spy_contrastive)
    monkeypatch.setattr(bicl_recipe, "baseline_losses", spy_baseline)
    for mode in ("static", "same"):
        cfg = tiny_config(tmp_path, f"name=dyn_{mode}", f"model.checkpoint={warmup}", f"method.target_ce_labels={mode}",
                          "method.threshold=0", config="benchmark/bicl_dynamic")  # fmt: skip
        trainer = Trainer(cfg, log=lambda _: None)
        batches = {name: next(loader) for name, loader in trainer._loaders().items()}
        seen.clear()
        trainer.recipe.train()
        trainer.recipe.training_step(batches, 0)
        dynamic = bicl_recipe.resize_labels(seen["contrastive"], tuple(seen["ce"].shape[-2:]))
        if mode == "static":  # the CE trains on the CBST labels read from the pseudo-label folder ...
            assert torch.equal(seen["ce"], batches["target"]["label"])
            assert (trainer.run_dir / "pseudo_labels" / "summary.json").is_file()
            assert not torch.equal(seen["ce"], dynamic)  # ... while L_FC uses the dynamic labels (T = 0: dense)
        else:  # former reading: the CE on the dynamic labels themselves
            assert "label" not in batches["target"]
            assert torch.equal(bicl_recipe.resize_labels(seen["ce"], tuple(seen["contrastive"].shape[-2:])), seen["contrastive"])


def test_self_distillation_kl_averages_over_valid_pixels_only() -> None:
    teacher = torch.zeros(1, 2, 1, 2)
    teacher[0, 0, 0, 0] = math.log(3.0)  # pixel 0: q_t = [3/4, 1/4]; pixel 1: uniform
    student = torch.zeros(1, 2, 1, 2)
    student[0, 1, 0, 1] = 5.0  # pixel 1 disagrees strongly but is padding
    valid = torch.tensor([[[True, False]]])
    _, kl = self_distillation_loss(student, teacher, torch.tensor(0.0), valid=valid)
    assert float(kl) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    with pytest.raises(Exception, match=r"valid \(1, 2\) must be \[N, h, w\]"):
        self_distillation_loss(student, teacher, torch.tensor(0.0), valid=torch.ones(1, 2, dtype=torch.bool))


def test_bicl_distill_minimises_eq2_with_the_teachers_cbst_labels(tmp_path: Path) -> None:
    assert main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=teacher", "train.iters=2")]) == 0
    teacher = tmp_path / "teacher" / "checkpoints" / "last.pt"
    teacher_state = {k: v.clone() for k, v in load_checkpoint(teacher)["model"].items()}
    with pytest.raises(ConfigError, match=r"set method.teacher=runs/<bicl run>/checkpoints/last.pt"):
        Trainer(tiny_config(tmp_path, "name=x", config="benchmark/bicl_distill"))
    assert main(run_args(tmp_path, "kd", "benchmark/bicl_distill", "train.iters=2", f"method.teacher={teacher}")) == 0
    run = tmp_path / "kd"
    summary = json.loads((run / "pseudo_labels" / "summary.json").read_text())
    assert summary["rule"] == "cbst" and summary["ratio"] == 0.5  # the teacher's static labels, made before training
    assert load_config(run / "config.yaml").data.target.pseudo_labels is None  # the run as asked; resume reuses the labels
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert not any(k.startswith("teacher") for k in saved["recipe"])  # the teacher stays out of checkpoints
    assert all(torch.equal(v, load_checkpoint(teacher)["model"][k]) for k, v in teacher_state.items())
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len(rows) == 2 and all(r["loss_kd"] >= 0 for r in rows)

    # one step by hand: L_KD = CE_S + CE_T(teacher's labels) + 0.4 (H_S + H_T) + KL(q_t || q_s) over image pixels
    config = load_config(run / "config.yaml", ["name=kd2", "method.kl_weight=2.0"])
    trainer = Trainer(config)
    batches = {k: next(loader) for k, loader in trainer._loaders().items()}
    recipe = trainer.recipe.train()
    assert recipe.teacher.network.training is False
    losses = recipe.training_step(batches, 0)
    source, target = batches["source"], batches["target"]
    with torch.no_grad():
        student = recipe.model(torch.cat([source["image"], target["image"]])).logits
        s_source, s_target = student.split([len(source["image"]), len(target["image"])])
        t_target = recipe.teacher(target["image"]).logits
    ce = torch.nn.functional.cross_entropy
    expected_base = (
        ce(F.interpolate(s_source, source["label"].shape[-2:], mode="bilinear", align_corners=False), source["label"], ignore_index=255)
        + ce(F.interpolate(s_target, target["label"].shape[-2:], mode="bilinear", align_corners=False), target["label"], ignore_index=255)
        + 0.4 * (entropy_loss(s_source) + entropy_loss(s_target))
    )
    log_t = F.log_softmax(t_target, 1)
    kl_map = (log_t.exp() * (log_t - F.log_softmax(s_target, 1))).sum(1)
    assert losses["loss_kd"].item() == pytest.approx(kl_map.mean().item(), rel=1e-4)  # random crops inside the image: no padding
    assert losses["loss"].item() == pytest.approx((expected_base + 2.0 * kl_map.mean()).item(), rel=1e-4)
    assert (target["label"] != 255).any() and (target["label"] == 255).any()  # CBST keeps part of each class
