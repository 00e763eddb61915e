"""BLV (CVPR 2023 supplement, Alg. 1): offsets, logit variation, sigma schedule, class counts.

The loss itself is the engine's ``loss.name: blv`` (BLVSegLoss), tested in test_blv_engine.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segadapt.data.folder import FolderDataset
from segadapt.errors import DataError
from segadapt.methods import blv
from segadapt.methods.blv import (
    ClassCounter,
    blv_logits,
    blv_offsets,
    dataset_class_counts,
    expected_variation,
    sigma_schedule,
)
from segadapt.methods.common import class_pixel_counts

from data_fixtures import make_folder

# The list hard-coded in every *_blv.py config of grantword8/BLV (GTA5 pixel counts; docs/reference_code.md,
# "BLV: class counts").
REFERENCE_COUNTS = [16099193283, 4155428633, 8478285320, 925367586, 317481282, 531401266, 67288808, 40463971,
                    3810296251, 1074861777, 6784666433, 181828023, 15321782, 259269812, 564950248, 184638969,
                    32522117, 15799033, 2718199]
# f_c / max f for that list with the authors' fixed formula (docs/reference_code.md, "BLV: offsets"), to 3
# decimals.
REFERENCE_OFFSETS = [0.103, 0.243, 0.169, 0.398, 0.508, 0.455, 0.669, 0.721, 0.252, 0.382, 0.192, 0.566, 0.821,
                     0.529, 0.449, 0.564, 0.744, 0.818, 1.0]


# ----------------------------------------------------------------------------------- offsets


def test_offsets_hand_computed():
    # N = 1111; f_c = (log 1111 - log n_c) / log 1111, the rarest class (n = 1) having the largest value.
    offsets = blv_offsets([1, 10, 100, 1000])
    expected = [1.0, math.log(111.1) / math.log(1111), math.log(11.11) / math.log(1111), math.log(1.111) / math.log(1111)]
    assert offsets.dtype == torch.float32
    torch.testing.assert_close(offsets, torch.tensor(expected), rtol=0, atol=1e-7)


def test_offsets_match_the_reference_config_values():
    torch.testing.assert_close(blv_offsets(REFERENCE_COUNTS), torch.tensor(REFERENCE_OFFSETS), rtol=0, atol=5e-4)


def test_offsets_follow_the_fixed_code_not_the_typo_or_the_pre_fix_formula():
    counts = torch.tensor([1000.0, 100.0, 10.0], dtype=torch.float64)
    offsets = blv_offsets(counts)
    # Alg. 1 as printed: log(sum(n) - log(n)) / max; pre-fix code (494d428): (max log n - log n) / max.
    typo = torch.log(counts.sum() - counts.log())
    pre_fix = counts.log().max() - counts.log()
    assert not torch.allclose(offsets.double(), typo / typo.max(), atol=1e-3)
    assert offsets[0] > 0 and (pre_fix / pre_fix.max())[0] == 0  # the head class still varies
    torch.testing.assert_close(offsets.double(), (counts.sum().log() - counts.log()) / math.log(1110 / 10))


def test_offsets_are_scale_free_and_accept_arrays_and_tensors():
    counts = [5, 50, 500]
    expected = blv_offsets(counts)
    torch.testing.assert_close(blv_offsets(np.array(counts) / 555.0), expected)
    torch.testing.assert_close(blv_offsets(torch.tensor(counts)), expected)


def test_zero_counts_share_the_largest_offset_and_leave_the_others_exact():
    offsets = blv_offsets([0, 1, 3, 0])
    assert torch.isfinite(offsets).all()
    # N = 4 (the true total); the absent classes count as the rarest observed one (1).
    torch.testing.assert_close(offsets, torch.tensor([1.0, 1.0, math.log(4 / 3) / math.log(4), 1.0]))


def test_degenerate_count_lists():
    assert blv_offsets([7]).tolist() == [0.0]  # one class: nothing to balance
    assert blv_offsets([3, 3, 3]).tolist() == [1.0, 1.0, 1.0]  # reference behaviour: max-normalised


@pytest.mark.parametrize(("counts", "message"), [
    ([], r"non-empty 1-d list \(one count per class\), got shape \(0,\)"),
    ([[1, 2], [3, 4]], r"non-empty 1-d list .* got shape \(2, 2\)"),
    ([1, -2, 3], r"finite and non-negative, got \[1.0, -2.0, 3.0\]"),
    ([1, float("nan")], "finite and non-negative"),
    ([0, 0], "class counts are all zero: count the labels of a labelled split first"),
])
def test_offsets_errors(counts, message):
    with pytest.raises(ValueError, match=message):
        blv_offsets(counts)


# ----------------------------------------------------------------------------- logit variation


def test_variation_is_positive_bounded_by_the_class_offset_per_element():
    offsets = torch.tensor([0.0, 0.25, 1.0])
    logits = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    variation = blv_logits(logits, offsets, sigma=0.5, generator=torch.Generator().manual_seed(1)) - logits
    assert variation.shape == logits.shape
    assert (variation >= 0).all()
    assert (variation <= offsets.view(1, 3, 1, 1) + 1e-6).all()
    assert (variation[:, 0] == 0).all()  # f_c = 0: no variation
    # one draw per element: the variation differs across images, pixels and classes
    tail = variation[:, 2]
    assert tail.unique().numel() > 0.9 * tail.numel()
    assert not torch.allclose(variation[:, 1] / 0.25, tail / 1.0)


def test_noise_is_abs_of_clamp_minus_one_one():
    # |clamp(N(0, 4), -1, 1)| saturates at 1 with P(|Z| >= 1/4) = 0.8026 and is never clamped to 0
    # (Alg. 1's clamp(0, 1) would zero half the samples).
    logits = torch.zeros(1, 1, 200, 500)
    noise = blv_logits(logits, torch.ones(1), sigma=4.0, generator=torch.Generator().manual_seed(0))
    saturated = (noise == 1.0).double().mean().item()
    assert abs(saturated - math.erfc(0.25 / math.sqrt(2))) < 0.005
    assert (noise == 0).double().mean().item() < 1e-3
    assert noise.min() >= 0 and noise.max() <= 1


@pytest.mark.parametrize("sigma", [0.5, 4.0, 6.0])
def test_expected_variation_is_the_mean_of_the_sampled_noise(sigma):
    # the fixed part of the variation: mean of |clamp(N(0, sigma), -1, 1)| over 100,000 draws
    noise = blv_logits(torch.zeros(1, 1, 200, 500), torch.ones(1), sigma, generator=torch.Generator().manual_seed(0))
    assert abs(noise.double().mean().item() - expected_variation(sigma)) < 3e-3
    assert expected_variation(0.0) == 0.0
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        expected_variation(-1.0)


def test_variation_is_deterministic_with_a_generator():
    logits, offsets = torch.randn(2, 3, 5, 5), torch.tensor([0.2, 0.6, 1.0])
    first = blv_logits(logits, offsets, 6.0, generator=torch.Generator().manual_seed(3))
    again = blv_logits(logits, offsets, 6.0, generator=torch.Generator().manual_seed(3))
    other = blv_logits(logits, offsets, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_zero_sigma_returns_the_logits_and_gradients_pass_unchanged():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    offsets = torch.tensor([0.1, 0.5, 1.0])
    assert blv_logits(logits, offsets, 0.0) is logits
    blv_logits(logits, offsets, 2.0).sum().backward()
    assert torch.equal(logits.grad, torch.ones_like(logits))


def test_variation_keeps_the_logits_dtype():
    logits = torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16)
    assert blv_logits(logits, torch.tensor([0.5, 1.0]), 1.0).dtype == torch.bfloat16


def test_variation_errors():
    with pytest.raises(ValueError, match="BLV sigma must be >= 0, got -1.0"):
        blv_logits(torch.zeros(1, 2, 3, 3), torch.ones(2), -1.0)
    with pytest.raises(ValueError, match=r"must agree on C; got logits \(1, 2, 3, 3\) and offsets \(3,\)"):
        blv_logits(torch.zeros(1, 2, 3, 3), torch.ones(3), 1.0)


# ------------------------------------------------------------------------------ sigma schedule


def test_sigma_schedule_rises_to_sigma0_at_t_mid_then_falls_to_zero():
    total, t_mid, sigma0 = 40_000, 30_000, 6.0
    assert sigma_schedule(0, total, sigma0, t_mid) == 0.0
    assert sigma_schedule(t_mid, total, sigma0, t_mid) == sigma0
    assert sigma_schedule(total, total, sigma0, t_mid) == 0.0
    assert sigma_schedule(15_000, total, sigma0, t_mid) == 3.0
    assert sigma_schedule(35_000, total, sigma0, t_mid) == 3.0
    assert sigma_schedule(total + 1, total, sigma0, t_mid) == 0.0
    rising = [sigma_schedule(t, total, sigma0, t_mid) for t in range(0, t_mid + 1, 500)]
    falling = [sigma_schedule(t, total, sigma0, t_mid) for t in range(t_mid, total + 1, 500)]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a > b for a, b in zip(falling, falling[1:]))
    assert max(rising + falling) == sigma0


def test_sigma_schedule_turning_point_at_the_ends():
    assert sigma_schedule(0, 100, 4.0, 0) == 4.0  # no ramp up
    assert sigma_schedule(100, 100, 4.0, 100) == 4.0  # no ramp down
    assert sigma_schedule(50, 100, 4.0, 100) == 2.0


@pytest.mark.parametrize(("args", "field"), [
    ((0, 0, 6.0, 0), "total=0"),
    ((0, 100, 6.0, 101), "t_mid=101"),
    ((0, 100, -1.0, 50), "sigma0=-1.0"),
    ((-1, 100, 6.0, 50), "iteration=-1"),
])
def test_sigma_schedule_errors(args, field):
    with pytest.raises(ValueError, match=f"total > 0, 0 <= t_mid <= total, sigma0 >= 0 and iteration >= 0; .*{field}"):
        sigma_schedule(*args)


# ------------------------------------------------------------------------ the loss's arithmetic


def test_cross_entropy_of_the_varied_logits_penalises_a_head_class_pixel():
    # What BLVSegLoss computes in training: CE of blv_logits. Raising the tail logits makes a pixel of
    # the most frequent class cost more than under plain CE; sigma 0 is plain CE.
    counts, head = [1000, 200, 30, 1], torch.zeros(2, 6, 6, dtype=torch.long)
    logits = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    plain = F.cross_entropy(logits, head)
    varied = blv_logits(logits, blv_offsets(counts), 6.0, generator=torch.Generator().manual_seed(5))
    assert F.cross_entropy(varied, head) > plain + 0.3
    assert torch.equal(F.cross_entropy(blv_logits(logits, blv_offsets(counts), 0.0), head), plain)


def test_there_is_one_blv_loss_the_engines():
    assert not hasattr(blv, "BalancedLogitVariationLoss")  # loss.name: blv -> segadapt.engine.losses.BLVSegLoss


# ------------------------------------------------------------------------------- class counts


def test_class_counts_skip_the_ignore_index():
    labels = torch.tensor([[0, 2, 2, 255], [2, 255, 0, 2]])
    counts = class_pixel_counts(labels, num_classes=4)
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 0, 4, 0]
    assert class_pixel_counts(labels.clamp(max=3), 4, ignore_index=3).tolist() == [2, 0, 4, 0]


def test_unknown_label_ids_are_refused_with_the_fix():
    with pytest.raises(DataError, match=(
        r"labels hold ids \[-1, 7\] outside 0..3 that are not the ignore index 255; map raw label ids"
    )):
        ClassCounter(num_classes=4).update(torch.tensor([0, 7, -1, 255, 7]))


def test_class_counter_accumulates_and_is_saved_with_the_run():
    counter = ClassCounter(num_classes=3)
    counter.update(torch.tensor([[0, 0, 255], [2, 0, 1]]))
    counter.update(torch.tensor([2, 2, 255], dtype=torch.uint8))
    assert counter.counts.tolist() == [3, 1, 3]
    torch.testing.assert_close(counter.offsets(), blv_offsets([3, 1, 3]))
    restored = ClassCounter(num_classes=3)
    restored.load_state_dict(counter.state_dict())
    assert restored.counts.tolist() == [3, 1, 3]


def test_dataset_class_counts_read_every_label(tmp_path):
    tree = make_folder(tmp_path / "toy")
    dataset = FolderDataset(tree.root, "train")
    labels = np.concatenate([tree.labels[name].ravel() for name in dataset.names])
    expected = np.bincount(labels[labels != 255], minlength=3).tolist()
    assert dataset_class_counts(dataset).tolist() == expected
    first = tree.labels[dataset.names[0]].ravel()
    assert dataset_class_counts(dataset, indices=[0]).tolist() == np.bincount(first[first != 255], minlength=3).tolist()
    unlabeled = FolderDataset(tree.root, "extra")
    with pytest.raises(DataError, match="has no labels to count; BLV class counts come from a labelled split"):
        dataset_class_counts(unlabeled)
