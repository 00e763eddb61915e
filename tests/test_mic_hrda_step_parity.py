"""One MIC(HRDA) training step replayed against the authors' code (step parity).

``tests/fixtures/parity/mic_hrda_step.pt`` holds one step of lhoyer/MIC's ``DACS.forward_train``
with masked image consistency (``separatetrgaug``) on the authors' HRDA segmentor and head, a
tiny backbone and tiny heads plugged into HRDA's head wrapper, two 64x64 source and target images
(context view 32x32, detail crops 32x32 at offsets divisible by 8), DAFormer's thing-class feature
distance and HRDA's pseudo-label margins, with every random draw it made. The script
``tests/fixtures/parity/scripts/mic_hrda_step.py`` ran the authors' code and says how to
regenerate it and what every key holds. The replay drives segadapt's ``hrda`` recipe with
``mic.enabled`` on :class:`segadapt.models.hrda.HRDASegmentor` with the same weights, batch and
draws, and asserts the teacher's EMA update, its sliding-window pseudo labels and their weight
(margins included), what each of the three student forwards (source, mixed, masked) got and gave
(images, labels, weights, fused and detail logits, attention), every loss term (fused and detail
parts apart), every parameter's gradient and the BatchNorm statistics the step leaves.

Tolerance: 1e-5 relative, per tensor, against the largest magnitude of the authors' tensor
(:func:`step_parity.assert_close`). segadapt downscales, crops, mixes, jitters, blurs and masks
``[0, 1]`` images and normalises in the network where the authors normalise first: the same
maths in another order (measured: every compared tensor within 2e-6 of the authors', the largest
differences in the scale attention and its gradients).

The draws enter where segadapt makes them: the coins, ClassMix, jitter and blur draws through
:class:`step_parity.RecordedDraws`; the detail-crop boxes in place of
:func:`segadapt.models.hrda.random_detail_box`; MIC's block mask in place of ``block_mask``; and
each dropout layer of the student starts each call from the torch RNG state the authors' call
started from (the shared head twice per forward, context then detail, the attention head once).
The authors' MIC jitters and blurs the target batch with one kornia call and one blur: one
jitter order and one sigma for both images, handed to segadapt's per-image draws as equal values.
"""

from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import segadapt.engine.recipes.common as recipe_common
import segadapt.models.hrda as hrda_models
from segadapt.config import load_config
from segadapt.data.classes import ClassInfo
from segadapt.data.transforms.records import CropRecord
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes.dacs import HRDA
from segadapt.models.base import Normalization, SegOutput
from segadapt.models.hrda import HRDASegmentor

from step_parity import BLUR_SIGMA_RANGE, DACS_AUTHORS_STEP, JITTER_RANGES, RecordedDraws, assert_close, load_step

STEP = "mic_hrda_step.pt"
FORWARDS = ("source", "mixed", "masked")  # the student's three training forwards, in the step's order


class TinyBackbone(nn.Module):
    """The fixture's backbone (same layers and names): two stride-2 conv + BN + ReLU stages, one map at stride 4."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(images))))))]


class TinyHead(nn.Module):
    """The fixture's stand-in for DAFormer's head: 1x1 conv + BN + ReLU, then ``Dropout2d(0.1)`` and the classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, encoded: Sequence[torch.Tensor]) -> SegOutput:
        features = F.relu(self.bn(self.embed(encoded[0])))
        return SegOutput(self.conv_seg(self.dropout(features)), features)


class TinyHRDA(HRDASegmentor):
    """segadapt's HRDA segmentor around the fixture's networks (module names ``backbone.*``, ``decode_head.head.*``,
    ``decode_head.scale_attention.*``, as the authors')."""

    output_stride = 4


def tiny_hrda(fixture: dict[str, Any]) -> TinyHRDA:
    channels, num_classes = fixture["teacher_start"]["backbone.conv1.weight"].shape[0], fixture["num_classes"]
    assert fixture["scales"] == [0.5, 1] and fixture["output_stride"] == TinyHRDA.output_stride
    return TinyHRDA(
        TinyBackbone(channels), TinyHead(channels, num_classes), TinyHead(channels, num_classes), num_classes, channels,
        # the authors' pipeline normalises (255 x - mean) / std, which pixel_scale 255 reproduces in the model
        Normalization(tuple(fixture["mean"]), tuple(fixture["std"]), pixel_scale=255.0),
        detail_crop_size=fixture["hr_crop_size"], context_scale=fixture["scales"][0],
        crop_coord_divisible=fixture["crop_coord_divisible"], hr_loss_weight=fixture["hr_loss_weight"],
    )  # fmt: skip


@pytest.fixture
def fixture() -> dict[str, Any]:
    return load_step(STEP)


def replay_recipe(fixture: dict[str, Any], *overrides: str) -> HRDA:
    """segadapt's ``hrda`` recipe with MIC at the fixture's step: teacher theta_0, student theta_1, one EMA update done."""
    num_classes, ignore_index = fixture["num_classes"], fixture["ignore_index"]
    names = [f"c{i}" for i in range(num_classes)]
    cfg = load_config(None, [
        "recipe=hrda", f"method.ema_momentum={fixture['alpha']}", f"method.pseudo_threshold={fixture['pseudo_threshold']}",
        "method.pseudo_ignore_top=0", "method.pseudo_ignore_bottom=0",
        f"method.pseudo_margins=[{','.join(str(m) for m in fixture['pseudo_margins'])}]",
        f"method.feature_distance_weight={fixture['feature_distance_weight']}",
        f"method.feature_distance_classes=[{','.join(names[i] for i in fixture['feature_distance_classes'])}]",
        f"method.feature_distance_min_ratio={fixture['feature_distance_min_ratio']}",
        "mic.enabled=true", "mic.teacher=host", "mic.augmentation=true", f"mic.mask_ratio={fixture['mask_ratio']}",
        f"mic.mask_block_size={fixture['mask_block_size']}", f"mic.mask_lambda={fixture['mask_lambda']}",
        *DACS_AUTHORS_STEP, *overrides,
    ])  # fmt: skip
    classes = ClassInfo("tiny", tuple(names), ((0, 0, 0),) * num_classes, ignore_index=ignore_index)
    model = tiny_hrda(fixture)
    model.load_state_dict(fixture["teacher_start"])
    # the teacher and the feature distance's start network (the authors' ImageNet network here) copy theta_0
    recipe = HRDA(cfg, model, build_seg_loss(cfg.loss, ignore_index=ignore_index), classes)
    model.load_state_dict(fixture["student_start"])
    recipe.train()
    recipe.after_optimizer_step(1)  # one optimiser step done: the code's _update_ema(1) at the start of its second step
    return recipe


def target_batch(fixture: dict[str, Any]) -> dict[str, Any]:
    """The target images with the replay records of their crops, from which segadapt places HRDA's margins."""
    size = fixture["target_images"].shape[-1]
    replay = [
        [] if (height, width) == (size, size) else [CropRecord(input_size=(height, width), top=top, left=left, height=size, width=size)]
        for height, width, top, left in fixture["target_crops"]
    ]
    return {"image": fixture["target_images"], "replay": replay}


def mic_hrda_draws(fixture: dict[str, Any]) -> RecordedDraws:
    """The step's augmentation draws in the order segadapt asks for them: the mixed batch's, then MIC's.

    Coins: DACS's two, then MIC's two. Per mixed image: four jitter factors, then its blur sigma, its
    jitter order. Per MIC image: its four factors and the batch's one sigma and one order.
    """
    uniforms: list[tuple[tuple[float, float], float]] = []
    for factors, sigma in zip(fixture["mix_jitter_factors"].tolist(), fixture["mix_blur_sigmas"]):
        uniforms += [*zip(JITTER_RANGES, factors), (BLUR_SIGMA_RANGE, sigma)]
    for factors in fixture["mic_jitter_factors"].tolist():
        uniforms += [*zip(JITTER_RANGES, factors), (BLUR_SIGMA_RANGE, fixture["mic_blur_sigma"])]
    orders = list(fixture["mix_jitter_orders"]) + [fixture["mic_jitter_order"]] * len(fixture["mic_jitter_factors"])
    choices = list(zip(fixture["classmix_counts"], fixture["classmix_choices"]))
    return RecordedDraws(fixture["dacs_coins"] + fixture["mic_coins"], choices, uniforms, orders)


class StepRecorder:
    """The authors' crop boxes, MIC mask and dropout RNG states handed to segadapt's step; what each student forward got and gave."""

    def __init__(self, recipe: HRDA, fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
        self.fixture = fixture
        self.boxes = [fixture["crop_boxes"][name] for name in FORWARDS]
        self.masks = [fixture["mic_mask"]]
        self.dropout_states: dict[str, list[torch.Tensor]] = {"head": [], "scale_attention": []}
        for name in FORWARDS:
            for module, state in fixture["dropout_rng_states"][name]:
                self.dropout_states[module].append(state)
        self.forwards: list[dict[str, Any]] = []
        monkeypatch.setattr(hrda_models, "random_detail_box", self.detail_box)
        monkeypatch.setattr(recipe_common, "block_mask", self.block_mask)
        model = recipe.model
        for module_name in self.dropout_states:
            getattr(model.decode_head, module_name).dropout.register_forward_pre_hook(
                lambda module, args, name=module_name: torch.set_rng_state(self.dropout_states[name].pop(0))
            )
        model.register_forward_pre_hook(lambda module, args: self.forwards.append({"image": args[0].detach().clone(), "losses": []}) and None)
        model.register_forward_hook(lambda module, args, output: self.forwards[-1].update(output=output) and None)
        model.decode_head.scale_attention.register_forward_hook(
            lambda module, args, output: self.forwards[-1].update(attention=torch.sigmoid(output.logits).detach()) and None
        )
        recipe.seg_loss.register_forward_hook(
            lambda module, args, kwargs, output: self.forwards[-1]["losses"].append((args[1], kwargs.get("weight"), output.detach())) and None,
            with_kwargs=True,
        )

    def detail_box(self, image_size: Sequence[int], crop_size: Sequence[int], divisible: int = 1, generator: Any = None) -> tuple:
        assert tuple(image_size) == tuple(self.fixture["source_images"].shape[-2:])
        assert list(crop_size) == self.fixture["hr_crop_size"] and divisible == self.fixture["crop_coord_divisible"]
        return tuple(self.boxes.pop(0))

    def block_mask(self, batch: int, size: Sequence[int], ratio: float, block_size: int, device: Any = None) -> torch.Tensor:
        mask = self.masks.pop(0)
        assert (batch, *size) == (mask.shape[0], *mask.shape[-2:])
        assert ratio == self.fixture["mask_ratio"] and block_size == self.fixture["mask_block_size"]
        return mask

    def all_used(self) -> bool:
        return not (self.boxes or self.masks or any(self.dropout_states.values()))


def run_step(recipe: HRDA, fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], StepRecorder]:
    """The replayed step with the authors' draws, back-propagated; returns its losses and the recorder."""
    draws = mic_hrda_draws(fixture)
    draws.install(monkeypatch)
    recorder = StepRecorder(recipe, fixture, monkeypatch)
    batches = {"source": {"image": fixture["source_images"], "label": fixture["source_labels"]}, "target": target_batch(fixture)}
    losses = recipe.training_step(batches, 1)
    losses["loss"].backward()
    assert draws.all_used() and recorder.all_used()
    return losses, recorder


def test_the_teacher_update_pseudo_labels_and_margins_equal_the_authors(fixture: dict[str, Any]) -> None:
    recipe = replay_recipe(fixture)
    for name, value in recipe.teacher.module.named_parameters():  # (theta_0 + theta_1) / 2, alpha = min(1 - 1/2, 0.999)
        assert_close(value, fixture["teacher_after_update"][name], f"teacher {name}")
    target = target_batch(fixture)
    # context view plus the detail branch slid over the whole crop (3 x 3 windows of 32 at stride 16)
    assert_close(recipe.teacher_logits(target["image"]), fixture["teacher_logits"], "teacher logits")
    size = tuple(target["image"].shape[-2:])
    margins = recipe_common.pseudo_margin_mask(target, size, fixture["pseudo_margins"])
    assert torch.equal(margins, fixture["valid_pseudo_mask"].float())
    labels, weight = recipe.pseudo_labels(target["image"], recipe_common.content_mask(target, size))
    assert torch.equal(labels, fixture["pseudo_labels"])
    assert_close(weight * margins, fixture["pseudo_weights"], "pseudo-label weight")


def test_one_mic_hrda_step_equals_the_authors_step(fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = replay_recipe(fixture)
    losses, recorder = run_step(recipe, fixture, monkeypatch)
    weight_d = fixture["hr_loss_weight"]
    assert len(recorder.forwards) == len(FORWARDS)
    for name, forward in zip(FORWARDS, recorder.forwards):
        # what the segmentor got: the source batch, the ClassMix-jittered-blurred batch, the jittered-blurred-masked target
        assert_close(recipe.model.normalize(forward["image"]), fixture[f"{name}_images_normalized"], f"{name} images")
        output = forward["output"]
        assert output.detail is not None and output.detail.box == tuple(fixture["crop_boxes"][name])
        assert_close(output.logits, fixture[f"{name}_fused_logits"], f"{name} fused logits")
        assert_close(output.detail.logits, fixture[f"{name}_detail_logits"], f"{name} detail logits")
        assert_close(forward["attention"], fixture[f"{name}_attention"], f"{name} attention")
        # HRDA Eq. 6: the fused term on the whole labels, the detail term on the labels under the crop
        (labels, weight, fused_term), (_, _, detail_term) = forward["losses"]
        assert torch.equal(labels, fixture[f"{name}_labels"])
        if fixture[f"{name}_weights"] is None:  # the source: every pixel weight 1, mmseg's mean over all pixels
            assert torch.all(weight == 1)
        else:
            assert_close(weight, fixture[f"{name}_weights"], f"{name} pixel weights")
        authors = {"source": "loss_source", "mixed": "loss_mix", "masked": "loss_masked"}[name]
        assert_close((1 - weight_d) * fused_term, fixture[authors], f"{name} fused term")
        assert_close(weight_d * detail_term, fixture[f"{authors}_detail"], f"{name} detail term")
    # the loss terms as segadapt logs them: each Eq. 6 total, MIC's times lambda^M, the feature distance
    assert_close(losses["loss_source"], fixture["loss_source"] + fixture["loss_source_detail"], "loss_source")
    assert_close(losses["loss_mix"], fixture["loss_mix"] + fixture["loss_mix_detail"], "loss_mix")
    mic = fixture["mask_lambda"] * (fixture["loss_masked"] + fixture["loss_masked_detail"])
    assert_close(losses["loss_mic"], mic, "loss_mic")
    assert_close(losses["loss_feature_distance"], fixture["loss_feature_distance"], "loss_feature_distance")
    # every gradient the authors' four backward calls leave, and the BatchNorm statistics of the three forwards
    grads = {name: p.grad for name, p in recipe.model.named_parameters()}
    assert grads.keys() == fixture["grads"].keys()
    for name, grad in grads.items():
        assert grad is not None
        assert_close(grad, fixture["grads"][name], f"gradient of {name}")
    buffers = {name: buffer for name, buffer in recipe.model.named_buffers() if not name.startswith("normalize.")}
    assert buffers.keys() == fixture["student_buffers"].keys()
    for name, buffer in buffers.items():
        assert_close(buffer.float(), fixture["student_buffers"][name].float(), f"student {name}")


def largest_departure(recipe: HRDA, losses: dict[str, torch.Tensor], fixture: dict[str, Any]) -> float:
    """The largest relative difference of a loss term or a gradient from the authors'."""
    authors = {
        "loss_source": fixture["loss_source"] + fixture["loss_source_detail"],
        "loss_mix": fixture["loss_mix"] + fixture["loss_mix_detail"],
        "loss_mic": fixture["mask_lambda"] * (fixture["loss_masked"] + fixture["loss_masked_detail"]),
    }
    differences = [((losses[key] - value).abs() / value.abs()).item() for key, value in authors.items()]
    for name, p in recipe.model.named_parameters():
        theirs = fixture["grads"][name]
        differences.append(((p.grad - theirs).abs().max() / theirs.abs().max()).item())
    return max(differences)


def test_the_fixture_tells_the_detail_crop_and_the_margins_apart(fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another detail crop of the source, or no pseudo-label margins, moves a term or a gradient by over 1e-3."""
    shifted = dict(fixture, crop_boxes=dict(fixture["crop_boxes"]))
    y1, y2, x1, x2 = shifted["crop_boxes"]["source"]
    step = fixture["crop_coord_divisible"]
    x1, x2 = (x1 - step, x2 - step) if x1 >= step else (x1 + step, x2 + step)
    shifted["crop_boxes"]["source"] = [y1, y2, x1, x2]
    recipe = replay_recipe(fixture)
    losses, _ = run_step(recipe, shifted, monkeypatch)
    assert largest_departure(recipe, losses, fixture) > 1e-3
    monkeypatch.undo()
    recipe = replay_recipe(fixture, "method.pseudo_margins=null")
    losses, _ = run_step(recipe, fixture, monkeypatch)
    assert largest_departure(recipe, losses, fixture) > 1e-3
