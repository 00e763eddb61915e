"""DARS thresholds and sampling ratios (streamed and exact), target distributions, progressive rounds, parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segadapt.config import PseudoLabelConfig, load_config
from segadapt.errors import ConfigError, DataError
from segadapt.methods.common import class_pixel_counts
from segadapt.methods.dars import (
    PROGRESSIVE_SCHEDULES,
    ProgressiveSchedule,
    dars_class_quotas,
    dars_thresholds,
    dars_thresholds_exact,
    given_distribution,
    label_distribution,
    predicted_distribution,
)
from segadapt.methods.thresholds import (
    MAX_BIN_WIDTH,
    ConfidenceHistogram,
    apply_thresholds,
    class_probabilities,
    confidence_bin_index,
)

PARITY_FILE = Path(__file__).parent / "fixtures" / "parity" / "dars_thresholds.npz"  # recorded from the authors' code
FLOAT16_SPACING_NEAR_ONE = 2.0**-11
INF = float("inf")


def histogram_of(confidences_per_class) -> ConfidenceHistogram:
    histogram = ConfidenceHistogram(len(confidences_per_class))
    values = torch.cat([torch.as_tensor(c, dtype=torch.float64).reshape(-1) for c in confidences_per_class])
    classes = torch.cat([torch.full((len(c),), j) for j, c in enumerate(confidences_per_class)])
    histogram.update(values, classes)
    return histogram


def both_versions(confidences_per_class, prior, alpha, **kwargs):
    """(streamed, exact) DARS thresholds of the same data."""
    return (
        dars_thresholds(histogram_of(confidences_per_class), prior, alpha, **kwargs),
        dars_thresholds_exact(confidences_per_class, prior, alpha, **kwargs),
    )


# --------------------------------------------------------------------------------- quotas


def test_quotas_follow_the_reference_formula_with_cityscapes_priors():
    prior = [32.07, 5.71, 20.7, 0.564, 0.761, 1.054, 0.1696, 0.5014, 13.4993, 0.8981, 3.6445,
             1.1458, 0.1393, 6.0, 0.2949, 0.1954, 0.2341, 0.0818, 0.3917]  # fmt: skip
    for alpha, num_images in [(0.2, 1), (0.45, 2603), (0.5, 7)]:
        # gen_pseudo_label_utils.py, with the reference's operation order
        expected = [int(alpha * p / 88.04 * (1024 * 2048) * num_images) for p in prior]
        quotas = dars_class_quotas(prior, alpha, num_pixels=1024 * 2048 * num_images, valid=88.04)
        assert quotas.tolist() == expected


def test_quotas_default_valid_is_the_prior_sum_and_the_unit_does_not_matter():
    assert dars_class_quotas([60.0, 30.0, 10.0], alpha=0.5, num_pixels=1000).tolist() == [300, 150, 50]
    assert dars_class_quotas([0.6, 0.3, 0.1], alpha=0.5, num_pixels=1000).tolist() == [300, 150, 50]
    assert dars_class_quotas([6, 3, 1], alpha=0.5, num_pixels=1000).tolist() == [300, 150, 50]
    # an ignore share outside the prior (valid > sum) labels fewer pixels: 50 % of the 1000
    assert dars_class_quotas([30.0, 20.0], alpha=1.0, num_pixels=1000, valid=100.0).tolist() == [300, 200]
    assert dars_class_quotas([30.0, 20.0], alpha=0.0, num_pixels=1000).tolist() == [0, 0]


@pytest.mark.parametrize(
    ("prior", "alpha", "valid", "message"),
    [
        ([0.5, 0.5], 1.5, None, r"DARS labeling ratio alpha must lie in \[0, 1\], got 1.5"),
        ([0.5, -0.1], 0.2, None, "prior\\) must be a list of finite non-negative numbers"),
        ([0.0, 0.0], 0.2, None, "prior\\) sums to zero; give at least one class a positive share"),
        ([0.5, 0.5], 0.2, 0.0, "the valid \\(non-ignored\\) share must be positive, got 0.0"),
    ],
)
def test_bad_quota_arguments_name_the_value(prior, alpha, valid, message):
    with pytest.raises(ConfigError, match=message):
        dars_class_quotas(prior, alpha, num_pixels=100, valid=valid)


def test_a_prior_with_the_wrong_class_count_is_refused():
    with pytest.raises(ConfigError, match="class distribution has 2 entries but there are 3 classes"):
        dars_thresholds(ConfidenceHistogram(3), [0.5, 0.5], 0.2)
    with pytest.raises(ConfigError, match="class distribution has 2 entries but there are 3 classes"):
        dars_thresholds_exact([[0.5], [0.5], [0.5]], [0.5, 0.5], 0.2)


# ------------------------------------------------------------------- thresholds, hand-made


def test_threshold_is_the_nth_largest_and_ties_set_the_sampling_ratio():
    # 20 pixels in all; prior 1:1, alpha 0.5 -> quota 5 per class
    confidences = [
        [1.0, 0.875, 0.75, 0.75, 0.75, 0.75, 0.75, 0.5, 0.25, 0.25],  # 5th largest 0.75, 7 pixels >= it
        [0.9375, 0.875, 0.8125, 0.75, 0.6875, 0.625, 0.5625, 0.5, 0.4375, 0.375],  # no ties
    ]
    for result in both_versions(confidences, [1.0, 1.0], 0.5):
        assert result.thresholds.tolist() == [0.75, 0.6875]
        assert result.sampling_ratio.tolist() == [5 / 7, 1.0]


def test_quota_larger_than_the_class_takes_its_smallest_confidence_without_sampling():
    confidences = [[0.5, 0.25, 0.125], [0.75] * 17]  # quota of class 0 = int(0.5 * 0.5 * 20) = 5 > 3
    for result in both_versions(confidences, [0.5, 0.5], 0.5):
        assert result.thresholds.tolist() == [0.125, 0.75]
        assert result.sampling_ratio.tolist() == [1.0, 5 / 17]


def test_empty_classes_zero_quotas_and_alpha_zero_label_nothing():
    confidences = [[0.5, 0.75, 1.0, 1.0], [], [0.25, 0.5, 0.75, 1.0]]
    # class 1 never predicted; class 2 has prior 0 -> quota 0
    for result in both_versions(confidences, [1.0, 1.0, 0.0], 0.5):
        assert result.thresholds.tolist() == [1.0, INF, INF]
        assert result.sampling_ratio.tolist() == [1.0, 1.0, 1.0]  # quota int(0.5 * 1/2 * 8) = 2: the two 1.0s
    for result in both_versions(confidences, [1.0, 1.0, 1.0], 0.0):
        assert result.thresholds.tolist() == [INF, INF, INF]
    confidence = torch.tensor([[[0.5, 0.75, 1.0, 0.25]]])
    prediction = torch.tensor([[[0, 0, 0, 2]]])
    nothing = dars_thresholds(histogram_of([[0.5, 0.75, 1.0], [], [0.25]]), [1.0, 1.0, 1.0], 0.0)
    assert apply_thresholds((confidence, prediction), *nothing).tolist() == [[[255, 255, 255, 255]]]


def test_tie_at_the_top_is_sampled_down_to_the_quota():
    confidences = [[1.0, 1.0, 1.0, 1.0], [0.5, 0.25, 0.25, 0.125]]
    for result in both_versions(confidences, [1.0, 1.0], 0.5):  # quota 2 each
        assert result.thresholds.tolist() == [1.0, 0.25]
        assert result.sampling_ratio.tolist() == [0.5, 2 / 3]


def test_alpha_one_with_the_predicted_distribution_labels_every_pixel():
    confidences = [[0.5, 0.75, 0.75, 1.0], [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0]]
    histogram = histogram_of(confidences)
    prior = predicted_distribution(histogram)
    assert prior.tolist() == [1 / 3, 2 / 3]
    for result in (dars_thresholds(histogram, prior, 1.0), dars_thresholds_exact(confidences, prior, 1.0)):
        assert result.thresholds.tolist() == [0.5, 0.25]
        assert result.sampling_ratio.tolist() == [1.0, 1.0]


def test_applied_streamed_thresholds_label_the_quota_of_each_class():
    # sp_j * #(kept by the streamed threshold) = N_j, so binning does not change how many get labelled
    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(1, 4, 64, 64, generator=generator) * 5).softmax(dim=1)
    histogram = ConfidenceHistogram(4)
    histogram.update(probs)
    prior = [0.4, 0.3, 0.2, 0.1]
    quotas = dars_class_quotas(prior, 0.3, histogram.num_pixels)
    rule = dars_thresholds(histogram, prior, 0.3)
    labels = apply_thresholds(probs, *rule, generator=torch.Generator().manual_seed(1))
    labelled = torch.bincount(labels[labels != 255], minlength=4)
    assert (labelled - quotas).abs().max() <= 1  # int(n - n * sp) rounds by at most one pixel


# -------------------------------------------------------------------- streamed vs exact


def test_streamed_equals_exact_on_float16_confidences():
    generator = torch.Generator().manual_seed(2)
    probs = (torch.randn(3, 5, 32, 32, generator=generator) * 6).softmax(dim=1).half()
    confidence, prediction = probs.max(dim=1)
    confidences = [confidence[prediction == j] for j in range(5)]
    histogram = ConfidenceHistogram(5)
    histogram.update(probs)
    prior = [30.0, 20.0, 10.0, 5.0, 1.0]
    for alpha in (0.0, 0.1, 0.4, 0.9, 1.0):
        streamed = dars_thresholds(histogram, prior, alpha)
        exact = dars_thresholds_exact(confidences, prior, alpha)
        assert torch.equal(streamed.thresholds, exact.thresholds), alpha
        assert torch.equal(streamed.sampling_ratio, exact.sampling_ratio), alpha


def assert_within_bin_tolerance(histogram, streamed, exact) -> None:
    """The tolerance the binning implies, for data off the float16 grid.

    Threshold: the lower edge of the bin holding the exact order statistic, so
    ``exact - MAX_BIN_WIDTH < streamed <= exact``. Sampling ratio: the streamed one divides the
    same quota by ``m`` more pixels, ``m`` <= the pixels sharing the threshold's bin, so
    ``0 <= sp_exact - sp_streamed <= m / kept_streamed``.
    """
    finite = torch.isfinite(exact.thresholds)
    assert torch.equal(finite, torch.isfinite(streamed.thresholds))
    assert bool((streamed.thresholds[finite] <= exact.thresholds[finite]).all())
    assert bool((exact.thresholds[finite] - streamed.thresholds[finite] < MAX_BIN_WIDTH).all())
    for j in finite.nonzero().squeeze(1).tolist():
        bin_index = int(confidence_bin_index(streamed.thresholds[j : j + 1]))
        in_bin = int(histogram.counts[j, bin_index])
        kept_streamed = int(histogram.counts[j, bin_index:].sum())
        gap = float(exact.sampling_ratio[j] - streamed.sampling_ratio[j])
        assert -1e-12 <= gap <= in_bin / kept_streamed + 1e-12, j


def test_streamed_is_within_the_bin_tolerance_on_float32_confidences():
    generator = torch.Generator().manual_seed(3)
    probs = (torch.randn(3, 5, 32, 32, generator=generator) * 6).softmax(dim=1)
    confidence, prediction = probs.max(dim=1)
    confidences = [confidence[prediction == j] for j in range(5)]
    histogram = ConfidenceHistogram(5)
    histogram.update(probs)
    for alpha in (0.05, 0.3, 0.7):
        streamed = dars_thresholds(histogram, [30.0, 20.0, 10.0, 5.0, 1.0], alpha)
        exact = dars_thresholds_exact(confidences, [30.0, 20.0, 10.0, 5.0, 1.0], alpha)
        assert_within_bin_tolerance(histogram, streamed, exact)


# --------------------------------------------------------------------- target distributions


def test_label_counts_and_the_source_or_labeled_split_distribution():
    labels = torch.tensor([[[0, 0, 1, 255], [2, 2, 2, 255]], [[0, 1, 1, 1], [255, 255, 255, 255]]])
    counts = class_pixel_counts(labels, num_classes=4)  # the one pixel counter (methods.common)
    assert counts.tolist() == [3, 4, 3, 0]
    assert label_distribution(counts).tolist() == [0.3, 0.4, 0.3, 0.0]
    assert class_pixel_counts(torch.tensor([0, 9, 1]), num_classes=2, ignore_index=9).tolist() == [1, 1]
    with pytest.raises(DataError, match=r"labels hold ids \[7\] outside 0..3 that are not the ignore index 255"):
        class_pixel_counts(torch.tensor([0, 7]), num_classes=4)


def test_given_and_predicted_distributions_are_normalised():
    assert given_distribution([50.0, 25.0, 25.0], 3).tolist() == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="has 2 entries but there are 3 classes"):
        given_distribution([0.5, 0.5], 3)
    with pytest.raises(ConfigError, match="given class distribution must be a list of finite non-negative"):
        given_distribution([0.5, float("nan"), 0.5], 3)
    histogram = histogram_of([[0.5] * 3, [], [0.9]])
    assert predicted_distribution(histogram).tolist() == [0.75, 0.0, 0.25]
    with pytest.raises(ConfigError, match="predicted class counts sums to zero"):
        predicted_distribution(ConfidenceHistogram(3))


# ---------------------------------------------------------------------- progressive rounds


REFERENCE_CONFIG_TABLE = {  # docs/reference_code.md, "DARS: progressive rounds": alpha round 1 -> 2, RandScale rounds 0/1 -> 2
    "deeplabv2_cityscapes8_crop361": ((0.2, 0.45), (0.25, 1.0), (0.25, 1.0)),
    "pspnet50_cityscapes8_crop361": ((0.2, 0.5), (0.25, 1.0), (0.2, 1.5)),
    "pspnet50_cityscapes8_crop713": ((0.4, 0.65), (0.5, 2.0), (0.5, 3.0)),
    "pspnet50_cityscapes4_crop361": ((0.4, 0.6), (0.25, 1.0), (0.2, 1.5)),
    "pspnet50_cityscapes4_crop713": ((0.4, 0.65), (0.5, 2.0), (0.4, 2.5)),
    "pspnet50_voc1464_crop321": ((0.4, 0.5), (0.5, 1.5), (0.5, 2.0)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIG_TABLE))
def test_shipped_schedules_reproduce_the_authors_configs(name):
    (alpha_1, alpha_2), early_scale, late_scale = REFERENCE_CONFIG_TABLE[name]
    rounds = PROGRESSIVE_SCHEDULES[name].rounds()
    assert [r.index for r in rounds] == [0, 1, 2]
    assert [r.labeling_ratio for r in rounds] == [None, alpha_1, alpha_2]
    assert rounds[0].scale_range == rounds[1].scale_range == early_scale
    assert rounds[2].scale_range == pytest.approx(late_scale, abs=1e-12)


def test_scale_growth_is_relative_as_table_s2_best_setting_in_the_configs():
    # Tab. S2's best beta_min = 0.2, beta_max = 0.5 on [0.25, 1.0]: the configs' [0.2, 1.5]
    schedule = ProgressiveSchedule((0.2, 0.5, 0.6), (0.25, 1.0), (0.2, 0.5))
    assert schedule.num_rounds == 4
    assert schedule.round(2).scale_range == pytest.approx((0.2, 1.5))
    assert schedule.round(3).scale_range == pytest.approx((0.16, 2.25))  # beyond the paper: compounds
    with pytest.raises(ConfigError, match=r"round 4 is outside the schedule \(rounds 0..3\)"):
        schedule.round(4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labeling_ratios": (0.2, 1.2), "initial_scale_range": (0.5, 2.0)}, "every DARS labeling ratio"),
        ({"labeling_ratios": (0.2,), "initial_scale_range": (2.0, 0.5)}, "0 < low <= high"),
        ({"labeling_ratios": (0.2,), "initial_scale_range": (0.5, 2.0), "scale_growth": (1.0, 0.0)}, "beta_min < 1"),
    ],
)
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProgressiveSchedule(**kwargs)


# ----------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def parity():
    data = np.load(PARITY_FILE)
    confidences = [data[f"conf_{j}"] for j in range(len(data["prior_percent"]))]
    reference_args = {
        "num_pixels": int(data["pixels_per_image"]) * int(data["num_images"]),
        "valid": float(data["valid_percent"]),
    }
    return data, confidences, reference_args, histogram_of(confidences)


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_dars_matches_the_reference_code(parity, alpha):
    data, confidences, reference_args, histogram = parity
    prior = data["prior_percent"]
    exact = dars_thresholds_exact(confidences, prior, alpha, **reference_args)
    streamed = dars_thresholds(histogram, prior, alpha, **reference_args)
    # the confidences are float16, which lie on bin edges: the streamed result is exact too
    for result in (exact, streamed):
        assert np.array_equal(result.thresholds.numpy(), data[f"DARS_{alpha}_thr"])
        np.testing.assert_allclose(result.sampling_ratio.numpy(), data[f"DARS_{alpha}_sp"], rtol=0, atol=1e-12)


def test_dars_streamed_tolerance_on_float32_reference_confidences(parity):
    data, confidences, reference_args, _ = parity
    generator = torch.Generator().manual_seed(0)
    jittered = []  # break the float16 ties: up to half a float16 step near 1, kept in [0, 1]
    for values in confidences:
        noise = (torch.rand(len(values), generator=generator, dtype=torch.float64) - 0.5) * FLOAT16_SPACING_NEAR_ONE
        jittered.append((torch.as_tensor(values).double() + noise).clamp(0.0, 1.0).float())
    histogram = histogram_of(jittered)
    for alpha in (0.2, 0.5):
        streamed = dars_thresholds(histogram, data["prior_percent"], alpha, **reference_args)
        exact = dars_thresholds_exact(jittered, data["prior_percent"], alpha, **reference_args)
        assert_within_bin_tolerance(histogram, streamed, exact)


# ------------------------------------------------------- confidence precision (the DARS code's float16)


def test_the_dars_rule_defaults_to_the_authors_float16_softmax_of_averaged_logits():
    dars = PseudoLabelConfig(rule="dars")
    assert (dars.effective_confidence_dtype, dars.effective_average) == ("float16", "logits")
    for other in ("st", "cbst"):  # their references are not the DARS code: unchanged
        config = PseudoLabelConfig(rule=other)
        assert (config.effective_confidence_dtype, config.effective_average) == ("float32", "probabilities")
    explicit = PseudoLabelConfig(rule="dars", confidence_dtype="float32", average="probabilities")
    assert (explicit.effective_confidence_dtype, explicit.effective_average) == ("float32", "probabilities")
    for name in ("benchmark/dars_td", "benchmark/dars_sd", "benchmark/semi_supervised", "gta5_to_cityscapes/dars_td",
                 "cityscapes_semi/pspnet50_1-8", "scannet_semi/pspnet50_1-4"):
        rule = load_config(name).pseudo_label
        assert (rule.effective_confidence_dtype, rule.effective_average) == ("float16", "logits"), name
    for name in ("benchmark/dars_paper", "gta5_to_cityscapes/dars_paper"):
        rule = load_config(name).pseudo_label
        assert (rule.effective_confidence_dtype, rule.effective_average) == ("float32", "probabilities"), name


def test_float16_rounds_confidences_from_one_minus_2_pow_12_up_to_one():
    margins = torch.tensor([7.0, 8.0, 8.4, 9.0, 12.0])  # 1 - softmax = ~e^-margin: 9e-4, 3.4e-4, 2.2e-4, 1.2e-4, 6e-6
    logits = torch.stack([margins, torch.zeros(5)]).view(2, 1, 5)
    half = class_probabilities(logits, "logits", "float16")[0, 0]
    single = class_probabilities(logits, "logits", "float32")[0, 0]
    assert half.dtype == torch.float16 and single.dtype == torch.float32
    assert half.tolist()[2:] == [1.0, 1.0, 1.0] and max(half.tolist()[:2]) < 1.0
    assert bool((single < 1.0).all()) and len(set(single.tolist())) == 5  # float32: no tie
    assert bool(((1 - single.double() >= 2.0**-12) == (half < 1)).all())
    probabilities = logits.softmax(dim=0)
    assert torch.equal(class_probabilities(probabilities, "probabilities", "float16"), probabilities.half())


def sure_and_unsure_logits() -> torch.Tensor:
    """One image ``[1, 2, 1, 200]``: 100 pixels of class 0 with margins 8.5..10 (confidence above
    ``1 - 2**-12``: all 1.0 in float16, all distinct in float32), 100 of class 1 with margins 0.5..3."""
    sure, unsure = torch.linspace(8.5, 10.0, 100), torch.linspace(0.5, 3.0, 100)
    class0 = torch.cat([sure, torch.zeros(100)])
    class1 = torch.cat([torch.zeros(100), unsure])
    return torch.stack([class0, class1]).view(1, 2, 1, 200)


@pytest.mark.parametrize("streamed", [True, False])
def test_float16_ties_give_threshold_one_and_random_sampling_float32_the_most_confident(streamed):
    logits, prior, alpha = sure_and_unsure_logits(), [50.0, 50.0], 0.5  # quota 50 pixels per class
    labels = {}
    for dtype in ("float16", "float32"):
        probs = class_probabilities(logits, "logits", dtype)
        confidence, prediction = probs.max(dim=1)
        per_class = [confidence[prediction == j] for j in range(2)]
        result = dars_thresholds(histogram_of(per_class), prior, alpha) if streamed else dars_thresholds_exact(per_class, prior, alpha)
        if dtype == "float16":  # 100 pixels tie at 1.0 for a quota of 50: threshold 1.0, half of them kept at random
            assert result.thresholds[0] == 1.0 and result.sampling_ratio[0] == 0.5
        else:  # the 50th largest, nothing tied: no sampling
            assert result.thresholds[0] < 1.0 and result.sampling_ratio[0] == 1.0
        assert result.sampling_ratio[1] == 1.0  # class 1's confidences are distinct in both precisions
        labels[dtype] = apply_thresholds((confidence, prediction), *result, generator=torch.Generator().manual_seed(0))[0, 0]
    most_confident = set(range(50, 100))  # the sure pixels' margins grow with the index
    for dtype, kept in labels.items():
        class0 = set((kept[:100] == 0).nonzero().squeeze(1).tolist())
        assert len(class0) == 50, dtype
    assert set((labels["float32"][:100] == 0).nonzero().squeeze(1).tolist()) == most_confident
    assert set((labels["float16"][:100] == 0).nonzero().squeeze(1).tolist()) != most_confident  # a random half


def test_the_default_path_gives_the_authors_thresholds_and_sampling_ratios_below_one(parity):
    data, confidences, reference_args, _ = parity
    dtype = PseudoLabelConfig(rule="dars").effective_confidence_dtype  # the default precision of the rule
    values = torch.cat([torch.as_tensor(c) for c in confidences])
    classes = torch.cat([torch.full((len(c),), j) for j, c in enumerate(confidences)])
    histogram = ConfidenceHistogram(len(confidences))
    histogram.update(class_probabilities(values, "probabilities", dtype), classes)
    for alpha in (0.2, 0.5):
        result = dars_thresholds(histogram, data["prior_percent"], alpha, **reference_args)
        assert np.array_equal(result.thresholds.numpy(), data[f"DARS_{alpha}_thr"])
        assert np.array_equal(result.sampling_ratio.numpy(), data[f"DARS_{alpha}_sp"])
        assert int((result.sampling_ratio < 1).sum()) == 18  # the random sampling acts on every class but one
        assert float(result.sampling_ratio.min()) < 0.997
    # the same confidences with their float16 ties broken (what a float32 softmax gives): sampling is inert
    generator = torch.Generator().manual_seed(0)
    untied = [(torch.as_tensor(c).double() + (torch.rand(len(c), generator=generator, dtype=torch.float64) - 0.5) * FLOAT16_SPACING_NEAR_ONE)
              .clamp(0.0, 1.0).float() for c in confidences]
    for alpha in (0.2, 0.5):
        result = dars_thresholds_exact(untied, data["prior_percent"], alpha, **reference_args)
        assert float(result.sampling_ratio.min()) > 0.9999
