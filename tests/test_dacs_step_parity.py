"""One DACS/DAFormer training step replayed against the authors' code (issue 28, step parity).

``tests/fixtures/parity/dacs_step.pt``, ``dacs_step_jitter.pt`` and ``dacs_step_fdist.pt`` each hold one step of
lhoyer/DAFormer's ``DACS.forward_train`` on a tiny network and a 2-image 32x48 batch, with every
random draw it made (the two augmentation coins, ClassMix's class choices, kornia's jitter factors
and order, the blur sigmas, the torch RNG state of each student forward's dropout masks); the
first step skips the jitter, the second applies it, the third adds DAFormer's ImageNet feature
distance (segadapt's network the run starts from standing for the ImageNet network). The script
``tests/fixtures/parity/scripts/dacs_step.py`` ran the authors' code and says how to
regenerate them. The replay drives segadapt's ``dacs`` recipe with the same weights, batch and
draws and asserts the teacher's EMA update, the pseudo labels and their weight, the mixed batch,
every loss term, every parameter's gradient and the BatchNorm statistics the step leaves.

Tolerance: 1e-5 relative, per tensor, against the largest magnitude of the authors' tensor
(``max |ours - theirs| <= 1e-5 max |theirs|``). The authors' code mixes and blurs normalised
images and jitters them de-normalised and normalised again; segadapt mixes, jitters and blurs
``[0, 1]`` images and normalises in the network: the same maths in another order, which moves
float32 results by about 1e-7 (measured: the loss terms equal, the gradients within 1.0e-6).

The draws enter where segadapt makes them (:class:`RecordedDraws`, in place of the transforms'
``_coin``, ``_uniform_in`` and ``_randperm``), and each student forward starts from the torch RNG
state the authors' forward started from, so both drop the same channels.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.config import load_config
from segadapt.data.classes import ClassInfo
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes.dacs import DACS
from segadapt.models.base import EncoderDecoder, Normalization, SegmentationModel, SegOutput

from step_parity import BLUR_SIGMA_RANGE, DACS_AUTHORS_STEP, JITTER_RANGES, RecordedDraws, assert_close, load_step

STEPS = ["dacs_step.pt", "dacs_step_jitter.pt", "dacs_step_fdist.pt"]


class TinyNet(SegmentationModel, EncoderDecoder):
    """The fixture's network (the script's ``TinyNet``, same layers and names) under segadapt's model contract."""

    output_stride = 2

    def __init__(self, num_classes: int, mean: list[float], std: list[float]) -> None:
        # the authors' pipeline normalises (255 x - mean) / std, which pixel_scale 255 reproduces in the model
        super().__init__(num_classes, feature_dim=8, normalization=Normalization(tuple(mean), tuple(std), pixel_scale=255.0))
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout2d(0.5)
        self.conv_seg = nn.Conv2d(8, num_classes, 1)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(self.normalize(images)))))))]

    def decode(self, features: list[torch.Tensor]) -> SegOutput:
        return SegOutput(self.conv_seg(self.dropout(features[-1])), features[-1])

    def forward(self, images: torch.Tensor) -> SegOutput:
        return self.decode(self.encode(images))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for m in (self.conv1, self.bn1, self.conv2, self.bn2) for p in m.parameters())

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.conv_seg.parameters()


def dacs_draws(fixture: dict[str, Any]) -> RecordedDraws:
    """The draws of a DACS step fixture, in the order segadapt's step asks for them.

    Two batch coins (jitter, blur); for each mixed image its four jitter factors (in the steps that
    jitter) and its blur sigma (in the steps that blur); one jitter order per image; one ClassMix
    choice per image.
    """
    factors, sigmas = fixture["jitter_factors"].tolist(), fixture["blur_sigmas"]
    uniforms: list[tuple[tuple[float, float], float]] = []
    for image in range(len(fixture["source_images"])):
        if factors:
            uniforms += list(zip(JITTER_RANGES, factors[image]))
        if sigmas:
            uniforms.append((BLUR_SIGMA_RANGE, sigmas[image]))
    choices = list(zip(fixture["classmix_counts"], fixture["classmix_choices"]))
    return RecordedDraws([fixture["jitter_coin"], fixture["blur_coin"]], choices, uniforms, list(fixture["jitter_orders"]))


@pytest.fixture(params=STEPS)
def fixture(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_step(request.param)


def replay_recipe(fixture: dict[str, Any], *overrides: str) -> DACS:
    """segadapt's ``dacs`` recipe at the fixture's step: teacher theta_0, student theta_1, one EMA update done."""
    num_classes, ignore_index = fixture["num_classes"], fixture["ignore_index"]
    names = [f"c{i}" for i in range(num_classes)]
    distance = [
        f"method.feature_distance_weight={fixture['feature_distance_weight']}",
        f"method.feature_distance_classes=[{','.join(names[i] for i in fixture['feature_distance_classes'])}]",
        f"method.feature_distance_min_ratio={fixture['feature_distance_min_ratio']}",
    ] if fixture["feature_distance_weight"] > 0 else []  # fmt: skip
    cfg = load_config(None, [
        "recipe=dacs", f"method.ema_momentum={fixture['alpha']}", f"method.pseudo_threshold={fixture['pseudo_threshold']}",
        f"method.pseudo_ignore_top={fixture['pseudo_ignore_top']}",
        f"method.pseudo_ignore_bottom={fixture['pseudo_ignore_bottom']}", *distance, *DACS_AUTHORS_STEP, *overrides,
    ])  # fmt: skip
    classes = ClassInfo("tiny", tuple(names), ((0, 0, 0),) * num_classes, ignore_index=ignore_index)
    model = TinyNet(num_classes, fixture["mean"], fixture["std"])
    model.load_state_dict(fixture["teacher_start"])
    # the teacher (and the feature distance's start network, the authors' ImageNet network here) copy theta_0
    recipe = DACS(cfg, model, build_seg_loss(cfg.loss, ignore_index=ignore_index), classes)
    model.load_state_dict(fixture["student_start"])
    recipe.train()
    recipe.after_optimizer_step(1)  # one optimiser step done: the code's _update_ema(1) at the start of its second step
    return recipe


def batches(fixture: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "source": {"image": fixture["source_images"], "label": fixture["source_labels"]},
        "target": {"image": fixture["target_images"]},
    }


def run_step(recipe: DACS, fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], list, RecordedDraws]:
    """The replayed step with the authors' draws; returns its losses, what the loss saw, and the draws (to check all were used)."""
    draws = dacs_draws(fixture)
    draws.install(monkeypatch)
    seen: list[tuple[torch.Tensor, ...]] = []
    rng_states = list(fixture["dropout_rng_states"])

    def student_dropout(module: nn.Module, args: tuple) -> None:
        torch.set_rng_state(rng_states.pop(0))  # the masks the authors' student forward drew (nothing else draws in between)

    recipe.model.dropout.register_forward_pre_hook(student_dropout)
    recipe.model.normalize.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach().clone(),)) and None)
    recipe.seg_loss.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[1].clone(), kwargs.get("weight"))) and None, with_kwargs=True
    )
    losses = recipe.training_step(batches(fixture), 1)
    assert not rng_states
    losses["loss"].backward()
    return losses, seen, draws


def test_the_teacher_update_and_pseudo_labels_equal_the_authors(fixture: dict[str, Any]) -> None:
    recipe = replay_recipe(fixture)
    for name, value in recipe.teacher.module.named_parameters():  # (theta_0 + theta_1) / 2, alpha = min(1 - 1/2, 0.99)
        assert_close(value, fixture["teacher_after_update"][name], f"teacher {name}")
    target = fixture["target_images"]
    assert_close(recipe.teacher_logits(target), fixture["teacher_logits"], "teacher logits")
    labels, weight = recipe.pseudo_labels(target, torch.ones(target.shape[0], *target.shape[-2:], dtype=torch.bool))
    assert torch.equal(labels, fixture["teacher_logits"].argmax(dim=1))
    top, bottom = fixture["pseudo_ignore_top"], fixture["pseudo_ignore_bottom"]
    share = (fixture["teacher_logits"].softmax(dim=1).max(dim=1).values >= fixture["pseudo_threshold"]).float().mean()
    assert 0 < share < 1 and torch.all(weight[:, top:-bottom] == share)
    assert torch.all(weight[:, :top] == 0) and torch.all(weight[:, -bottom:] == 0)


def test_one_dacs_step_equals_the_authors_step(fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = replay_recipe(fixture)
    losses, seen, draws = run_step(recipe, fixture, monkeypatch)
    assert draws.all_used()
    # the mixed batch: ClassMix of the source onto the target, then the jitter (in dacs_step_jitter.pt) and the blur
    (source_input,), (source_labels, source_weight), (mixed_input,), (mixed_labels, mixed_weight) = seen
    assert torch.equal(source_input, fixture["source_images"]) and torch.equal(source_labels, fixture["source_labels"])
    assert_close(recipe.model.normalize(mixed_input), fixture["mixed_images_normalized"], "mixed images")
    assert torch.equal(mixed_labels, fixture["mixed_labels"])
    assert_close(mixed_weight, fixture["mixed_weights"], "mixed pixel weights")
    # the loss terms, every gradient, and the BatchNorm statistics of the two student forwards
    assert_close(losses["loss_source"], fixture["loss_source"], "loss_source")
    assert_close(losses["loss_mix"], fixture["loss_mix"], "loss_mix")
    if fixture["feature_distance_weight"] > 0:  # DAFormer's thing-class ImageNet feature distance (lambda times the distance)
        assert_close(losses["loss_feature_distance"], fixture["loss_feature_distance"], "loss_feature_distance")
    else:
        assert "loss_feature_distance" not in losses
    grads = {name: p.grad for name, p in recipe.model.named_parameters()}
    assert grads.keys() == fixture["grads"].keys()
    for name, grad in grads.items():
        assert grad is not None
        assert_close(grad, fixture["grads"][name], f"gradient of {name}")
    buffers = {name: buffer for name, buffer in recipe.model.named_buffers() if not name.startswith("normalize.")}
    assert buffers.keys() == fixture["student_buffers"].keys()
    for name, buffer in buffers.items():  # running statistics after the source and the mixed forwards
        assert_close(buffer.float(), fixture["student_buffers"][name].float(), f"student {name}")


@pytest.mark.parametrize(
    ("step", "override"),
    [(STEPS[0], "method.source_loss_mean=valid"), (STEPS[0], "method.teacher_batch_norm=running"),
     (STEPS[0], "method.ema_warmup=from_first_step"), (STEPS[0], "method.blur_kernel=three_sigma"),
     (STEPS[1], "method.jitter_maths=torchvision")],
)  # fmt: skip
def test_each_other_option_value_departs_from_the_authors_step(step: str, override: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixtures tell each option's two values apart: the other value moves a term or a gradient by over 1e-3."""
    fixture = load_step(step)
    recipe = replay_recipe(fixture, override)
    losses, _, _ = run_step(recipe, fixture, monkeypatch)
    differences = [
        (losses[key] - fixture[key]).abs().item() / fixture[key].abs().item() for key in ("loss_source", "loss_mix")
    ] + [
        ((p.grad - fixture["grads"][name]).abs().max() / fixture["grads"][name].abs().max()).item()
        for name, p in recipe.model.named_parameters()
    ]
    assert max(differences) > 1e-3


@pytest.mark.parametrize("override", ["method.classmix_classes=image", "method.augmentation_coins=image"])
def test_per_image_classmix_and_coins_draw_otherwise_than_the_authors(override: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-image ClassMix pools (3 classes, not the batch's 4 values with the ignore one) and per-image coins
    (4 coins, not 2) ask for draws the authors' step never makes: the replay cannot even run."""
    fixture = load_step(STEPS[0])
    recipe = replay_recipe(fixture, override)
    with pytest.raises((AssertionError, IndexError)):
        run_step(recipe, fixture, monkeypatch)
