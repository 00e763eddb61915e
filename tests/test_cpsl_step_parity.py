"""One CPSL stage-1 training step replayed against the authors' code (issue 28, step parity).

``tests/fixtures/parity/cpsl_step{,_queue,_nomix,_contrast,_geometry}.pt`` each hold one step of lslrh/CPSL's ``CustomModel.step``
(``models/adaptation_modelv2.py`` at 5ab8e14) under the README's stage-1 command, on a tiny network
(256-channel features at stride 4, the code's hard-coded width) and a batch of two 32 x 48 source
and target images, five classes: the start weights of the student and the EMA network, the
prototypes and momentum prototypes, the class distribution ``r``, the batch, the soft pseudo labels,
the strong view, every random draw (the CutMix coin and box, the sampling permutation), the loss
terms and every gradient: with CutMix and empty queues, with CutMix from full queues (and
prototypes off unit length: the queues after the step besides), without CutMix, and without
CutMix from full queues (the contrastive term). The script ``tests/fixtures/parity/scripts/cpsl_step.py`` ran the
authors' code and says how to regenerate it.

What the replay covers: the source cross-entropy, the rectified labels (Eq. 1 with the momentum
prototypes), CutMix of the weak view and its labels, the symmetric cross-entropy (0.1 CE + 1.0 RCE)
on the weak view, both self-labeling terms (Eq. 5 on the momentum features and the authors' second
term on the momentum logits, one Sinkhorn per image, one sampling permutation for the batch), the
prototype-cosine consistency ``KL(teacher || student)`` divided by K, the contrastive term against
the bank, the total, the gradient of every network parameter and of the prototypes, and the banks
after a step from full queues. segadapt's options are set to the authors' values
(:data:`AUTHORS_STEP`). In the first four steps the weak view is the full frame and the strong view a
recorded photometric change of it (given to segadapt's step in place of its own), so ``full2weak`` and
``label_strong_T`` are identities there.

The fifth, ``cpsl_step_geometry.pt``, has the geometry (options :data:`GEOMETRY_STEP`, the authors'
values): the momentum network sees the 40 x 80 full frames, and the weak views are 24 x 48 crops of
them, one flipped; the strong views are the authors' ``RandAugmentMC(2, 10)`` of the weak ones, whose
draws (flip, blur and jitter coins, operations, magnitudes, apply and sign coins, cut-out centre) are
handed to segadapt's :class:`~segadapt.data.transforms.RandAugmentMC` (:class:`AuthorsRandAugment`), so
segadapt makes the strong view and its records itself (the images agree on every 8-bit level). The
full-frame teacher moved into the crops (``full2weak``) rectifies the labels, its whole-frame map gives
``L_SL``'s pixels, and its cosines replayed through the strong views' flip, shift and cut-out
(``label_strong_T``, ``TranslateX`` normalised by the height: ``randaugment_translate_quirk``) are the
consistency teacher. The draws keep the step off segadapt's documented departures, which are therefore
not options: the frames are not rescaled (``RandomSized`` at the frame's size: segadapt resizes soft maps
with half-pixel, antialiased bilinear where ``full2weak`` uses ``align_corners=True``), each strong view
has one geometric operation (the authors replay operations in a fixed order and keep one draw of an
operation drawn twice), the shifts move the stride-4 teacher map by whole pixels (segadapt resamples it
bilinearly where the authors take the nearest value; both are exact on whole-pixel shifts, not on shears
or rotations), the crops and cut-out corners lie on multiples of 4 (the authors' ``y0 // 4 : y1 // 4``
cut-out mask at stride 4 is one row and column short of segadapt's nearest resize of PIL's inclusive box,
unless the corners are multiples of 4) and no blur or colour jitter is drawn (PIL's on 8-bit against
segadapt's float maths; the operations drawn, shifts, solarize and posterize, agree exactly).

What no step covers, because the test injects it: the warm-up's soft labels (the
file the authors read is given to segadapt in place of its online warm-up forward), the
optimiser update and the EMA updates after the step; the queues are empty (as in the first
64 iterations) in three of the steps.

Tolerance: 1e-5 relative, per tensor, against the largest magnitude of the authors' tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import segadapt.engine.recipes.cpsl as cpsl_recipe
from segadapt.config import load_config
from segadapt.data.classes import ClassInfo
from segadapt.data.transforms import CropRecord, FlipRecord, FullFrameRecord
from segadapt.data.transforms import geometry as geometry_transforms
from segadapt.data.transforms import photometric as photometric_transforms
from segadapt.data.transforms import randaugment as randaugment_transforms
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes.cpsl import CPSL
from segadapt.models.base import EncoderDecoder, Normalization, SegmentationModel, SegOutput

from step_parity import assert_close, load_step

STEPS = ["cpsl_step.pt", "cpsl_step_queue.pt", "cpsl_step_nomix.pt", "cpsl_step_contrast.pt", "cpsl_step_geometry.pt"]
AUTHORS_STEP = [  # the authors' value of every option of the step (README stage 1, parser_train.py defaults)
    "method.lambda1=0.1",
    "method.lambda2=5",
    "method.tau=0.08",
    "method.epsilon=0.05",
    "method.sinkhorn_iterations=3",
    "method.consistency=prototype",
    "method.consistency_reduction=class_mean",
    "method.target_view=weak",
    "method.target_loss=symmetric_ce",
    "method.rce_alpha=0.1",
    "method.rce_beta=1.0",
    "method.cutmix_p=0.5",  # with the authors' coin
    "method.distribution=fixed",
    "method.momentum_batch_norm=as_student",
    "method.sl_through_ema_features_only=true",
    "method.pixel_sampling=shared_uniform",
    "method.sinkhorn_per_image=true",
    "method.output_self_labeling=true",
    "method.bank_partial=false",
    "method.bank_scores=unnormalised_prototypes",
    "method.contrastive_weight=0.001",
    "method.contrastive_bank_labels=first_pixels",
    "method.source_align_corners=true",
    "method.cutmix_label_sampling=top_left",
]

NO_GEOMETRY_STEP = [  # the first four steps: the weak view is the full frame and the recorded strong view replaces the photometric one
    "method.strong_view=photometric",
    "method.teacher_view=weak",
]

GEOMETRY_STEP = [  # the authors' strong view and full-frame teacher, for the step that has their geometry
    "method.strong_view=randaugment",
    "method.teacher_view=full_frame",
    "method.randaugment_translate_quirk=true",
]


class AuthorsRandAugment:
    """The authors' recorded ``RandAugmentMC`` draws, handed to segadapt's at the point where it draws each.

    Per image, in segadapt's order: the flip coin (``geometry``), the blur and jitter coins
    (``photometric``), then per operation its index in the pool, its magnitude, its apply coin and (when
    applied) its sign coin (``randaugment``), then the cut-out centre ``x``, ``y``. Every call checks that
    segadapt asks for what the authors drew.
    """

    def __init__(self, draws: list[dict[str, Any]]) -> None:
        self.flips = [d["flip"] for d in draws]
        self.photometric = [coin for d in draws for coin in (d["blur"], d["jitter"])]
        pool = list(randaugment_transforms.RANDAUGMENT_OPS)
        self.integers: list[tuple[int, int]] = []  # (bound, value)
        self.coins: list[bool] = []
        self.uniforms: list[float] = []
        for d in draws:
            for name, magnitude, applied, negative in d["ops"]:
                self.integers += [(len(pool) - 1, pool.index(re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower())), (8, magnitude - 1)]
                self.coins += [applied, negative] if applied else [applied]
            self.uniforms += list(d["cutout_centre"])

    def randint(self, high_inclusive: int, generator: torch.Generator | None) -> int:
        bound, value = self.integers.pop(0)
        assert high_inclusive == bound, f"segadapt draws from 0..{high_inclusive}, the authors' draw was from 0..{bound}"
        return value

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(geometry_transforms, "_coin", lambda p, generator: self.flips.pop(0))
        monkeypatch.setattr(photometric_transforms, "_coin", lambda p, generator: self.photometric.pop(0))
        monkeypatch.setattr(randaugment_transforms, "_coin", lambda p, generator: self.coins.pop(0))
        monkeypatch.setattr(randaugment_transforms, "_randint", self.randint)
        monkeypatch.setattr(randaugment_transforms, "_uniform", lambda low, high, generator: self.uniforms.pop(0))

    def all_used(self) -> bool:
        return not (self.flips or self.photometric or self.integers or self.coins or self.uniforms)


class TinyNet(SegmentationModel, EncoderDecoder):
    """The fixture's network (the script's ``TinyNet``, same layers and names) under segadapt's model contract."""

    output_stride = 4

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, feature_dim=256, normalization=Normalization.preset("proda"))  # RGB in [0, 1], as theirs
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 256, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(256)
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(self.normalize(images)))))))]

    def decode(self, features: list[torch.Tensor]) -> SegOutput:
        return SegOutput(self.classifier(features[-1]), features[-1])

    def forward(self, images: torch.Tensor) -> SegOutput:
        return self.decode(self.encode(images))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for m in (self.conv1, self.bn1, self.conv2, self.bn2) for p in m.parameters())

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.classifier.parameters()


@pytest.fixture(params=STEPS)
def fixture(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_step(request.param)


def by_age(queue: torch.Tensor, block: int) -> torch.Tensor:
    """The authors' queue (newest block of ``block`` rows first) as rows from the oldest block to the newest."""
    return queue.reshape(-1, block, queue.shape[-1]).flip(0).reshape(queue.shape)


def bank_by_age(bank: Any) -> torch.Tensor:
    """A full segadapt bank's rows from the oldest to the newest (a ring buffer whose pointer is at the oldest)."""
    assert bank.is_full
    return torch.roll(bank.features, -int(bank.pointer), dims=0)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.startswith("normalize.") for name in missing), (missing, unexpected)


def replay_recipe(fixture: dict[str, Any], tmp_path: Path, *overrides: str) -> CPSL:
    """segadapt's ``cpsl`` recipe holding the fixture's student, momentum network, prototypes and ``r``."""
    num_classes, ignore_index = fixture["num_classes"], fixture["ignore_index"]
    cfg = load_config(None, [
        "recipe=cpsl", f"output_dir={tmp_path}", "name=run", f"method.pixels_per_image={fixture['opt']['fbs']}",
        f"method.queue_size={len(fixture['queue_start']) if 'queue_start' in fixture else 1024}", *AUTHORS_STEP,
        *(GEOMETRY_STEP if "full_images" in fixture else NO_GEOMETRY_STEP), *overrides,
    ])  # fmt: skip
    cfg.run_dir.mkdir(parents=True)
    # the Eq. 7/10 file prepare() writes: the prototypes and the class distribution r (the authors' class_distribution.npy)
    torch.save({"prototypes": fixture["prototypes"], "class_counts": fixture["class_distribution"]}, cfg.run_dir / cpsl_recipe.INIT_FILE)
    classes = ClassInfo("tiny", tuple(f"c{i}" for i in range(num_classes)), ((0, 0, 0),) * num_classes, ignore_index=ignore_index)
    model = TinyNet(num_classes)
    load_weights(model, fixture["ema_start"])
    recipe = CPSL(cfg, model, build_seg_loss(cfg.loss, ignore_index=ignore_index), classes)
    load_weights(recipe.ema_model.module, fixture["ema_start"])
    load_weights(model, fixture["student_start"])
    with torch.no_grad():
        recipe.head.prototypes.copy_(fixture["prototypes"])
        recipe.ema_head.module.prototypes.copy_(fixture["prototypes_ema"])
    if "queue_start" in fixture:  # full queues: the same rows, oldest first, so the oldest go first as in the code
        recipe.bank.enqueue(by_age(fixture["queue_start"], fixture["opt"]["fbs"]))
        recipe.bank_out.enqueue(by_age(fixture["queue_out_start"], fixture["opt"]["fbs"]))
        if recipe.options.contrastive_weight > 0:
            recipe.bank_labels.copy_(by_age(fixture["queue_label_start"].unsqueeze(1), fixture["opt"]["fbs"]).flatten())  # the rows just written
    recipe.train()
    return recipe


def run_step(recipe: CPSL, fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], list]:
    """The replayed step with the authors' draws and inputs; returns its losses and what the target loss saw."""
    monkeypatch.setattr(cpsl_recipe, "strong_view", lambda images, *a, **k: fixture["strong_images"].clone())
    monkeypatch.setattr(cpsl_recipe, "_cutmix_coin", lambda p: fixture["coin"] < p)
    orders = list(fixture["contrastive_permutations"])
    monkeypatch.setattr(cpsl_recipe, "_contrastive_permutation", lambda n: orders.pop(0))
    if fixture["cutmix_box"]:
        top, left, bottom, right = fixture["cutmix_box"]  # the authors' rows bbx1:bbx2, columns bby1:bby2
        monkeypatch.setattr(cpsl_recipe, "cutmix_box", lambda height, width, *a, **k: (top, left, bottom, right))
    permutation = fixture["sampling_permutation"]

    def shared_uniform_pixels(n: int, pixels: int, m: int, *a: Any, **k: Any) -> torch.Tensor:
        assert pixels == permutation.numel(), f"segadapt samples {pixels} pixels, the authors' code {permutation.numel()} (the whole frame's)"
        return permutation[:m].unsqueeze(0).expand(n, -1).clone()

    monkeypatch.setattr(cpsl_recipe, "shared_uniform_pixels", shared_uniform_pixels)
    monkeypatch.setattr(CPSL, "_warmup_probabilities", lambda self, weak: fixture["soft_pseudo_labels_quarter"].clone())
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = CPSL._target_loss

    def target_loss(self: CPSL, output: SegOutput, labels: torch.Tensor) -> torch.Tensor:
        seen.append((output.logits.detach(), labels.clone()))
        return original(self, output, labels)

    monkeypatch.setattr(CPSL, "_target_loss", target_loss)
    target: dict[str, Any] = {"image": fixture["target_images"]}
    draws = None
    if "full_images" in fixture:  # the loader's full frames and the weak views' records; the authors' RandAugment draws
        full = fixture["full_images"]
        height, width = fixture["target_images"].shape[-2:]
        target |= {"full_image": full, "replay": [
            [FullFrameRecord(tuple(full.shape[-2:])), CropRecord(tuple(full.shape[-2:]), top, left, height, width), FlipRecord((height, width), flip)]
            for top, left, flip in fixture["crops"]
        ]}  # fmt: skip
        draws = AuthorsRandAugment(fixture["randaugment_draws"])
        draws.install(monkeypatch)
        made: list[tuple[torch.Tensor, Any]] = []
        original_strong_view = recipe._strong_view
        monkeypatch.setattr(recipe, "_strong_view", lambda weak: made.append(original_strong_view(weak)) or made[-1])
    batches = {"source": {"image": fixture["source_images"], "label": fixture["source_labels"]}, "target": target}
    losses = recipe.training_step(batches, 1)
    assert not orders, "the authors' step drew more contrastive permutations"
    if draws is not None:
        assert draws.all_used(), "segadapt's RandAugmentMC drew less than the authors'"
        ((strong, _),) = made  # segadapt's strong views: the authors' on every 8-bit level
        assert torch.equal((strong * 255).round(), (fixture["strong_images"] * 255).round())
    losses["loss"].backward()
    return losses, seen


def test_one_cpsl_step_equals_the_authors_step(fixture: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = replay_recipe(fixture, tmp_path)
    losses, seen = run_step(recipe, fixture, monkeypatch)
    # the rectified labels of the weak view with the CutMix box's source labels (the authors' threshold_arg at 1/4)
    ((_, labels),) = seen
    assert torch.equal(labels, fixture["target_labels"].reshape(labels.shape))
    assert losses["cutmix"].item() == float(fixture["coin"] < 0.5)
    # every loss term: the source CE, L^t_SEG = 0.1 CE + 1.0 RCE, L_SL (both terms), L_REG, the total
    assert_close(losses["loss_source"], fixture["loss_source"], "loss_source")
    assert_close(losses["loss_target"], fixture["loss_target"], "loss_target")
    assert_close(losses["loss_sl"], fixture["loss_sl"], "loss_sl")
    assert_close(losses["loss_reg"], fixture["loss_reg"], "loss_reg")
    if fixture["loss_contrast"].item() == 0.0:  # the authors' contrastive term: not on CutMix iterations, nor before the queue is full
        assert "loss_contrast" not in losses
    else:
        assert_close(losses["loss_contrast"], fixture["loss_contrast"], "loss_contrast")
    assert_close(losses["loss"], fixture["loss"] + fixture["loss_source"], "loss (the authors' step returns it without the source CE)")
    # every gradient: the network's and the prototypes'
    grads = {f"model.{name}": p.grad for name, p in recipe.model.named_parameters()} | {"head.prototypes": recipe.head.prototypes.grad}
    assert grads.keys() == fixture["grads"].keys()
    for name, grad in grads.items():
        assert grad is not None, name
        assert_close(grad, fixture["grads"][name], f"gradient of {name}")
    if "queue_after" in fixture:  # both queues after the step: each image's pixels in, the oldest blocks out
        assert_close(bank_by_age(recipe.bank), by_age(fixture["queue_after"], fixture["opt"]["fbs"]), "memory bank")
        assert_close(bank_by_age(recipe.bank_out), by_age(fixture["queue_out_after"], fixture["opt"]["fbs"]), "logit bank")
        labels = torch.roll(recipe.bank_labels, -int(recipe.bank.pointer), dims=0)  # the authors' queue_label, a quirk kept
        assert torch.equal(labels, by_age(fixture["queue_label_after"].unsqueeze(1), fixture["opt"]["fbs"]).flatten())


def relative_departures(recipe: CPSL, losses: dict[str, torch.Tensor], fixture: dict[str, Any]) -> dict[str, float]:
    """Each loss term's and gradient's ``max |ours - theirs| / max |theirs|``."""
    keys = ("loss_source", "loss_target", "loss_sl", "loss_reg")
    terms = {key: (losses[key] - fixture[key]).abs().item() / fixture[key].abs().item() for key in keys}
    grads = {f"model.{name}": p.grad for name, p in recipe.model.named_parameters()} | {"head.prototypes": recipe.head.prototypes.grad}
    return terms | {name: ((g - fixture["grads"][name]).abs().max() / fixture["grads"][name].abs().max()).item() for name, g in grads.items()}


@pytest.mark.parametrize(
    ("override", "moved"),
    [
        ("method.source_align_corners=false", "loss_source"),
        ("method.cutmix_label_sampling=pixel_centres", "loss_target"),
        ("method.sinkhorn_per_image=false", "loss_sl"),
        ("method.output_self_labeling=false", "loss_sl"),
        ("method.consistency=segmentation", "loss_reg"),
        ("method.consistency_reduction=pixel_mean", "loss_reg"),
        ("method.target_loss=ce", "loss_target"),
    ],
)
def test_each_other_option_value_departs_from_the_authors_step(
    override: str, moved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture tells each option's two values apart: the other value moves its loss term, and a gradient by over 1e-2.

    Measured: the source CE moves by 5e-4 (gradients 7e-2) with half-pixel upsampling, the target term by
    1e-3 with pixel-centre CutMix labels, L_SL by 2e-2 with one Sinkhorn over the batch and by 0.54
    without the second term, L_REG by 0.43 as Eq. 13 and by 4.0 (K - 1) as the per-pixel mean, the
    target term by 0.77 as plain CE.
    """
    fixture = load_step(STEPS[0])
    recipe = replay_recipe(fixture, tmp_path, override)
    losses, _ = run_step(recipe, fixture, monkeypatch)
    departures = relative_departures(recipe, losses, fixture)
    assert departures[moved] > 1e-4
    assert max(value for name, value in departures.items() if not name.startswith("loss")) > 1e-2


@pytest.mark.parametrize("override", ["method.bank_scores=cosine", "method.bank_partial=true"])
def test_the_full_queue_tells_the_bank_options_apart(override: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With full queues and prototypes off unit length, cosine scores of the bank move L_SL; with the queue full,
    a partly filled bank is the same as a full one (the option is told apart by the empty-queue step instead)."""
    for name in STEPS:
        fixture = load_step(name)
        recipe = replay_recipe(fixture, tmp_path / name, override)
        losses, _ = run_step(recipe, fixture, monkeypatch)
        departure = relative_departures(recipe, losses, fixture)["loss_sl"]
        if override == "method.bank_scores=cosine":  # no queue rows to score in the empty-queue step
            assert (departure > 1e-4) == ("queue_start" in fixture)
        else:  # the partly filled bank sees the first image's pixels in the second image's problem
            assert (departure > 1e-4) == ("queue_start" not in fixture)


def test_the_contrastive_step_tells_the_bank_labels_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels of the sampled pixels in the bank (not the authors' first-pixel labels) move the contrastive term (measured 3e-3)."""
    fixture = load_step("cpsl_step_contrast.pt")
    recipe = replay_recipe(fixture, tmp_path, "method.contrastive_bank_labels=sampled")
    losses, _ = run_step(recipe, fixture, monkeypatch)
    assert (losses["loss_contrast"] - fixture["loss_contrast"]).abs().item() > 1e-3 * fixture["loss_contrast"].item()


@pytest.mark.parametrize(
    ("overrides", "moved"),
    [
        (("method.randaugment_translate_quirk=false",), ("loss_reg",)),
        (("method.teacher_view=weak", "method.pixel_sampling=class_balanced"), ("loss_target", "loss_reg")),
    ],
)
def test_the_geometry_step_tells_the_teacher_options_apart(
    overrides: tuple[str, ...], moved: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's own horizontal shift replayed on the teacher moves L_REG (measured 0.11, gradients 0.45); the
    momentum network on the weak crop instead of the full frame moves the rectified labels and L_REG (measured 9e-3
    and 3e-2; its L_SL pixels come from the crop, so the sampling is class-balanced there)."""
    fixture = load_step("cpsl_step_geometry.pt")
    recipe = replay_recipe(fixture, tmp_path, *overrides)
    losses, _ = run_step(recipe, fixture, monkeypatch)
    departures = relative_departures(recipe, losses, fixture)
    assert all(departures[term] > 1e-3 for term in moved), departures
    assert max(value for name, value in departures.items() if not name.startswith("loss")) > 1e-2
