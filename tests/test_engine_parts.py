"""Engine building blocks: resumable sampling, schedules, atomic checkpoints, EMA, inference."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segadapt.config import EvalConfig, ScheduleConfig
from segadapt.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from segadapt.engine.inference import predict_probs
from segadapt.engine.sampling import ResumableStreamSampler, SeededTransformDataset
from segadapt.engine.schedule import build_scheduler, lr_factor
from segadapt.errors import CheckpointError
from segadapt.methods.ema import ModelEMA
from segadapt.models.base import SegOutput


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_stream_is_a_function_of_position() -> None:
    full = take(iter(ResumableStreamSampler(7, seed=3)), 30)
    resumed = take(iter(ResumableStreamSampler(7, seed=3, start=11)), 19)
    assert resumed == full[11:]
    # every epoch is a permutation, and epochs differ
    epochs = [sorted(i for i, _ in full[e * 7 : (e + 1) * 7]) for e in range(4)]
    assert all(epoch == list(range(7)) for epoch in epochs)
    assert [i for i, _ in full[:7]] != [i for i, _ in full[7:14]]
    assert len({seed for _, seed in full}) == 30  # one augmentation seed per position


def test_ranks_partition_the_stream() -> None:
    full = take(iter(ResumableStreamSampler(5, seed=0)), 12)
    rank0 = take(iter(ResumableStreamSampler(5, seed=0, rank=0, world_size=2)), 6)
    rank1 = take(iter(ResumableStreamSampler(5, seed=0, rank=1, world_size=2)), 6)
    assert rank0 == full[0::2] and rank1 == full[1::2]


def test_unshuffled_stream_visits_in_order() -> None:
    assert [i for i, _ in take(iter(ResumableStreamSampler(3, seed=0, shuffle=False)), 5)] == [0, 1, 2, 0, 1]


def test_seeded_transform_gets_a_generator_from_the_sample_seed() -> None:
    def transform(sample, generator):
        return {"value": torch.rand(1, generator=generator).item()}

    data = SeededTransformDataset([{}, {}], transform)
    assert data[(0, 5)] == data[(1, 5)]
    assert data[(0, 5)] != data[(0, 6)]


def test_poly_schedule_with_warmup() -> None:
    cfg = ScheduleConfig(name="poly", power=0.9, warmup_iters=10, warmup_start_factor=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx((1 - 0.05) ** 0.9 * 0.55)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100, cfg) == 0.0
    assert lr_factor(50, 100, ScheduleConfig(name="cosine")) == pytest.approx(0.5)
    assert lr_factor(99, 100, ScheduleConfig(name="constant")) == 1.0


def test_scheduler_keeps_group_ratios_and_resumes() -> None:
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]

    def make():
        return torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 10.0}])

    optimizer = make()
    scheduler = build_scheduler(optimizer, 10, ScheduleConfig(power=1.0))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.6, 6.0])
    other = make()
    resumed = build_scheduler(other, 10, ScheduleConfig(power=1.0))
    other.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    other.step()
    resumed.step()
    assert [g["lr"] for g in other.param_groups] == pytest.approx([0.5, 5.0])


def test_scheduler_with_an_offset_is_the_tail_of_the_longer_schedule() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    # 200 iterations already done by an earlier stage, 200 in this run: starts at (1 - 200/400)^0.9
    scheduler = build_scheduler(optimizer, 200, ScheduleConfig(power=0.9, warmup_iters=50, offset=200))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5**0.9)  # no warm-up: it was the first stage's
    for _ in range(100):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_factor(300, 400, ScheduleConfig(power=0.9)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25**0.9)


def test_atomic_save_never_leaves_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(2)}, "iteration": 1}, path)
    # a writer killed mid-save: the previous file must survive intact
    code = (
        "import os, signal, torch\n"
        "from segadapt.engine.checkpoint import atomic_save\n"
        "class Bomb:\n"
        "    def __reduce__(self):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_save({{'model': {{'w': torch.zeros(2)}}, 'x': [torch.zeros(10**6), Bomb()]}}, {str(path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # the torn temp file, never last.pt


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{bad}.*cannot be read"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="not a segadapt checkpoint"):
        load_checkpoint(tmp_path / "raw.pt")


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_ema_update_and_buffers() -> None:
    net = nn.BatchNorm1d(2)
    ema = ModelEMA(net, momentum=0.9)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.running_mean.fill_(5.0)
    ema.update(net)
    assert torch.allclose(ema.module.weight, torch.full((2,), 1.1))
    assert torch.equal(ema.module.running_mean, net.running_mean)
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError, match="momentum"):
        ModelEMA(net, momentum=1.0)


class PointwiseNet(nn.Module):
    """A 1x1-conv model at stride 1: window and flip invariant, so inference variants must agree."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images: torch.Tensor) -> SegOutput:
        logits = self.conv(images)
        return SegOutput(logits, logits)


def test_inference_variants_agree_for_a_pointwise_model() -> None:
    model = PointwiseNet().eval()
    images = torch.rand(2, 3, 20, 30)
    plain = predict_probs(model, images)
    assert plain.shape == (2, 4, 20, 30)
    assert torch.allclose(plain.sum(1), torch.ones(2, 20, 30))
    assert torch.allclose(predict_probs(model, images, cfg=EvalConfig(flip=True)), plain, atol=1e-6)
    assert torch.allclose(predict_probs(model, images, cfg=EvalConfig(sliding_window=(8, 12))), plain, atol=1e-6)


def test_inference_resizes_input_and_output() -> None:
    model = PointwiseNet().eval()
    images = torch.rand(1, 3, 16, 16)
    probs = predict_probs(model, images, out_size=(32, 32), cfg=EvalConfig(size=(8, 8), scales=[1.0, 2.0]))
    assert probs.shape == (1, 4, 32, 32)
    assert torch.allclose(probs.sum(1), torch.ones(1, 32, 32), atol=1e-5)


def test_a_method_head_optimiser_steps_its_group_by_its_own_rule_and_resumes() -> None:
    """``optim.method_head_optimizer``: AdamW for the network, SGD (CPSL Sec. 4.1) for a method's head."""
    from segadapt.config import OptimConfig
    from segadapt.engine.builders import CombinedOptimizer, build_optimizer
    from segadapt.engine.recipes.cpsl import _SegmentationWithHead
    from segadapt.methods.cpsl import SelfLabelingHead
    from segadapt.models import create_model

    def build(seed: int, which: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        wrapper = _SegmentationWithHead(create_model("small", num_classes=3, width=4, feature_dim=8), SelfLabelingHead(3, 8))
        cfg = OptimConfig(name="adamw", lr=1e-3, head_lr_mult=5.0, momentum=0.9, weight_decay=1e-4, method_head_optimizer=which)
        return wrapper, build_optimizer(wrapper, cfg)

    def step(wrapper: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        out = wrapper.model(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
        loss = out.logits.square().mean() + wrapper.head(out.features).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    same_wrapper, same = build(0, "same")
    assert not isinstance(same, CombinedOptimizer) and [g["name"] for g in same.param_groups] == ["backbone", "head"]
    assert same.param_groups[1]["params"][-1] is same_wrapper.head.prototypes  # one head group, as before the option
    wrapper, combined = build(0, "sgd")
    assert isinstance(combined, CombinedOptimizer) and [g["name"] for g in combined.param_groups] == ["backbone", "head", "method_head"]
    before = wrapper.head.prototypes.detach().clone()
    step(wrapper, combined)
    grad = wrapper.head.prototypes.grad
    # SGD's first step: p - lr * (grad + wd * p) (the momentum buffer starts at the gradient)
    assert torch.allclose(wrapper.head.prototypes.detach(), before - 5e-3 * (grad + 1e-4 * before), atol=1e-7)
    step(same_wrapper, same)
    for mine, reference in zip(wrapper.model.parameters(), same_wrapper.model.parameters()):
        assert torch.equal(mine, reference)  # the network is still AdamW's, step for step
    # a scheduler scales every group; the state dict resumes both optimisers exactly
    scheduler = build_scheduler(combined, 10, ScheduleConfig(name="poly", power=1.0))
    scheduler.step()
    assert [g["lr"] for g in combined.param_groups] == pytest.approx([0.9e-3, 4.5e-3, 4.5e-3])
    saved = copy.deepcopy(combined.state_dict())  # as a checkpoint on disk: the live state moves on
    saved_weights = {k: v.clone() for k, v in wrapper.state_dict().items()}
    step(wrapper, combined)
    resumed_wrapper, resumed = build(1, "sgd")
    resumed_wrapper.load_state_dict(saved_weights)
    resumed.load_state_dict(saved)
    step(resumed_wrapper, resumed)
    for p, q in zip(resumed_wrapper.parameters(), wrapper.parameters()):
        assert torch.equal(p, q)  # AdamW moments and SGD momentum buffer both came back
    with pytest.raises(ValueError, match="method_head_optimizer the run was started with"):
        resumed.load_state_dict(same.state_dict())
