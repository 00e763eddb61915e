"""ST/CBST pseudo-label thresholds: histogram binning, streaming vs exact, DARS-style sampling, parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segadapt.config import EvalConfig, PseudoLabelConfig
from segadapt.engine.inference import predict_scores
from segadapt.errors import CheckpointError, ConfigError
from segadapt.methods.thresholds import (
    BIN_EDGES,
    MAX_BIN_WIDTH,
    NUM_BINS,
    ConfidenceHistogram,
    apply_thresholds,
    cbst_thresholds,
    cbst_thresholds_exact,
    class_probabilities,
    confidence_bin_index,
    kth_largest_exact,
    st_thresholds,
)
from segadapt.models.base import SegOutput

PARITY_FILE = Path(__file__).parent / "fixtures" / "parity" / "dars_thresholds.npz"  # recorded from the authors' code
FLOAT16_SPACING_NEAR_ONE = 2.0**-11


def random_probs(seed: int, shape=(2, 4, 16, 16), sharpness: float = 4.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * sharpness
    return logits.softmax(dim=1)


def per_class_confidences(probs: torch.Tensor) -> list[torch.Tensor]:
    confidence, prediction = probs.max(dim=1)
    return [confidence[prediction == j] for j in range(probs.shape[1])]


def load_parity():
    return np.load(PARITY_FILE)


@pytest.fixture(scope="module")
def parity():
    data = load_parity()
    confidences = [data[f"conf_{j}"] for j in range(len(data["prior_percent"]))]
    histogram = ConfidenceHistogram(len(confidences))
    histogram.update(*flatten_per_class(confidences))
    return data, confidences, histogram


def flatten_per_class(confidences) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([torch.as_tensor(c) for c in confidences])
    classes = torch.cat([torch.full((len(c),), j) for j, c in enumerate(confidences)])
    return values, classes


def jitter_to_float32(confidences, seed: int) -> list[torch.Tensor]:
    """Break the float16 ties: each value moves by up to half a float16 step near 1 (stays in [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    jittered = []
    for values in confidences:
        values = torch.as_tensor(values).float()
        noise = (torch.rand(values.shape, generator=generator) - 0.5) * FLOAT16_SPACING_NEAR_ONE
        jittered.append((values + noise).clamp(0.0, 1.0))
    return jittered


# ------------------------------------------------------------------------------------ binning


def test_bin_edges_run_from_zero_to_one_and_are_finest_near_one():
    widths = BIN_EDGES[1:] - BIN_EDGES[:-1]
    assert BIN_EDGES.shape == (NUM_BINS,)
    assert BIN_EDGES[0] == 0.0 and BIN_EDGES[-1] == 1.0
    assert bool((widths > 0).all())
    assert widths.max() == MAX_BIN_WIDTH == 2.0**-12
    lower_edges = BIN_EDGES[:-1]
    upper = (lower_edges >= 0.5) & (lower_edges <= 1.0 - 2.0**-14)  # float16 normals of 1 - p
    relative_width = widths[upper] / (1.0 - lower_edges[upper])
    assert relative_width.max() == 2.0**-10
    assert widths[-1] == 2.0**-24  # the last bin below 1.0 is one float32 step wide


def test_every_float16_confidence_lies_on_its_own_bin_edge():
    all_float16_in_unit_interval = torch.arange(0, 0x3C01, dtype=torch.int16).view(torch.float16)
    bins = confidence_bin_index(all_float16_in_unit_interval)
    assert torch.equal(BIN_EDGES[bins], all_float16_in_unit_interval.double())


def test_a_confidence_falls_in_the_bin_whose_edges_enclose_it():
    generator = torch.Generator().manual_seed(0)
    confidence = 1.0 - torch.rand(200_000, generator=generator, dtype=torch.float64) ** 6  # crowds near 1
    edge_cases = torch.tensor([0.0, 0.5, 1.0, 0.5 - 1e-12, 1.0 - 1e-12], dtype=torch.float64)
    confidence = torch.cat([confidence, edge_cases])
    bins = confidence_bin_index(confidence)
    assert bool((BIN_EDGES[bins] <= confidence).all())
    below_one = bins < NUM_BINS - 1
    assert bool((confidence[below_one] < BIN_EDGES[bins[below_one] + 1]).all())
    assert bins[-5:].tolist() == [0, 0x3800, NUM_BINS - 1, 0x3800 - 1, NUM_BINS - 2]


def test_float32_confidences_above_one_minus_2_pow_13_get_a_bin_each():
    steps = torch.arange(0, 2**11 + 1, dtype=torch.float64)
    values = (1.0 - steps * 2.0**-24).float()  # every float32 in [1 - 2**-13, 1]
    assert torch.unique(confidence_bin_index(values)).numel() == values.numel()


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_confidences_outside_the_unit_interval_are_rejected(bad):
    with pytest.raises(ValueError, match="softmax probabilities, not logits"):
        confidence_bin_index(torch.tensor([0.3, bad]))


# ---------------------------------------------------------------------------------- histogram


def test_update_from_probabilities_equals_update_from_confidence_and_prediction():
    probs = random_probs(1)
    from_probs, from_pair = ConfidenceHistogram(4), ConfidenceHistogram(4)
    from_probs.update(probs)
    from_pair.update(*probs.max(dim=1))
    assert torch.equal(from_probs.counts, from_pair.counts)
    _, prediction = probs.max(dim=1)
    assert from_probs.class_counts.tolist() == torch.bincount(prediction.reshape(-1), minlength=4).tolist()
    assert from_probs.num_pixels == 2 * 16 * 16


def test_valid_mask_leaves_pixels_out():
    probs = random_probs(2)
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[:, :, :8] = True
    masked, cropped = ConfidenceHistogram(4), ConfidenceHistogram(4)
    masked.update(probs, valid_mask=valid)
    cropped.update(probs[..., :8])
    assert torch.equal(masked.counts, cropped.counts)
    assert masked.num_pixels == 2 * 16 * 8


def test_merged_shards_equal_one_histogram_of_everything():
    probs = random_probs(3, shape=(6, 4, 8, 8))
    whole = ConfidenceHistogram(4)
    whole.update(probs)
    shards = [ConfidenceHistogram(4) for _ in range(3)]
    for index, shard in enumerate(shards):
        shard.update(probs[2 * index : 2 * index + 2])
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert torch.equal(merged.counts, whole.counts)
    assert merged.counts.shape == (4, NUM_BINS)  # memory does not grow with the data
    assert torch.equal(cbst_thresholds(merged, 0.3).thresholds, cbst_thresholds(whole, 0.3).thresholds)


def test_state_dict_round_trip_and_a_mismatched_state_is_refused():
    histogram = ConfidenceHistogram(4)
    histogram.update(random_probs(4))
    restored = ConfidenceHistogram(4)
    restored.load_state_dict(histogram.state_dict())
    assert torch.equal(restored.counts, histogram.counts)
    with pytest.raises(CheckpointError, match=r"'counts' must be a tensor of shape \(3, 28673\).*recompute"):
        ConfidenceHistogram(3).load_state_dict(histogram.state_dict())
    with pytest.raises(ValueError, match="cannot merge a 4-class histogram into a 3-class one"):
        ConfidenceHistogram(3).merge(histogram)


def test_update_rejects_a_class_count_mismatch_and_unknown_classes():
    with pytest.raises(ValueError, match="probabilities have 4 classes, the histogram 3"):
        ConfidenceHistogram(3).update(random_probs(5))
    with pytest.raises(ValueError, match=r"predicted class ids must lie in \[0, 3\)"):
        ConfidenceHistogram(3).update(torch.tensor([0.5, 0.6]), torch.tensor([1, 3]))


def test_kth_largest_with_ties_ranks_past_the_end_and_empty_classes():
    values = [torch.tensor([0.5, 0.75, 0.75, 0.75, 1.0]), torch.tensor([0.25, 0.625]), torch.tensor([])]
    histogram = ConfidenceHistogram(3)
    histogram.update(*flatten_per_class(values))
    for ranks, expected_thresholds, expected_kept in [
        ([0, 0, 0], [1.0, 0.625, float("inf")], [1, 1, 0]),
        ([2, 1, 5], [0.75, 0.25, float("inf")], [4, 2, 0]),
        ([3, 7, 0], [0.75, 0.25, float("inf")], [4, 2, 0]),  # ties at 0.75; rank 7 of 2 -> the smallest
        ([4, 1, 0], [0.5, 0.25, float("inf")], [5, 2, 0]),
    ]:
        for thresholds, kept in (histogram.kth_largest(torch.tensor(ranks)), kth_largest_exact(values, torch.tensor(ranks))):
            assert thresholds.tolist() == expected_thresholds
            assert kept.tolist() == expected_kept


def _all_reduce_worker(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's intra-op thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    histogram = ConfidenceHistogram(4)
    histogram.update(random_probs(10 + rank))
    histogram.all_reduce()
    torch.save(histogram.counts, f"{result_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_sums_the_histograms_of_two_gloo_ranks(tmp_path):
    # fork: the workers reuse the imported torch instead of importing it again (seconds each)
    mp.start_processes(_all_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    expected = ConfidenceHistogram(4)
    for rank in range(2):
        expected.update(random_probs(10 + rank))
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), expected.counts)


# ------------------------------------------------------------------------------- ST and CBST


def test_st_uses_one_threshold_and_keeps_ties_at_it():
    thresholds, ratio = st_thresholds(0.75, num_classes=3)
    assert thresholds.tolist() == [0.75] * 3 and ratio.tolist() == [1.0] * 3
    confidence = torch.tensor([[[0.75, 0.7499, 0.9, 0.2]]])
    prediction = torch.tensor([[[0, 1, 2, 2]]])
    labels = apply_thresholds((confidence, prediction), thresholds)
    assert labels.tolist() == [[[0, 255, 2, 255]]]
    with pytest.raises(ConfigError, match=r"ST confidence threshold must lie in \[0, 1\], got 1.2"):
        st_thresholds(1.2, 3)


def test_cbst_keeps_the_top_alpha_fraction_of_each_class():
    # class 0: 10 distinct values 0.1..1.0; class 1: ties at the top; class 2: never predicted
    values = [torch.arange(1, 11, dtype=torch.float64) / 10, torch.tensor([0.9, 0.9, 0.9, 0.6]), torch.tensor([])]
    histogram = ConfidenceHistogram(3)
    histogram.update(*flatten_per_class([v.half() for v in values]))
    cases = {
        0.2: [0.8, 0.9],  # rank int(10 * 0.2) = 2 -> 3rd largest; rank int(4 * 0.2) = 0 -> the top
        0.5: [0.5, 0.9],  # rank 5 -> 6th largest; rank 2 -> still inside the 0.9 tie
        0.0: [1.0, 0.9],  # alpha 0 keeps the pixels tied at the maximum, as the reference
        1.0: [0.1, 0.6],  # the reference's index falls off the array here; we keep every pixel
    }
    for alpha, expected in cases.items():
        exact = cbst_thresholds_exact([v.half() for v in values], alpha)
        streamed = cbst_thresholds(histogram, alpha)
        expected_half = torch.tensor(expected + [float("inf")]).half().double()
        assert torch.equal(exact.thresholds, expected_half), alpha
        assert torch.equal(streamed.thresholds, expected_half), alpha
        assert exact.sampling_ratio.tolist() == streamed.sampling_ratio.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="CBST labeling ratio alpha must lie in"):
        cbst_thresholds(histogram, -0.1)


def test_streamed_cbst_equals_exact_cbst_on_float16_confidences():
    probs = random_probs(6, shape=(4, 5, 32, 32), sharpness=6.0).half()
    histogram = ConfidenceHistogram(5)
    histogram.update(probs)
    for alpha in (0.0, 0.1, 0.35, 0.8, 1.0):
        assert torch.equal(
            cbst_thresholds(histogram, alpha).thresholds, cbst_thresholds_exact(per_class_confidences(probs), alpha).thresholds
        )


def test_streamed_cbst_is_within_one_bin_below_the_exact_threshold_on_float32():
    probs = random_probs(7, shape=(4, 5, 32, 32), sharpness=6.0)
    histogram = ConfidenceHistogram(5)
    histogram.update(probs)
    for alpha in (0.05, 0.3, 0.7):
        streamed = cbst_thresholds(histogram, alpha).thresholds
        exact = cbst_thresholds_exact(per_class_confidences(probs), alpha).thresholds
        bins = confidence_bin_index(exact)
        assert torch.equal(streamed, BIN_EDGES[bins])  # the lower edge of the exact value's bin
        assert bool((exact - streamed < MAX_BIN_WIDTH).all())


# --------------------------------------------------------------------------- apply_thresholds


def test_apply_thresholds_ignores_pixels_below_their_class_threshold():
    probs = torch.tensor(
        [[[0.9, 0.6, 0.2, 0.5], [0.1, 0.4, 0.8, 0.5]]]  # one image, 2 classes, 1 x 4 pixels
    ).unsqueeze(2)
    labels = apply_thresholds(probs, torch.tensor([0.95, 0.8]))
    assert labels.tolist() == [[[255, 255, 1, 255]]]  # class 0 needs 0.95; pixel 3 ties 0/0 -> class 0
    assert apply_thresholds(probs, torch.tensor([float("inf"), 0.0]), ignore_index=-1).tolist() == [[[-1, -1, 1, -1]]]


def test_apply_thresholds_rejects_inconsistent_arguments():
    probs = random_probs(8)
    with pytest.raises(ValueError, match="probabilities have 4 classes but 3 thresholds"):
        apply_thresholds(probs, torch.zeros(3))
    with pytest.raises(ValueError, match="ignore_index 2 is a class id"):
        apply_thresholds(probs, torch.zeros(4), ignore_index=2)
    with pytest.raises(ValueError, match="3 sampling ratios for 4 thresholds"):
        apply_thresholds(probs, torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match=r"sampling ratios must lie in \[0, 1\]"):
        apply_thresholds(probs, torch.zeros(4), torch.tensor([1.0, 1.5, 1.0, 1.0]))


def sampling_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 10x10 images of class 0 (confidences spread over [0.5, 1)) and class 1 (always kept)."""
    generator = torch.Generator().manual_seed(11)
    confidence = 0.5 + 0.5 * torch.rand(2, 10, 10, generator=generator)
    prediction = torch.zeros(2, 10, 10, dtype=torch.long)
    prediction[:, :, :3] = 1
    # float64 like the ratios the rules return: int(n - n * sp) is sensitive to sp's last bits
    return confidence, prediction, torch.tensor([0.6, 0.0]), torch.tensor([0.3, 1.0], dtype=torch.float64)


def test_sampling_drops_int_n_minus_n_sp_survivors_per_image_and_class():
    confidence, prediction, thresholds, ratio = sampling_case()
    plain = apply_thresholds((confidence, prediction), thresholds)
    sampled = apply_thresholds((confidence, prediction), thresholds, ratio, torch.Generator().manual_seed(0))
    for image in range(2):
        survivors = int((plain[image] == 0).sum())
        assert int((sampled[image] == 0).sum()) == survivors - int(survivors - survivors * 0.3)
    assert bool((sampled[plain == 255] == 255).all())  # below-threshold pixels stay ignored
    assert torch.equal(sampled[prediction == 1], plain[prediction == 1])  # ratio 1: untouched
    kept = sampled == 0
    assert bool((confidence[kept] < confidence[(plain == 0) & ~kept].max()).any())  # not only the top is kept


def test_sampling_is_uniform_over_all_survivors_and_deterministic_per_generator():
    confidence, prediction, thresholds, ratio = sampling_case()
    plain = apply_thresholds((confidence, prediction), thresholds)
    draws = 400
    kept_frequency = torch.zeros(2, 10, 10)
    for seed in range(draws):
        sampled = apply_thresholds((confidence, prediction), thresholds, ratio, torch.Generator().manual_seed(seed))
        kept_frequency += (sampled == 0).float()
    for image in range(2):
        survivors = plain[image] == 0
        n = int(survivors.sum())
        kept_probability = (n - int(n - n * 0.3)) / n  # every survivor alike, whatever its confidence
        frequency = kept_frequency[image][survivors] / draws
        # 5 binomial standard deviations per pixel
        tolerance = 5 * (kept_probability * (1 - kept_probability) / draws) ** 0.5
        assert bool(((frequency - kept_probability).abs() < tolerance).all())
    again = [apply_thresholds((confidence, prediction), thresholds, ratio, torch.Generator().manual_seed(5)) for _ in range(2)]
    other = apply_thresholds((confidence, prediction), thresholds, ratio, torch.Generator().manual_seed(6))
    assert torch.equal(again[0], again[1])
    assert not torch.equal(again[0], other)


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_cbst_matches_the_dars_reference(parity, alpha):
    data, confidences, histogram = parity
    reference = data[f"cbst_{alpha}_thr"]
    # float16 confidences: exact and streamed thresholds both equal the reference's float16 values
    assert np.array_equal(cbst_thresholds_exact(confidences, alpha).thresholds.numpy(), reference)
    assert np.array_equal(cbst_thresholds(histogram, alpha).thresholds.numpy(), reference)
    assert np.array_equal(cbst_thresholds(histogram, alpha).sampling_ratio.numpy(), data[f"cbst_{alpha}_sp"])


def test_streamed_cbst_tolerance_on_float32_confidences(parity):
    _, confidences, _ = parity
    jittered = jitter_to_float32(confidences, seed=0)
    histogram = ConfidenceHistogram(len(jittered))
    histogram.update(*flatten_per_class(jittered))
    for alpha in (0.2, 0.5):
        exact = cbst_thresholds_exact(jittered, alpha).thresholds
        streamed = cbst_thresholds(histogram, alpha).thresholds
        # stated tolerance: exact - MAX_BIN_WIDTH < streamed <= exact, i.e. 2**-12 = 2.4e-4
        assert bool((streamed <= exact).all()) and bool((exact - streamed < MAX_BIN_WIDTH).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_histogram_and_sampling_on_gpu_match_cpu():
    probs = random_probs(12, shape=(2, 4, 32, 32))
    on_cpu, on_gpu = ConfidenceHistogram(4), ConfidenceHistogram(4, device="cuda")
    on_cpu.update(probs)
    on_gpu.update(probs.cuda())
    assert torch.equal(on_gpu.counts.cpu(), on_cpu.counts)
    thresholds = cbst_thresholds(on_gpu, 0.4)
    assert torch.equal(thresholds.thresholds.cpu(), cbst_thresholds(on_cpu, 0.4).thresholds)
    ratio = torch.tensor([0.5, 1.0, 0.25, 0.9])
    labels = [
        apply_thresholds(p, thresholds.thresholds, ratio, torch.Generator().manual_seed(3)).cpu() for p in (probs, probs.cuda())
    ]
    assert torch.equal(labels[0], labels[1])


# ------------------------------------------------------------------ what the views average


class FixedLogits(torch.nn.Module):
    """Returns the same logits ``[C, H, W]`` whatever the input: flip averaging pairs pixel x with W - 1 - x."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, images: torch.Tensor) -> SegOutput:
        logits = self.table.expand(len(images), *self.table.shape)
        return SegOutput(logits, logits)


def test_averaging_logits_or_probabilities_over_flips_gives_different_confidences():
    # pixel 0 predicts logits (4, 0), pixel 1 (0, 2); with flip averaging each pixel meets the other
    table = torch.tensor([[[4.0, 0.0]], [[0.0, 2.0]]])
    model, images, cfg = FixedLogits(table), torch.zeros(1, 3, 1, 2), EvalConfig(flip=True)
    logits = predict_scores(model, images, cfg=cfg, average="logits")
    probabilities = predict_scores(model, images, cfg=cfg, average="probabilities")
    assert torch.allclose(logits[0, :, 0, 0], torch.tensor([2.0, 1.0]))  # the mean of the logits
    by_logits = class_probabilities(logits, "logits", "float32")[0, 0, 0, 0]
    by_probabilities = class_probabilities(probabilities, "probabilities", "float32")[0, 0, 0, 0]
    sigmoid = torch.sigmoid(torch.tensor([1.0, 4.0, -2.0], dtype=torch.float64))
    assert float(by_logits) == pytest.approx(float(sigmoid[0]), abs=1e-6)  # softmax of the mean: 0.731
    assert float(by_probabilities) == pytest.approx(float(sigmoid[1] + sigmoid[2]) / 2, abs=1e-6)  # mean of the softmaxes: 0.551
    assert PseudoLabelConfig(rule="dars").effective_average == "logits"  # the DARS code's, the rule's default
