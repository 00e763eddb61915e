"""CPSL's algorithms (CVPR 2022, docs/cpsl.md): Sinkhorn marginals and parity, memory bank, sampling, losses."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segadapt.errors import ConfigError, DataError
from segadapt.methods import cpsl
from segadapt.methods.common import (
    class_feature_means,
    class_feature_sums,
    class_pixel_counts,
    pixel_entropy,
    pixel_kl_divergence,
)
from segadapt.methods.cpsl import (
    ClassDistribution,
    MemoryBank,
    PrototypeAccumulator,
    SelfLabelingHead,
    class_prototypes,
    cpsl_total_loss,
    cutmix,
    cutmix_box,
    distillation_loss,
    gather_pixel_features,
    online_self_labeling_loss,
    prototype_kl_consistency,
    rectify_pseudo_labels,
    reverse_cross_entropy,
    sample_pixels,
    self_labeling_loss,
    symmetric_kl_consistency,
)
from segadapt.methods.sinkhorn import class_marginal_error, normalized_marginal, sinkhorn

PARITY = Path(__file__).parent / "fixtures" / "parity" / "cpsl_sinkhorn.npz"  # recorded from the authors' code
# CPSL's shipped warm-up class distribution (docs/reference_code.md, "CPSL: class distribution"):
# road 38%, motorbike 0.12%
CITYSCAPES_R = torch.tensor(
    [0.37922, 0.049299, 0.226651, 0.015507, 0.017205, 0.014027, 0.002186, 0.002213, 0.133376, 0.024243,
     0.043411, 0.013146, 0.001615, 0.066048, 0.004075, 0.002789, 0.001847, 0.001229, 0.001912]
)  # fmt: skip


def plain_sinkhorn(scores: torch.Tensor, r: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The authors' formulation (docs/reference_code.md, "CPSL: Sinkhorn"), in the linear domain."""
    q = torch.exp(scores / epsilon).T
    q = q / q.sum()
    num_samples = q.shape[1]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) * (r / r.sum())[:, None]
        q = q / q.sum(dim=0, keepdim=True) / num_samples
    return (q * num_samples).T


# --------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-6)])
def test_sinkhorn_converged_marginals_hold_for_random_scores(dtype: torch.dtype, tolerance: float) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = (torch.rand(1000, 7, generator=generator) * 2 - 1).to(dtype)
    r = (torch.rand(7, generator=generator) * 5).to(dtype)  # unnormalised on purpose: only ratios matter
    q = sinkhorn(scores, r, epsilon=0.05, iterations=500, tolerance=tolerance)
    assert q.dtype == dtype and (q >= 0).all()
    row_tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(q.sum(dim=1), torch.ones(1000, dtype=dtype), atol=row_tol, rtol=0)
    # column sums B * r_k / sum(r), to B * tolerance (class_marginal_error is per-sample mass)
    expected_columns = 1000 * r / r.sum()
    assert (q.sum(dim=0) - expected_columns).abs().max() <= 1000 * tolerance * 1.01
    assert class_marginal_error(q, r) < tolerance


def test_sinkhorn_uniform_marginal_is_equipartition() -> None:
    scores = torch.rand(600, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    q = sinkhorn(scores, None, iterations=1000, tolerance=1e-10)
    assert class_marginal_error(q) < 1e-10
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 150.0, dtype=torch.float64), atol=600 * 1e-10, rtol=0)
    # None and an explicit uniform r are the same problem
    torch.testing.assert_close(q, sinkhorn(scores, torch.ones(4), iterations=1000, tolerance=1e-10))


def test_sinkhorn_extreme_scores_with_65536_plus_rows_stay_finite_in_float32() -> None:
    # scores at the cosine bounds +-1 with epsilon 0.05: exp(+-20) in the linear domain
    num_rows = 65536 + 2048
    generator = torch.Generator().manual_seed(2)
    scores = torch.where(torch.rand(num_rows, 19, generator=generator) < 0.5, -1.0, 1.0)
    scores[:100] = 1.0  # rows without any preference
    scores[100:200] = -1.0
    q = sinkhorn(scores, CITYSCAPES_R, epsilon=0.05, iterations=200, tolerance=1e-5)
    assert q.dtype == torch.float32 and torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(num_rows), atol=2e-6, rtol=0)
    assert class_marginal_error(q, CITYSCAPES_R) < 1e-5  # column sums within num_rows * 1e-5 of B * r_k
    # a row's assignment does not change when a constant is added to its scores: +1 and -1 rows agree
    torch.testing.assert_close(q[:200], q[:1].expand(200, -1), atol=1e-6, rtol=0)


def test_sinkhorn_log_domain_survives_where_the_linear_domain_overflows() -> None:
    # epsilon 0.01: exp(100) is inf in float32, so the reference formulation yields NaN
    scores = torch.rand(4096, 19, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert not torch.isfinite(plain_sinkhorn(scores, CITYSCAPES_R, 0.01, 3)).all()
    q32 = sinkhorn(scores, CITYSCAPES_R, epsilon=0.01, iterations=3)
    q64 = sinkhorn(scores.double(), CITYSCAPES_R, epsilon=0.01, iterations=3)
    torch.testing.assert_close(q32.double(), q64, atol=1e-5, rtol=0)


def test_sinkhorn_matches_the_linear_formulation_where_it_is_finite() -> None:
    scores = torch.rand(500, 19, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    for iterations in (1, 3, 7):
        torch.testing.assert_close(
            sinkhorn(scores, CITYSCAPES_R, 0.05, iterations), plain_sinkhorn(scores, CITYSCAPES_R.double(), 0.05, iterations),
            atol=1e-12, rtol=0,
        )  # fmt: skip


@pytest.mark.parametrize("case", ["cb", "equal"])
def test_sinkhorn_parity_with_authors_code(case: str) -> None:
    fixture = np.load(PARITY)
    scores, r, expected = (torch.from_numpy(fixture[f"{case}_{name}"]) for name in ("scores", "r", "Q"))
    epsilon, iterations = float(fixture["epsilon"]), int(fixture["iterations"])
    torch.testing.assert_close(sinkhorn(scores, r, epsilon, iterations), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(sinkhorn(scores.float(), r, epsilon, iterations).double(), expected, atol=5e-6, rtol=0)
    if case == "equal":
        torch.testing.assert_close(sinkhorn(scores, None, epsilon, iterations), expected, atol=1e-12, rtol=0)


def test_sinkhorn_tolerance_stops_early_and_zero_mass_classes_get_nothing() -> None:
    scores = torch.rand(200, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = torch.tensor([0.4, 0.3, 0.0, 0.2, 0.1])
    # a loose tolerance is met after the first iteration, so the result is the 1-iteration one
    torch.testing.assert_close(sinkhorn(scores, r, iterations=50, tolerance=10.0), sinkhorn(scores, r, iterations=1))
    q = sinkhorn(scores, r, iterations=50)
    assert (q[:, 2] == 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(200, dtype=torch.float64))


def test_sinkhorn_rejects_bad_inputs_with_messages() -> None:
    with pytest.raises(DataError, match=r"scores \[B, K\].*\(5,\)"):
        sinkhorn(torch.zeros(5))
    with pytest.raises(DataError, match=r"class_marginal must have shape \(3,\) for 3 classes, got \(4,\)"):
        sinkhorn(torch.zeros(5, 3), torch.ones(4))
    with pytest.raises(DataError, match="non-negative"):
        sinkhorn(torch.zeros(5, 3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ConfigError, match="epsilon must be > 0"):
        sinkhorn(torch.zeros(5, 3), epsilon=0.0)
    with pytest.raises(ConfigError, match="tolerance must be > 0"):
        sinkhorn(torch.zeros(5, 3), tolerance=0.0)
    with pytest.raises(DataError, match="NaN"):
        sinkhorn(torch.tensor([[0.0, math.nan], [0.0, 0.0]]))


# --------------------------------------------------------------------------- head and prototypes (Eq. 4-7)


def test_self_labeling_head_scores_are_cosines_with_normalised_prototypes() -> None:
    generator = torch.Generator().manual_seed(6)
    prototypes = torch.randn(4, 8, generator=generator) * 3
    head = SelfLabelingHead(num_classes=4, feature_dim=8)
    head.init_from_prototypes(prototypes)
    torch.testing.assert_close(head.prototypes.norm(dim=1), torch.ones(4))
    pixels = torch.randn(10, 8, generator=generator)
    expected = F.cosine_similarity(pixels[:, None, :], prototypes[None, :, :], dim=2)
    torch.testing.assert_close(head(pixels), expected, atol=1e-6, rtol=0)
    # feature maps give the same per-pixel scores
    maps = torch.randn(2, 8, 3, 5, generator=generator)
    flat = head(maps.permute(0, 2, 3, 1).reshape(-1, 8)).reshape(2, 3, 5, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(head(maps), flat, atol=1e-6, rtol=0)
    with pytest.raises(DataError, match=r"prototypes must have shape \(4, 8\).*got \(4, 7\)"):
        head.init_from_prototypes(torch.zeros(4, 7))
    with pytest.raises(DataError, match=r"features \[M, D\] or \[N, D, h, w\]"):
        head(torch.zeros(2, 8, 3))


def test_class_prototypes_average_normalised_features_per_class_eq7() -> None:
    # 1 image, D=2, 1x4 grid: pixels (3,4) (0,2) (5,0) (1,1); labels 0 0 1 255
    features = torch.tensor([[[[3.0, 0.0, 5.0, 1.0]], [[4.0, 2.0, 0.0, 1.0]]]])
    labels = torch.tensor([[[0, 0, 1, 255]]])
    prototypes = class_prototypes(features, labels, num_classes=3)
    expected = torch.tensor([[(0.6 + 0.0) / 2, (0.8 + 1.0) / 2], [1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(prototypes, expected)
    # accumulating two shards and merging equals one pass over everything
    more = torch.randn(2, 2, 1, 4, generator=torch.Generator().manual_seed(7))
    more_labels = torch.tensor([[[2, 1, 1, 0]], [[255, 2, 0, 0]]])
    first, second = PrototypeAccumulator(3, 2), PrototypeAccumulator(3, 2)
    first.update(features, labels)
    second.update(more, more_labels)
    whole = PrototypeAccumulator(3, 2)
    whole.update(torch.cat([features, more]), torch.cat([labels, more_labels]))
    torch.testing.assert_close(first.merge(second).compute(), whole.compute())
    torch.testing.assert_close(whole.counts, torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64))
    with pytest.raises(DataError, match=r"ids \[7\] outside 0..2"):
        class_prototypes(features, torch.tensor([[[0, 7, 1, 1]]]), num_classes=3)
    with pytest.raises(DataError, match="must be on the feature grid"):
        class_prototypes(features, torch.zeros(1, 2, 4, dtype=torch.long), num_classes=3)


# --------------------------------------------------------------------------- memory bank


def test_memory_bank_is_a_fifo_that_wraps_around_and_normalises() -> None:
    bank = MemoryBank(feature_dim=2, capacity=5)
    first = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 4.0]])
    bank.enqueue(first)
    assert (int(bank.pointer), int(bank.num_filled), bank.is_full) == (3, 3, False)
    second = torch.tensor([[0.0, 1.0], [0.0, 2.0], [5.0, 12.0], [-1.0, 0.0]])
    bank.enqueue(second)
    assert (int(bank.pointer), int(bank.num_filled), bank.is_full) == (2, 5, True)
    # the two oldest (slots 0, 1) were overwritten by the last two of the second batch
    expected = F.normalize(torch.stack([second[2], second[3], first[2], second[0], second[1]]), dim=1)
    torch.testing.assert_close(bank.features, expected)
    # a batch larger than the queue keeps its newest rows only
    bank.enqueue(torch.arange(1.0, 15.0).view(7, 2))
    torch.testing.assert_close(bank.contents(), F.normalize(torch.arange(5.0, 15.0).view(5, 2), dim=1).roll(2, dims=0))
    assert int(bank.pointer) == 2


def test_memory_bank_with_batch_uses_stored_rows_then_batch() -> None:
    batch = torch.tensor([[7.0, 7.0], [8.0, 9.0]])
    for use_partial in (True, False):
        bank = MemoryBank(feature_dim=2, capacity=4, use_partial=use_partial)
        augmented, rows = bank.with_batch(batch)
        assert rows == slice(0, 2) and torch.equal(augmented, batch)
        bank.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        augmented, rows = bank.with_batch(batch)
        if use_partial:
            assert rows == slice(3, 5) and torch.equal(augmented[:3], bank.contents())
        else:  # authors' code: the queue joins only once full
            assert rows == slice(0, 2) and augmented.shape == (2, 2)
        assert torch.equal(augmented[rows], batch)
        bank.enqueue(torch.ones(1, 2))
        augmented, rows = bank.with_batch(batch)
        assert rows == slice(4, 6) and torch.equal(augmented[:4], bank.features)
    with pytest.raises(DataError, match=r"memory bank expects features \[M, 2\], got \(3, 3\)"):
        bank.with_batch(torch.zeros(3, 3))
    with pytest.raises(DataError, match=r"memory bank expects features \[M, 2\]"):
        bank.enqueue(torch.zeros(3))


def test_memory_bank_state_dict_round_trip_resumes_the_queue() -> None:
    generator = torch.Generator().manual_seed(8)
    bank = MemoryBank(feature_dim=3, capacity=6)
    bank.enqueue(torch.randn(4, 3, generator=generator))
    bank.enqueue(torch.randn(4, 3, generator=generator))
    resumed = MemoryBank(feature_dim=3, capacity=6)
    resumed.load_state_dict(bank.state_dict())
    assert set(bank.state_dict()) == {"features", "pointer", "num_filled"}
    assert int(resumed.pointer) == 2 and int(resumed.num_filled) == 6
    new = torch.randn(3, 3, generator=generator)
    bank.enqueue(new)
    resumed.enqueue(new)
    assert torch.equal(bank.features, resumed.features) and int(resumed.pointer) == 5


# --------------------------------------------------------------------------- class-balanced sampling (Eq. 8, 9)


def _class_counts(labels: torch.Tensor, indices: torch.Tensor, num_classes: int) -> list[list[int]]:
    picked = labels.flatten(1).gather(1, indices)
    return [torch.bincount(row, minlength=num_classes + 1).tolist() for row in torch.where(picked == 255, num_classes, picked)]


def test_sampling_quotas_follow_eq9_and_the_shortfall_is_filled_from_labelled_pixels() -> None:
    # 4x4 image: class 0 x9, class 1 x4, class 2 x3; M = 8 -> floor(8*9/16)=4, floor(8*4/16)=2, floor(8*3/16)=1
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [1, 2, 2, 2]]).unsqueeze(0)
    extra_pick = [0, 0, 0]
    for seed in range(30):
        indices = sample_pixels(labels, 8, 3, generator=torch.Generator().manual_seed(seed))
        assert indices.shape == (1, 8) and indices.unique().numel() == 8
        counts = _class_counts(labels, indices, 3)[0]
        excess = [c - q for c, q in zip(counts, [4, 2, 1])]
        assert sum(counts) == 8 and min(excess) >= 0 and sum(excess) == 1  # the one place left by the floors
        extra_pick[excess.index(1)] += 1
    assert all(extra_pick)  # the shortfall pixel is drawn at random, from any class


def test_sampling_counts_exact_with_ignored_and_absent_classes() -> None:
    # 16 pixels: 8 ignored, class 0 x6, class 1 x2, class 2 absent; M = 8 -> quotas 3, 1, 0, and the
    # 4-pixel shortfall is filled from the 4 labelled pixels left, so every labelled pixel is taken
    labels = torch.tensor([[255] * 8 + [0] * 6 + [1] * 2]).view(1, 4, 4)
    indices = sample_pixels(labels, 8, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(indices[0].tolist()) == list(range(8, 16))
    # fewer labelled pixels than M: all of them, then ignored ones
    sparse = torch.full((1, 4, 4), 255)
    sparse[0, 0, :3] = torch.tensor([2, 1, 2])
    indices = sample_pixels(sparse, 8, 3, generator=torch.Generator().manual_seed(0))
    assert {0, 1, 2} <= set(indices[0].tolist()) and _class_counts(sparse, indices, 3)[0] == [0, 1, 2, 5]
    # a class below H*W/M pixels gets no quota: a single class-2 pixel with M = 4 of 16 is taken only by chance
    rare = torch.zeros(1, 4, 4, dtype=torch.long)
    rare[0, 0, 0] = 2
    taken = sum(_class_counts(rare, sample_pixels(rare, 4, 3, generator=torch.Generator().manual_seed(s)), 3)[0][2] for s in range(40))
    assert 0 < taken < 40


def test_sampling_per_image_is_deterministic_with_a_generator_and_uniform_option() -> None:
    labels = torch.randint(0, 5, (3, 12, 10), generator=torch.Generator().manual_seed(9))

    def draw(seed: int, **options: bool) -> torch.Tensor:
        return sample_pixels(labels, 20, 5, generator=torch.Generator().manual_seed(seed), **options)

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    counts = torch.stack([torch.bincount(labels[n].flatten(), minlength=5) for n in range(3)])
    quotas = 20 * counts // 120
    for n, row in enumerate(_class_counts(labels, draw(1), 5)):
        assert all(row[c] >= int(quotas[n, c]) for c in range(5)) and sum(row) == 20
    uniform = draw(1, class_balanced=False)
    assert torch.equal(uniform, draw(1, class_balanced=False)) and all(row.unique().numel() == 20 for row in uniform)
    features = torch.arange(2 * 120.0).view(1, 2, 12, 10).expand(3, -1, -1, -1)
    gathered = gather_pixel_features(features, uniform)
    torch.testing.assert_close(gathered[..., 0], uniform.float())
    with pytest.raises(ConfigError, match=r"must be in 1..120"):
        sample_pixels(labels, 121, 5)
    with pytest.raises(DataError, match=r"pseudo_labels must be \[N, h, w\]"):
        sample_pixels(labels[0], 10, 5)
    with pytest.raises(DataError, match=r"ids \[5\] outside 0..4"):
        sample_pixels(labels + 1, 10, 5)


# --------------------------------------------------------------------------- distribution alignment (Eq. 10-12)


def test_class_distribution_momentum_arithmetic_eq11() -> None:
    initial = class_pixel_counts(torch.tensor([[0, 0, 0, 1, 255]]), num_classes=2)  # Eq. 10: [3, 1]
    estimate = ClassDistribution(initial, momentum=0.9)
    torch.testing.assert_close(estimate.distribution, torch.tensor([0.75, 0.25]))
    estimate.update(torch.tensor([0.0, 10.0]))  # counts are normalised: delta_n = [0, 1]
    torch.testing.assert_close(estimate.distribution, torch.tensor([0.675, 0.325]))
    estimate.update(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(estimate.distribution, torch.tensor([0.9 * 0.675 + 0.05, 0.9 * 0.325 + 0.05]))
    before = estimate.distribution.clone()
    estimate.update(torch.zeros(2))  # no labelled pixel: nothing to learn
    assert torch.equal(estimate.distribution, before)
    resumed = ClassDistribution(torch.ones(2), momentum=0.9)
    resumed.load_state_dict(estimate.state_dict())
    assert torch.equal(resumed.distribution, before)
    fixed = ClassDistribution(initial, mode="fixed")  # authors' code: r stays the warm-up histogram
    fixed.update(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(fixed.distribution, torch.tensor([0.75, 0.25]))
    with pytest.raises(ConfigError, match=r"momentum \(alpha of Eq. 11\) must be in \[0, 1\]"):
        ClassDistribution(initial, momentum=1.5)
    with pytest.raises(ConfigError, match="'momentum' .* or 'fixed'"):
        ClassDistribution(initial, mode="ema")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"shape \(2,\)"):
        estimate.update(torch.ones(3))


# --------------------------------------------------------------------------- losses


def test_rectification_follows_eq1_on_hand_computed_values() -> None:
    soft = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.0, 0.0]]).T.reshape(1, 2, 1, 3)
    scores = torch.tensor([[0.0, 0.1], [0.3, 0.2], [0.2, 0.9]]).T.reshape(1, 2, 1, 3)
    # pixel 0, tau 0.08: P_SL = softmax([0, 1.25]) -> 0.6 * 0.2227 < 0.4 * 0.7773: class 1
    # pixel 0, tau 1:    P_SL = softmax([0, 0.1])  -> 0.6 * 0.4750 > 0.4 * 0.5250: class 0
    # pixel 1: P_ST ties, P_SL decides: class 0; pixel 2: no soft-label mass (padding): ignore
    assert rectify_pseudo_labels(soft, scores, temperature=0.08).tolist() == [[[1, 0, 255]]]
    assert rectify_pseudo_labels(soft, scores, temperature=1.0).tolist() == [[[0, 0, 255]]]
    # pixel 0 changes class where 0.6 * exp(0 / tau) = 0.4 * exp(0.1 / tau): tau = 0.1 / ln 1.5 = 0.2466
    assert rectify_pseudo_labels(soft, scores, temperature=0.24)[0, 0, 0] == 1
    assert rectify_pseudo_labels(soft, scores, temperature=0.25)[0, 0, 0] == 0
    # equal cluster scores leave P_ST's argmax (a tie goes to the first class), equal soft labels the scores'
    assert rectify_pseudo_labels(soft, torch.zeros_like(scores)).tolist() == [[[0, 0, 255]]]
    assert rectify_pseudo_labels(torch.full_like(soft, 0.5), scores).tolist() == [[[1, 0, 1]]]
    assert torch.equal(rectify_pseudo_labels(3 * soft, scores), rectify_pseudo_labels(soft, scores))  # P_ST's scale
    assert rectify_pseudo_labels(soft, scores, ignore_index=7)[0, 0, 2] == 7
    with pytest.raises(DataError, match="same grid"):
        rectify_pseudo_labels(soft, scores[..., :2])


def test_self_labeling_loss_is_soft_target_cross_entropy_and_online_variant_uses_bank_rows() -> None:
    generator = torch.Generator().manual_seed(10)
    scores, targets = torch.rand(6, 4, generator=generator), torch.softmax(torch.randn(6, 4, generator=generator), 1)
    torch.testing.assert_close(self_labeling_loss(scores, targets, 0.08), F.cross_entropy(scores / 0.08, targets))
    head, bank = SelfLabelingHead(4, 3), MemoryBank(3, capacity=10)
    bank.enqueue(torch.randn(10, 3, generator=generator))
    pixels = torch.randn(5, 3, generator=generator)
    stored = bank.features.clone()
    loss = online_self_labeling_loss(head, pixels, bank, CITYSCAPES_R[:4], temperature=0.08, epsilon=0.05, iterations=3)
    with torch.no_grad():
        q = sinkhorn(head(torch.cat([bank.features, pixels])), CITYSCAPES_R[:4], 0.05, 3)[10:]
    torch.testing.assert_close(loss, self_labeling_loss(head(pixels), q, 0.08))
    assert torch.equal(bank.features, stored)  # the caller enqueues after the loss
    loss.backward()
    assert head.prototypes.grad is not None and head.prototypes.grad.abs().sum() > 0
    with pytest.raises(DataError, match=r"scores \(6, 4\) and assignments \(6, 3\) must match"):
        self_labeling_loss(scores, targets[:, :3])


def test_symmetric_kl_consistency_eq13() -> None:
    generator = torch.Generator().manual_seed(11)
    weak, strong = torch.randn(2, 5, 3, 4, generator=generator), torch.randn(2, 5, 3, 4, generator=generator)
    assert float(symmetric_kl_consistency(weak, weak)) == 0.0
    value = symmetric_kl_consistency(weak, strong)
    torch.testing.assert_close(value, symmetric_kl_consistency(strong, weak))
    log_w, log_s = F.log_softmax(weak, 1), F.log_softmax(strong, 1)
    reference = (
        F.kl_div(log_s, log_w, reduction="none", log_target=True) + F.kl_div(log_w, log_s, reduction="none", log_target=True)
    ).sum(1)
    torch.testing.assert_close(symmetric_kl_consistency(weak, strong, reduction="pixel_mean"), reference.mean())
    torch.testing.assert_close(value, reference.mean() / 5)  # default: the authors' reduction, divided by K = 5
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = True
    torch.testing.assert_close(symmetric_kl_consistency(weak, strong, mask, "pixel_mean"), reference[mask].mean())
    assert float(symmetric_kl_consistency(weak, strong, torch.zeros_like(mask))) == 0.0
    with pytest.raises(DataError, match=r"weak \(2, 5, 3, 4\) and strong \(2, 5, 3, 3\) logits must match"):
        symmetric_kl_consistency(weak, strong[..., :3])
    with pytest.raises(DataError, match="valid_mask must be a bool"):
        symmetric_kl_consistency(weak, strong, mask.float())


def test_consistency_reductions_on_hand_computed_values() -> None:
    """Two pixels, K = 2: p_w = (3/4, 1/4) against p_s = (1/2, 1/2) at pixel 0, identical views at pixel 1.

    Symmetric KL at pixel 0: sum_c (p_w - p_s)(log p_w - log p_s) = 1/4 ln 1.5 + 1/4 ln 2 = ln(3) / 4;
    KL(p_w || p_s) = 3/4 ln 1.5 + 1/4 ln 0.5. ``pixel_mean`` divides the sum over valid pixels by their
    count; ``class_mean`` (default, the authors' code) by K times that count.
    """
    weak = torch.tensor([[math.log(3.0), 0.0], [0.4, -0.2]]).T.reshape(1, 2, 1, 2)  # [N, K, h, w]
    strong = torch.tensor([[0.0, 0.0], [0.4, -0.2]]).T.reshape(1, 2, 1, 2)
    symmetric, one_way = math.log(3.0) / 4, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    both, first = torch.ones(1, 1, 2, dtype=torch.bool), torch.tensor([[[True, False]]])
    for function, pixel0 in ((symmetric_kl_consistency, symmetric), (partial(prototype_kl_consistency, temperature=1.0), one_way)):
        assert float(function(weak, strong, valid_mask=both, reduction="pixel_mean")) == pytest.approx(pixel0 / 2, rel=1e-6)
        assert float(function(weak, strong, valid_mask=both, reduction="class_mean")) == pytest.approx(pixel0 / 4, rel=1e-6)
        assert float(function(weak, strong, valid_mask=first, reduction="pixel_mean")) == pytest.approx(pixel0, rel=1e-6)
        assert float(function(weak, strong, valid_mask=first)) == pytest.approx(pixel0 / 2, rel=1e-6)  # the default
        with pytest.raises(ValueError, match="'class_mean' \\(authors' code\\) or 'pixel_mean', got 'sum'"):
            function(weak, strong, reduction="sum")


def test_class_mean_is_the_authors_masked_sum_over_pixels_and_classes() -> None:
    """The authors' reduction: the element-wise KL [N, K, h, w] times a mask of the same shape (a padded pixel
    is masked in every class), summed and divided by the mask's sum."""
    generator = torch.Generator().manual_seed(3)
    weak, strong = torch.randn(2, 6, 3, 5, generator=generator), torch.randn(2, 6, 3, 5, generator=generator)
    valid = torch.rand(2, 3, 5, generator=generator) > 0.3
    elementwise = F.kl_div(F.log_softmax(strong / 0.08, 1), F.softmax(weak / 0.08, 1), reduction="none")
    mask = valid.unsqueeze(1).expand_as(elementwise).float()
    authors = (elementwise * mask).sum() / mask.sum()
    torch.testing.assert_close(prototype_kl_consistency(weak, strong, 0.08, valid), authors)


def test_reverse_cross_entropy_is_the_authors_rce_on_hand_computed_values() -> None:
    """p = (3/4, 1/4): RCE = -ln(1e-4) * (mass outside the label) = 9.2103 * 1/4 for label 0, * 3/4 for label 1."""
    logits = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    expected = -math.log(1e-4) * (0.25 + 0.75) / 2  # the ignored pixel does not count
    assert float(reverse_cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-5)
    # the authors' formula: one-hot labels clipped to [1e-4, 1], probabilities to [1e-7, 1], masked mean
    generator = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(2, 4, 3, 5, generator=generator) * 6, torch.randint(0, 4, (2, 3, 5), generator=generator)
    labels[0, 0, :2] = 255
    valid = labels != 255
    one_hot = F.one_hot(labels.masked_fill(~valid, 4), 5)[..., :4].permute(0, 3, 1, 2).float().clamp(1e-4, 1.0)
    probabilities = F.softmax(logits, 1).clamp(1e-7, 1.0)
    authors = -((probabilities * one_hot.log()).sum(1) * valid).sum() / (valid.sum() + 1e-6)
    torch.testing.assert_close(reverse_cross_entropy(logits, labels), authors)
    coarse = reverse_cross_entropy(logits[..., :2, :3], torch.zeros(2, 4, 6, dtype=torch.long))  # logits upsampled to the labels
    assert coarse.shape == () and torch.isfinite(coarse)
    with pytest.raises(DataError, match=r"logits \[N, K, h, w\] and labels \[N, H, W\]"):
        reverse_cross_entropy(logits, labels[0])


def test_cutmix_box_covers_half_the_frame_with_a_random_aspect_inside_it() -> None:
    shapes = set()
    for seed in range(40):
        top, left, bottom, right = cutmix_box(60, 120, generator=torch.Generator().manual_seed(seed))
        assert 0 <= top < bottom <= 60 and 0 <= left < right <= 120
        assert (bottom - top) * (right - left) / (60 * 120) == pytest.approx(0.5, abs=0.02)
        assert 30 <= bottom - top <= 60 and 60 <= right - left <= 120  # height fraction 0.5 ** U(0, 1), width the rest
        shapes.add(bottom - top)
    assert len(shapes) > 10
    with pytest.raises(ValueError, match=r"area must be a fraction in \(0, 1\], got 0"):
        cutmix_box(8, 8, area=0.0)


def test_cutmix_pastes_the_source_box_and_its_labels_through_the_image_grid() -> None:
    """Labels on a grid twice coarser: up to the image grid (nearest), source labels in the box, back down."""
    target, source = torch.zeros(2, 3, 4, 8), torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8)
    target_labels = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 1]], [[2, 2, 2, 2], [2, 2, 2, 2]]])
    source_labels = torch.full((2, 4, 8), 5)
    source_labels[1] = 6
    images, labels = cutmix(target, source, target_labels, source_labels, (0, 4, 4, 8))  # the right half
    assert torch.equal(images[..., 4:], source[..., 4:]) and not images[..., :4].any()
    assert labels.tolist() == [[[1, 1, 5, 5], [1, 1, 5, 5]], [[2, 2, 6, 6], [2, 2, 6, 6]]]
    assert not target.any() and (target_labels < 3).all()  # inputs untouched
    images, labels = cutmix(target, source, target_labels, source_labels, (2, 0, 3, 8))  # one row: misses the grid's sample points
    assert torch.equal(images[:, :, 2], source[:, :, 2]) and torch.equal(labels, target_labels)
    with pytest.raises(DataError, match="same crop size"):
        cutmix(target, source[..., :6], target_labels, source_labels, (0, 0, 1, 1))


def test_total_loss_eq14_defaults() -> None:
    total = cpsl_total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.3))
    torch.testing.assert_close(total, torch.tensor(1.0 + 0.1 * 2.0 + 5.0 * 0.3))
    torch.testing.assert_close(
        cpsl_total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.3), 0.5, 2.0), torch.tensor(2.6)
    )


def test_distillation_kl_matches_torch_reference_and_ce_uses_confident_labels() -> None:
    generator = torch.Generator().manual_seed(12)
    student = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 3), generator=generator)
    confidence = torch.rand(2, 3, 3, generator=generator)
    confidence[0, 0, 0] = 0.95  # exactly at the threshold: dropped (the reference keeps conf > 0.95 only)
    parts = distillation_loss(student, teacher, labels, confidence, confidence_threshold=0.5, kl_weight=0.25)
    kl_reference = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="none").sum(1).mean()
    torch.testing.assert_close(parts.kl_divergence, kl_reference)
    assert parts.kl_divergence.item() > 0
    # the authors' call (softmax student as input) is not a divergence; ours differs from it
    buggy = F.kl_div(F.softmax(student, 1), F.softmax(teacher, 1), reduction="none").mean()  # its default 'mean'
    assert buggy.item() < 0 and not torch.isclose(parts.kl_divergence, buggy)
    kept = labels.masked_fill(confidence <= 0.5, 255)
    torch.testing.assert_close(parts.cross_entropy, F.cross_entropy(student, kept, ignore_index=255))
    torch.testing.assert_close(parts.total, parts.cross_entropy + 0.25 * parts.kl_divergence)
    parts.total.backward()
    assert student.grad is not None and teacher.grad is None  # the teacher is a constant
    at_threshold = distillation_loss(student, teacher, labels, torch.full((2, 3, 3), 0.95))
    assert at_threshold.cross_entropy.item() == 0.0  # nothing strictly above 0.95
    with pytest.raises(DataError, match=r"pseudo labels \(2, 3\) must be on the logits' grid \(2, 3, 3\)"):
        distillation_loss(student, teacher, labels[:, 0])
    with pytest.raises(DataError, match=r"student \(2, 4, 3, 3\) and teacher \(2, 3, 3, 3\)"):
        distillation_loss(student, teacher[:, :3], labels)


# --------------------------------------------------------------------------- shared pieces (methods/common.py, methods/sinkhorn.py)


def test_cpsl_keeps_the_shared_names_importable_for_the_engine_and_benchmarks() -> None:
    import segadapt.data
    from segadapt.data import classes

    assert cpsl.sinkhorn is sinkhorn and cpsl.class_marginal_error is class_marginal_error
    assert cpsl.class_pixel_counts is class_pixel_counts is classes.class_pixel_counts is segadapt.data.class_pixel_counts
    assert cpsl.class_pixel_counts(torch.tensor([[0, 0, 0, 1, 255]]), 2).tolist() == [3, 1]  # the recipe's call
    assert normalized_marginal(torch.tensor([2.0, 6.0]), 2, torch.zeros(1)).tolist() == [0.25, 0.75]


def _old_cpsl_prototype_parts(features: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PrototypeAccumulator.update before the refactor (hard labels)."""
    pixels = F.normalize(features.double(), dim=1).permute(0, 2, 3, 1)
    valid = labels != 255
    sums = torch.zeros(k, features.shape[1], dtype=torch.float64).index_add_(0, labels[valid], pixels[valid])
    return sums, torch.bincount(labels[valid], minlength=k).double()


def test_class_feature_sums_keep_each_callers_arithmetic_bit_for_bit() -> None:
    from segadapt.methods.bicl import class_means

    generator = torch.Generator().manual_seed(21)
    features = torch.randn(2, 64, 5, 7, generator=generator) * 3
    labels = torch.randint(0, 6, (2, 5, 7), generator=generator)
    labels[0, 0] = 255
    labels[labels == 4] = 3  # class 4 absent: zero prototype

    # CPSL Eq. 7: the map normalised in float64, then the labelled pixels summed
    old_sums, old_counts = _old_cpsl_prototype_parts(features, labels, 6)
    sums, counts = class_feature_sums(features, labels, 6)
    assert torch.equal(sums, old_sums) and counts.dtype == torch.int64 and torch.equal(counts.double(), old_counts)
    old_prototypes = (old_sums / old_counts.clamp_min(1e-12).unsqueeze(1)).float()
    assert torch.equal(class_prototypes(features, labels, 6), old_prototypes)
    accumulator = PrototypeAccumulator(6, 64)
    accumulator.update(features, labels)
    assert torch.equal(accumulator.compute(), old_prototypes) and not old_prototypes[4].any()

    # soft labels: probability-weighted, as before
    soft = torch.softmax(torch.randn(2, 6, 5, 7, generator=generator), dim=1)
    soft_sums, soft_counts = class_feature_sums(features, soft, 6)
    pixels = F.normalize(features.double(), dim=1).permute(0, 2, 3, 1)
    assert torch.equal(soft_sums, torch.einsum("nkhw,nhwd->kd", soft.double(), pixels))
    assert torch.equal(soft_counts, soft.double().sum(dim=(0, 2, 3)))

    # BiCL's batch means: flattened pixels, the labelled rows normalised and summed in float32
    flat = features.permute(0, 2, 3, 1).reshape(-1, 64)
    keep = labels.reshape(-1) != 255
    rows, ids = F.normalize(flat[keep].float(), dim=1), labels.reshape(-1)[keep].long()
    old_counts = torch.bincount(ids, minlength=6)
    old_means = torch.zeros(6, 64).index_add_(0, ids, rows) / old_counts.clamp_min(1).unsqueeze(1).float()
    means, counts = class_means(features, labels, 6)
    assert torch.equal(means, old_means) and torch.equal(counts, old_counts)
    assert torch.equal(class_feature_means(flat, labels.reshape(-1), 6, dtype=torch.float32)[0], old_means)


def test_class_feature_sums_refuse_unknown_ids_and_misplaced_labels() -> None:
    features = torch.ones(1, 2, 1, 3)
    with pytest.raises(DataError, match=r"labels hold ids \[5, 9\] outside 0..2 that are not the ignore index 255"):
        class_feature_sums(features, torch.tensor([[[9, 5, 255]]]), 3)
    with pytest.raises(DataError, match=r"pixel features \[P, D\] need labels \[P\]"):
        class_feature_sums(torch.ones(4, 2), torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(DataError, match="must be on the feature grid"):
        class_feature_sums(features, torch.zeros(1, 3, 1, dtype=torch.long), 3)
    with pytest.raises(DataError, match=r"soft labels must be \[N, 3, h, w\]"):
        class_feature_sums(features, torch.zeros(1, 2, 1, 3), 3)


def test_pixel_kl_and_entropy_are_the_formulas_bicl_and_cpsl_used() -> None:
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 3, 4, generator=generator), torch.randn(2, 5, 3, 4, generator=generator)
    reference = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="none").sum(1)
    torch.testing.assert_close(pixel_kl_divergence(student, teacher), reference)
    assert pixel_kl_divergence(student, teacher).shape == (2, 3, 4)
    log_p = F.log_softmax(student, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    assert torch.equal(pixel_entropy(student), entropy)
    assert torch.equal(pixel_entropy(student, normalized=True), entropy / float(np.log(5)))  # BiCL's entropy_loss


def test_a_class_without_eq7_prototype_gets_a_trainable_random_row_not_a_frozen_zero() -> None:
    """CPSL is silent on a class the warm-up never predicts (Eq. 7 has no pixel to average).

    ``empty="random"`` keeps the head's random unit row (as without Init, Tab. 3), so Eq. 4-6 see a
    cluster centre on the sphere and the row learns; ``"zero"`` copies the zero row, whose gradient
    through ``normalize`` is scaled by 1/eps, so one SGD step throws it ~1e10 away: an absorbing state.
    """
    prototypes = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    features = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(64) % 3
    rows = {}
    for empty in ("random", "zero"):
        torch.manual_seed(0)
        head = SelfLabelingHead(num_classes=3, feature_dim=3)
        random_row = head.prototypes[1].detach().clone()
        head.init_from_prototypes(prototypes, empty=empty)
        if empty == "random":
            assert torch.allclose(head.prototypes[1], F.normalize(random_row, dim=0))
            assert head.prototypes[1].norm().item() == pytest.approx(1.0)
        else:
            assert torch.equal(head.prototypes[1].detach(), torch.zeros(3))
        assert torch.allclose(head.prototypes[[0, 2]].detach(), F.normalize(prototypes[[0, 2]], dim=1))  # Eq. 7 rows either way
        F.cross_entropy(head(features) / 0.08, labels).backward()
        rows[empty] = head.prototypes.grad[1].norm().item()
    assert 1e-3 < rows["random"] < 10.0  # an ordinary gradient: the row can move towards the class
    assert rows["zero"] > 1e8  # 1/eps: the row leaves the unit sphere's scale at any learning rate
    with pytest.raises(ValueError, match="random"):
        SelfLabelingHead(3, 3).init_from_prototypes(prototypes, empty="mean")  # type: ignore[arg-type]


def test_cutmix_top_left_labels_take_each_coarse_pixels_corner_as_the_authors() -> None:
    """``label_sampling="top_left"`` (PyTorch's legacy nearest, the authors' code): coarse pixel i reads image row 2 i."""
    target, source = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    source_labels = torch.tensor([[[7, 7, 7, 7], [8, 8, 8, 8], [7, 7, 7, 7], [8, 8, 8, 8]]])
    box = (0, 0, 4, 4)  # the whole frame
    _, corners = cpsl.cutmix(target, source, torch.zeros(1, 2, 2, dtype=torch.long), source_labels, box, "top_left")
    _, centres = cpsl.cutmix(target, source, torch.zeros(1, 2, 2, dtype=torch.long), source_labels, box)
    assert corners.tolist() == [[[7, 7], [7, 7]]]  # rows 0 and 2
    assert centres.tolist() == [[[8, 8], [8, 8]]]  # rows 1 and 3 (nearest-exact: the centre rounds down-right)
    with pytest.raises(ValueError, match="label_sampling"):
        cpsl.cutmix(target, source, torch.zeros(1, 2, 2, dtype=torch.long), source_labels, box, "corner")  # type: ignore[arg-type]


def test_shared_uniform_pixels_draws_one_permutation_for_the_batch() -> None:
    """The authors' L_SL sampling: the first M of one randperm of the grid, the same positions in every image."""
    indices = cpsl.shared_uniform_pixels(3, 20, 7, generator=torch.Generator().manual_seed(1))
    assert indices.shape == (3, 7) and indices.dtype == torch.int64
    assert torch.equal(indices[0], indices[1]) and torch.equal(indices[0], indices[2])
    assert torch.equal(indices[0], torch.randperm(20, generator=torch.Generator().manual_seed(1))[:7])
    with pytest.raises(ConfigError, match="1..20"):
        cpsl.shared_uniform_pixels(1, 20, 21)


def test_output_self_labeling_loss_takes_its_assignments_from_the_normalised_logits() -> None:
    """The authors' second term: Q = Sinkhorn(normalize(logits)) over [bank; batch], p = softmax(head(z) / tau)."""
    generator = torch.Generator().manual_seed(4)
    head = cpsl.SelfLabelingHead(3, 4)
    features, logits = torch.randn(6, 4, generator=generator), 5 * torch.randn(6, 3, generator=generator)
    marginal = torch.tensor([0.5, 0.3, 0.2])
    bank = cpsl.MemoryBank(3, capacity=16)
    bank.enqueue(torch.randn(5, 3, generator=generator))
    loss = cpsl.output_self_labeling_loss(head, features, logits, bank, marginal, 0.08, 0.05, 3)
    augmented = torch.cat([bank.contents(), F.normalize(logits, dim=1)])
    assignments = cpsl.sinkhorn(augmented, marginal, 0.05, 3)[5:]
    expected = -(assignments * F.log_softmax(head(features) / 0.08, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    # the scale of the logits does not matter (they are normalised), the bank is left as it was
    torch.testing.assert_close(cpsl.output_self_labeling_loss(head, features, 10 * logits, bank, marginal, 0.08, 0.05, 3), loss)
    assert int(bank.num_filled) == 5
    loss.backward()
    assert head.prototypes.grad is not None and head.prototypes.grad.abs().sum() > 0
    with pytest.raises(DataError, match="momentum logits"):
        cpsl.output_self_labeling_loss(head, features, logits[:5], bank)


def test_bank_scores_with_raw_prototypes_as_the_authors_and_cosines_agree_at_unit_length() -> None:
    """``bank_scores="unnormalised_prototypes"`` scores the bank's rows by ``z @ w.T`` (the authors' queue), the batch by cosines."""
    generator = torch.Generator().manual_seed(9)
    head = cpsl.SelfLabelingHead(3, 4)
    bank = cpsl.MemoryBank(4, capacity=8)
    bank.enqueue(torch.randn(6, 4, generator=generator))
    features, marginal = torch.randn(5, 4, generator=generator), torch.tensor([0.5, 0.3, 0.2])

    def loss(scores: str) -> torch.Tensor:
        return cpsl.online_self_labeling_loss(head, features, bank, marginal, 0.08, 0.05, 3, bank_scores=scores)  # type: ignore[arg-type]

    torch.testing.assert_close(loss("unnormalised_prototypes"), loss("cosine"))  # unit prototypes: the same scores
    with torch.no_grad():
        head.prototypes.mul_(torch.tensor([[0.5], [1.0], [2.0]]))
    raw_scores = torch.cat([bank.contents() @ head.prototypes.detach().t(), head(features).detach()])
    assignments = cpsl.sinkhorn(raw_scores, marginal, 0.05, 3)[6:]
    torch.testing.assert_close(loss("unnormalised_prototypes"), cpsl.self_labeling_loss(head(features), assignments, 0.08))
    assert not torch.allclose(loss("unnormalised_prototypes"), loss("cosine"))
    with pytest.raises(ValueError, match="bank_scores"):
        loss("raw")


def test_image_mean_prototypes_weigh_images_alike_skip_small_classes_and_cap_the_count() -> None:
    """calc_prototype.py: per-image means of unnormalised features (classes with >= min_pixels), a running mean capped."""
    acc = cpsl.ImageMeanPrototypes(num_classes=2, feature_dim=2, min_pixels=2, cap=2)
    features = torch.tensor([[[[1.0, 1.0, 1.0, 9.0]], [[0.0, 0.0, 0.0, 9.0]]]])  # [1, 2, 1, 4]
    acc.update(features, torch.tensor([[[0, 0, 0, 1]]]))  # class 1: one pixel, skipped
    acc.update(3 * features[..., :2], torch.tensor([[[0, 0]]]))  # a small image counts as much as a large one
    torch.testing.assert_close(acc.compute(), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))  # (1 + 3) / 2, not per pixel
    acc.update(7 * features[..., :2], torch.tensor([[[0, 0]]]))  # the count stays at the cap: (2 * 2 + 7) / 3
    torch.testing.assert_close(acc.compute()[0], torch.tensor([11.0 / 3.0, 0.0]))
    assert acc.counts.tolist() == [2.0, 0.0]
    with pytest.raises(DataError, match="features must be"):
        acc.update(features, torch.zeros(1, 1, 3, dtype=torch.long))


def test_bank_contrastive_loss_is_the_authors_supervised_contrast() -> None:
    """-mean over pixels of the mean over positives of log(e^s / (e^s + sum_neg e^s)), s = z B^T / tau; no positive adds 0."""
    generator = torch.Generator().manual_seed(2)
    features = F.normalize(torch.randn(3, 4, generator=generator), dim=1).requires_grad_(True)
    bank = F.normalize(torch.randn(5, 4, generator=generator), dim=1)
    labels, bank_labels = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 1, 1])  # pixel 2 has no positive
    loss = cpsl.bank_contrastive_loss(features, labels, bank, bank_labels, 0.5)
    expected = 0.0
    for m in range(2):
        s = features[m].detach() @ bank.t() / 0.5
        positive = bank_labels == labels[m]
        negatives = s[~positive].exp().sum()
        log_p = s[positive] - torch.log(s[positive].exp() + negatives)
        expected += -(log_p.sum() / (positive.sum() + 1e-5)).item()
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)  # the shift by the row maximum cancels
    loss.backward()
    assert features.grad is not None and features.grad[2].abs().sum() == 0  # the pixel without positives: no gradient
    with pytest.raises(DataError, match="contrastive term"):
        cpsl.bank_contrastive_loss(features, labels[:2], bank, bank_labels)
