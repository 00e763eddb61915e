"""One DARS step replayed against the authors' code (issue 28, step parity).

``tests/fixtures/parity/dars_step.npz`` holds one pseudo-label pass and one training iteration of
CVMI-Lab/DARS (0cfe09a) on a tiny input, recorded by ``tests/fixtures/parity/scripts/dars_step.py``
(which says how to regenerate it): the weights, the images, the random draws of the random
sampling (one ``torch.randperm`` per image and class), the thresholds, sampling ratios and pseudo
labels, every loss term, every parameter's gradient and the BatchNorm statistics after the step.
segadapt replays it with its own functions and the DARS options at the authors' values
(``pseudo_label.confidence_dtype: float16``, ``pseudo_label.average: logits``,
``method.batch_norm: separate``, weights 1 and 1, auxiliary weight 0.4, and ``apply_thresholds``'s
``drop_count="float32"``); the test needs none of the authors' code. The random draws enter
through ``apply_thresholds``'s ``keys``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segadapt.config import EvalConfig, load_config
from segadapt.data.classes import CITYSCAPES_CLASSES
from segadapt.engine.inference import predict_scores
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.pseudo_labelling import _predictions, inference_config
from segadapt.engine.recipes.self_training import SelfTraining
from segadapt.methods.dars import dars_thresholds
from segadapt.methods.thresholds import ConfidenceHistogram, apply_thresholds
from segadapt.models.base import SegOutput

PARITY = Path(__file__).parent / "fixtures" / "parity"
RELATIVE = 1e-5


def _script():
    """The fixture script as a module: its tiny network and constants (importing it needs no authors' code)."""
    spec = importlib.util.spec_from_file_location("dars_step_script", PARITY / "scripts" / "dars_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
FIXTURE = dict(np.load(PARITY / "dars_step.npz"))
IGNORE = SCRIPT.IGNORE


class TinyNet(nn.Module):
    """The fixture's layers as a segadapt model: the main logits, and the layer-3 head's in training."""

    aux_weight = SCRIPT.AUX_WEIGHT

    def __init__(self) -> None:
        super().__init__()
        self.layers = SCRIPT.TinyPSPLayers()
        state = {key[len("weight/"):]: torch.from_numpy(value) for key, value in FIXTURE.items() if key.startswith("weight/")}
        self.layers.load_state_dict(state)

    def forward(self, images: torch.Tensor) -> SegOutput:
        features, layer3 = self.layers.trunk(images)
        aux = self.layers.aux(layer3) if self.training else None
        return SegOutput(self.layers.cls(features), features, aux)


def dars_config():
    """The replay's config: every DARS option that departs from the paper at the authors' value, spelled out."""
    return load_config(None, [
        "recipe=self_training", "pseudo_label.rule=dars", f"pseudo_label.ratio={SCRIPT.LABELING_RATIO}",
        "pseudo_label.confidence_dtype=float16", "pseudo_label.average=logits", "pseudo_label.flip=true",
        "pseudo_label.scales=[1.0]", "method.batch_norm=separate", "method.source_weight=1.0",
        f"method.target_weight={SCRIPT.CONSISTENCY_LAMBDA}",
    ])


def pseudo_label_pass() -> dict[str, torch.Tensor]:
    """segadapt's two passes on the fixture's images, the random sampling replaying the authors' permutations."""
    cfg = dars_config()
    model = TinyNet().eval()
    images = torch.from_numpy(FIXTURE["unlabelled"])
    batch = [{"name": [f"image{i}" for i in range(len(images))], "image": images}]
    with torch.no_grad():
        probs = torch.stack([p for _, p, _ in _predictions(model, batch, inference_config(cfg.pseudo_label), torch.device("cpu"), cfg.pseudo_label)])
    confidence, prediction = probs.max(dim=1)
    histogram = ConfidenceHistogram(SCRIPT.NUM_CLASSES)
    histogram.update(probs)
    # the quota's constants are the authors' hard-coded Cityscapes ones: 1024 x 2048 pixels an image, valid share 88.04 %
    thresholds = dars_thresholds(
        histogram, SCRIPT.CITYSCAPES_SPLIT8_PRIOR, cfg.pseudo_label.ratio,
        num_pixels=SCRIPT.CITYSCAPES_PIXELS * len(images), valid=SCRIPT.CITYSCAPES_SPLIT8_VALID,
    )
    survivors = apply_thresholds((confidence, prediction), thresholds.thresholds, ignore_index=IGNORE)
    keys, sizes = recorded_keys(survivors, thresholds.thresholds)
    labels = apply_thresholds((confidence, prediction), *thresholds, ignore_index=IGNORE, keys=keys, drop_count="float32")
    return {"probs": probs, "confidence": confidence, "prediction": prediction, "thresholds": thresholds.thresholds,
            "sampling_ratio": thresholds.sampling_ratio, "labels": labels, "sizes": sizes}


def recorded_keys(survivors: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' permutations as segadapt's per-pixel keys: survivor ``perm[r]`` of class ``j`` gets key ``r``.

    ``second_forward`` calls ``randperm(n)`` per image and class (classes in order) over the ``n``
    survivors in row-major order, and drops the first ``int(n - n * sp_j)``: the ``n - n * sp_j``
    smallest keys. Returns the keys and the survivor counts segadapt sees (to compare with ``n``).
    """
    permutations = np.split(FIXTURE["permutations"], np.cumsum(FIXTURE["permutation_sizes"])[:-1])
    keys = torch.zeros(survivors.shape, dtype=torch.float64)
    sizes = torch.zeros(len(permutations), dtype=torch.int64)
    for call, permutation in enumerate(permutations):
        image, j = divmod(call, SCRIPT.NUM_CLASSES)
        members = (survivors[image].reshape(-1) == j).nonzero().squeeze(1)
        sizes[call] = members.numel()
        if members.numel() == permutation.size and torch.isfinite(thresholds[j]):
            keys[image].view(-1)[members[torch.from_numpy(permutation).long()]] = torch.arange(members.numel(), dtype=torch.float64)
    return keys, sizes


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|``."""
    reference = reference.double()
    return float((value.double() - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def labelled_pass() -> dict[str, torch.Tensor]:
    return pseudo_label_pass()


def test_confidences_are_the_authors_float16_softmax_of_flip_averaged_logits(labelled_pass: dict) -> None:
    # first_forward keeps, per argmax class, every pixel's confidence (pixels in image and row-major order)
    confidence, prediction = labelled_pass["confidence"], labelled_pass["prediction"]
    counts = torch.bincount(prediction.flatten(), minlength=SCRIPT.NUM_CLASSES)
    assert counts.tolist() == FIXTURE["class_counts"].tolist()
    ours = np.concatenate([confidence.flatten()[prediction.flatten() == j].double().numpy() for j in range(SCRIPT.NUM_CLASSES)])
    np.testing.assert_array_equal(ours, FIXTURE["confidences_per_class"])
    assert labelled_pass["probs"].dtype == torch.float16 and float((confidence == 1.0).float().mean()) > 0.2  # the ties DARS samples among


def test_the_averaged_logits_are_the_authors(labelled_pass: dict) -> None:
    # the first pass saves the flip-averaged logits as float16 (second_forward reloads them)
    model, images = TinyNet().eval(), torch.from_numpy(FIXTURE["unlabelled"])
    with torch.no_grad():
        scores = predict_scores(model, images, None, inference_config(dars_config().pseudo_label), average="logits")
    assert torch.equal(scores.half(), torch.from_numpy(FIXTURE["logits"]).permute(0, 3, 1, 2))


def rounds_to(values: torch.Tensor, float16_reference: torch.Tensor) -> torch.Tensor:
    """Where ``values`` round to ``float16_reference`` up to 1e-5 relative (a float32 sum in another order may not)."""
    reference = float16_reference.double()
    half_ulp = torch.from_numpy(np.spacing(np.abs(float16_reference.numpy()))).double() / 2
    return (values.double() - reference).abs() <= half_ulp + RELATIVE * reference.abs()


def test_sliding_windows_average_each_window_with_its_mirror_as_the_authors() -> None:
    # scale_process: windows of 17 x 17 at stride 12 (2 x 3 positions on 25 x 33, not symmetric in width), each
    # predicted with its mirror by net_process and averaged where they overlap: window_flip=window
    model, images = TinyNet().eval(), torch.from_numpy(FIXTURE["unlabelled"])
    reference = torch.from_numpy(FIXTURE["window_logits"]).permute(0, 3, 1, 2)
    views = {mode: EvalConfig(flip=True, sliding_window=SCRIPT.WINDOW, window_flip=mode) for mode in ("window", "image")}
    with torch.no_grad():
        scores = {mode: predict_scores(model, images, None, cfg, average="logits") for mode, cfg in views.items()}
    assert bool(rounds_to(scores["window"], reference).all())
    assert float((scores["window"].half() != reference).float().mean()) < 1e-3  # float16 equal but at rounding ties
    image_flip = scores["image"].half().argmax(1) != reference.argmax(1)  # the flipped image's windows are others
    assert float(image_flip.float().mean()) > 0.01


def test_thresholds_and_sampling_ratios_are_the_authors(labelled_pass: dict) -> None:
    thresholds, ratios = labelled_pass["thresholds"], labelled_pass["sampling_ratio"]
    expected_thresholds = torch.from_numpy(FIXTURE["thresholds"])
    expected_ratios = torch.from_numpy(FIXTURE["sampling_ratio"])
    # a class whose quota int(alpha * prior_j / valid * pixels) is 0: the authors index conf[-1] (the smallest
    # confidence) and keep nothing through sp = 0; segadapt's threshold is inf, which keeps nothing either
    # (module doc of segadapt.methods.dars), its ratio 1 unused
    nothing = expected_ratios == 0
    assert int(nothing.sum()) == 1 and bool(torch.isinf(thresholds[nothing]).all())
    assert torch.equal(thresholds[~nothing], expected_thresholds[~nothing])
    assert torch.equal(ratios[~nothing], expected_ratios[~nothing])
    # the fixture exercises the three cases: overflow (sp 1, smallest threshold), ties at 1.0 (sp < 1), between
    assert bool(((expected_thresholds == 1.0) & (expected_ratios < 1) & (expected_ratios > 0)).any())
    assert bool(((expected_thresholds < 1.0) & (expected_ratios == 1)).any())


def test_pseudo_labels_replaying_the_authors_permutations_are_theirs(labelled_pass: dict) -> None:
    sizes, recorded = labelled_pass["sizes"], torch.from_numpy(FIXTURE["permutation_sizes"]).long()
    quota_zero = torch.from_numpy(FIXTURE["sampling_ratio"] == 0).repeat(len(FIXTURE["unlabelled"]))
    assert torch.equal(sizes[~quota_zero], recorded[~quota_zero])  # the same survivors, so the same permutation sizes
    expected = torch.from_numpy(FIXTURE["pseudo_labels"]).long()
    assert torch.equal(labelled_pass["labels"], expected)
    sampled = FIXTURE["sampling_ratio"] < 1
    assert bool(np.isin(expected.numpy(), np.flatnonzero(sampled)).any())  # sampled classes keep some pixels


def test_the_drop_count_can_round_as_the_authors_float32() -> None:
    # second_forward drops int(n - n.float() * sp) of n survivors: 100 pixels at sp 0.6 lose 39, not 40
    confidence, prediction = torch.ones(1, 10, 10), torch.zeros(1, 10, 10, dtype=torch.long)
    def kept(drop_count: str) -> int:
        ratio = torch.tensor([0.6], dtype=torch.float64)
        labels = apply_thresholds((confidence, prediction), torch.zeros(1), ratio, torch.Generator().manual_seed(0),
                                  ignore_index=IGNORE, drop_count=drop_count)
        return int((labels == 0).sum())
    assert (kept("float32"), kept("float64")) == (61, 60)


def test_training_step_losses_and_gradients_are_the_authors(labelled_pass: dict) -> None:
    cfg = dars_config()
    model = TinyNet().train()
    recipe = SelfTraining(cfg, model, build_seg_loss(cfg.loss, ignore_index=IGNORE), CITYSCAPES_CLASSES)
    outputs: list[SegOutput] = []
    model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    batches = {
        "source": {"image": torch.from_numpy(FIXTURE["labelled"]), "label": torch.from_numpy(FIXTURE["labelled_target"]).long()},
        "target": {"image": torch.from_numpy(FIXTURE["unlabelled"]), "label": labelled_pass["labels"]},
    }
    losses = recipe.training_step(batches, 1)
    losses["loss"].backward()

    assert len(outputs) == 2  # separate forwards: the labelled batch, then the pseudo-labelled one
    terms = {
        "loss_main_labelled": recipe.seg_loss(outputs[0].logits, batches["source"]["label"]),
        "loss_aux_labelled": recipe.seg_loss(outputs[0].aux_logits, batches["source"]["label"]),
        "loss_main_pseudo": recipe.seg_loss(outputs[1].logits, batches["target"]["label"]),
        "loss_aux_pseudo": recipe.seg_loss(outputs[1].aux_logits, batches["target"]["label"]),
        "loss_supervised": losses["loss_source"], "loss_pseudo": losses["loss_target"], "loss_total": losses["loss"],
    }
    for name, value in terms.items():
        assert float(value.detach()) == pytest.approx(float(FIXTURE[name]), rel=RELATIVE), name
    gradients = {key[len("grad/"):]: torch.from_numpy(value) for key, value in FIXTURE.items() if key.startswith("grad/")}
    assert sorted(gradients) == sorted(name for name, _ in model.layers.named_parameters())
    for name, parameter in model.layers.named_parameters():
        assert parameter.grad is not None and relative_difference(parameter.grad, gradients[name]) <= RELATIVE, name
    # two BatchNorm updates per step, labelled batch then pseudo-labelled batch
    for name, buffer in model.layers.named_buffers():
        expected = torch.from_numpy(FIXTURE[f"bn_after/{name}"])
        assert relative_difference(buffer, expected) <= RELATIVE, name
