"""segadapt.methods.sinkhorn (CPSL Eq. 5-6): the scaled solver against its log-domain fallback and the plain formulation.

The Sinkhorn tests of tests/test_cpsl.py (marginals, parity with the authors' code, errors) hold as
they were; these check that the scaled path gives the log-domain result, where it runs and where it
hands over, up to ``|score| / epsilon = 1000``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segadapt.errors import DataError
from segadapt.methods.sinkhorn import _marginal_and_values, _scaled_sinkhorn, class_marginal_error, sinkhorn, sinkhorn_log_domain

PARITY = Path(__file__).parent / "fixtures" / "parity" / "cpsl_sinkhorn.npz"  # recorded from the authors' code
# CPSL's shipped warm-up class distribution (docs/reference_code.md, "CPSL: class distribution")
CITYSCAPES_R = torch.tensor(
    [0.37922, 0.049299, 0.226651, 0.015507, 0.017205, 0.014027, 0.002186, 0.002213, 0.133376, 0.024243,
     0.043411, 0.013146, 0.001615, 0.066048, 0.004075, 0.002789, 0.001847, 0.001229, 0.001912]
)  # fmt: skip
MARGINALS = {
    "uniform": None,
    "cityscapes": CITYSCAPES_R,
    "unequal with zeros": torch.tensor([5.0, 0.0, 3.0, 1.0, 0.5, 0.0, 0.25, 2.0]),
}


def plain_sinkhorn(scores: torch.Tensor, r: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The authors' formulation (docs/reference_code.md, "CPSL: Sinkhorn"): class rows to ``r``, pixel columns to ``1/B``."""
    q = torch.exp(scores / epsilon).T
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) * (r / r.sum())[:, None]
        q = q / q.sum(dim=0, keepdim=True) / q.shape[1]
    return (q * q.shape[1]).T


def scaled_path_holds(scores: torch.Tensor, r: torch.Tensor | None, epsilon: float, iterations: int, tolerance: float | None = None) -> bool:
    """Whether :func:`sinkhorn` keeps its scaled result (True) or falls back to the log domain."""
    work = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    marginal, masses = _marginal_and_values(r, scores.shape[1], work)
    return _scaled_sinkhorn(work, marginal, masses, epsilon, iterations, tolerance) is not None


def labelled_scores(r: torch.Tensor, num_rows: int, low_class: int | None, seed: int) -> torch.Tensor:
    """Cosine-like scores: each row prefers one class (about 1, the others in [-1, 0.8]), classes in proportion
    to ``r`` (so 3 iterations converge); ``low_class``'s rows and column are halved (its best scores about 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(r)), (num_rows * r / r.sum()).round().long())
    scores = torch.rand(len(labels), len(r), generator=generator) * 1.8 - 1
    scores[torch.arange(len(labels)), labels] = 1 - 0.005 * torch.rand(len(labels), generator=generator)
    if low_class is not None:
        scores[labels == low_class] *= 0.5
        scores[labels != low_class, low_class] *= 0.5
    return scores


@pytest.mark.parametrize("marginal", list(MARGINALS))
@pytest.mark.parametrize("epsilon", [0.5, 0.05, 0.01])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_result_is_the_log_domain_result(marginal: str, epsilon: float, dtype: torch.dtype) -> None:
    r = MARGINALS[marginal]
    num_classes = 19 if r is None else len(r)
    scores = (torch.rand(777, num_classes, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1).to(dtype)
    for iterations in (1, 3, 10):
        assert scaled_path_holds(scores, r, epsilon, iterations)
        q = sinkhorn(scores, r, epsilon, iterations)
        assert q.dtype == dtype and q.shape == scores.shape and (q >= 0).all()
        reference = sinkhorn_log_domain(scores.double(), r, epsilon, iterations)
        torch.testing.assert_close(q.double(), reference, atol=1e-12 if dtype == torch.float64 else 2e-6, rtol=0)
        torch.testing.assert_close(q, sinkhorn_log_domain(scores, r, epsilon, iterations), atol=1e-12 if dtype == torch.float64 else 2e-5, rtol=0)
        if r is not None:
            assert (q[:, r == 0] == 0).all()


@pytest.mark.parametrize("epsilon", [0.1, 0.05, 0.02])
def test_scaled_result_is_the_plain_result_where_that_is_finite(epsilon: float) -> None:
    scores = torch.rand(1000, 19, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    for iterations in (1, 3, 7):
        plain = plain_sinkhorn(scores, CITYSCAPES_R.double(), epsilon, iterations)
        assert torch.isfinite(plain).all()
        torch.testing.assert_close(sinkhorn(scores, CITYSCAPES_R, epsilon, iterations), plain, atol=1e-12, rtol=0)
    plain32 = plain_sinkhorn(scores.float(), CITYSCAPES_R, epsilon, 3)
    torch.testing.assert_close(sinkhorn(scores.float(), CITYSCAPES_R, epsilon, 3), plain32, atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low_class, scaled", [(None, True), (3, False)])  # class 3 500 below in exp: the log-domain fallback
def test_score_over_epsilon_1000_stays_finite_with_the_contract_marginals(dtype: torch.dtype, low_class: int | None, scaled: bool) -> None:
    r = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5, 0.0])
    scores = labelled_scores(r, 2000, low_class, seed=2).to(dtype)
    num_rows, epsilon = scores.shape[0], 1e-3  # |score| / epsilon up to 1000
    assert not torch.isfinite(plain_sinkhorn(scores, r.to(dtype), epsilon, 3)).all()
    assert scaled_path_holds(scores, r, epsilon, 3) == (scaled or dtype == torch.float64)  # exp(-500) is a float64
    q = sinkhorn(scores, r, epsilon, 3)
    assert torch.isfinite(q).all() and (q >= 0).all() and (q[:, -1] == 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(num_rows, dtype=dtype), atol=1e-6, rtol=0)
    # column sums B * r_k / sum(r), as the contract says
    torch.testing.assert_close(q.sum(dim=0), num_rows * r.to(dtype) / r.sum(), atol=num_rows * 1e-6, rtol=0)
    assert class_marginal_error(q, r) < 1e-6
    torch.testing.assert_close(q.double(), sinkhorn_log_domain(scores.double(), r, epsilon, 3), atol=1e-6, rtol=0)


def test_score_over_epsilon_1000_on_random_scores_matches_the_log_domain() -> None:
    scores = torch.rand(4096, 19, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert not torch.isfinite(plain_sinkhorn(scores, CITYSCAPES_R, 1e-3, 3)).all()
    for iterations in (1, 3):
        q = sinkhorn(scores, CITYSCAPES_R, 1e-3, iterations)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(len(q)), atol=1e-6, rtol=0)
        torch.testing.assert_close(q.double(), sinkhorn_log_domain(scores.double(), CITYSCAPES_R, 1e-3, iterations), atol=1e-6, rtol=0)


def test_falls_back_where_a_class_lives_in_underflowed_rows() -> None:
    # class 1's mass is in row 1, whose weight exp((-0.5 - 1) / eps) underflows next to row 0's: the scaled
    # path would lose it, so the result must be (bit for bit) the log-domain one
    scores = torch.tensor([[1.0, 0.0], [-0.5, -0.6], [0.9, 0.2]])
    r = torch.tensor([0.5, 0.5])
    assert not scaled_path_holds(scores, r, 1e-3, 3)
    q = sinkhorn(scores, r, 1e-3, 3)
    assert torch.equal(q, sinkhorn_log_domain(scores, r, 1e-3, 3)) and torch.isfinite(q).all()
    assert q[1, 1] > 0.5  # row 1 is the only one that can carry class 1's mass


@pytest.mark.parametrize("epsilon", [0.05, 1e-3])
def test_minus_inf_pairs_and_zero_mass_classes_get_exactly_zero(epsilon: float) -> None:
    generator = torch.Generator().manual_seed(4)
    scores = torch.rand(300, 5, generator=generator, dtype=torch.float64) * 2 - 1
    forbidden = torch.rand(300, 5, generator=generator) < 0.2
    forbidden[:, 0] = False  # every row keeps an allowed class with mass
    scores[forbidden] = -math.inf
    r = torch.tensor([0.4, 0.3, 0.0, 0.2, 0.1])
    q = sinkhorn(scores, r, epsilon, 3)
    assert (q[forbidden] == 0).all() and (q[:, 2] == 0).all()
    torch.testing.assert_close(q, sinkhorn_log_domain(scores, r, epsilon, 3), atol=1e-12, rtol=0)


def test_float32_over_65536_rows_stays_at_float64_accuracy() -> None:
    # 66,000 rows: the class sums run in blocks of 1,024 rows plus a remainder
    generator = torch.Generator().manual_seed(5)
    labels = torch.multinomial(CITYSCAPES_R, 66000, replacement=True, generator=generator)
    scores = 0.06 * torch.randn(66000, 19, generator=generator)
    scores[torch.arange(66000), labels] += 0.6
    q = sinkhorn(scores, CITYSCAPES_R, 0.05, 3)
    reference = sinkhorn_log_domain(scores.double(), CITYSCAPES_R, 0.05, 3)
    torch.testing.assert_close(q.double(), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.double().sum(dim=0), reference.sum(dim=0), atol=0, rtol=2e-6)


def test_tolerance_stops_where_the_log_domain_stops() -> None:
    scores = torch.rand(500, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    r = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.5])
    for tolerance in (1e-2, 1e-4, 1e-8):
        q = sinkhorn(scores, r, 0.05, 1000, tolerance)
        torch.testing.assert_close(q, sinkhorn_log_domain(scores, r, 0.05, 1000, tolerance), atol=1e-12, rtol=0)
        assert class_marginal_error(q, r) < tolerance


def test_parity_fixture_is_met_by_the_scaled_path_and_by_the_log_domain() -> None:
    fixture = np.load(PARITY)
    epsilon, iterations = float(fixture["epsilon"]), int(fixture["iterations"])
    for case in ("cb", "equal"):
        scores, r, expected = (torch.from_numpy(fixture[f"{case}_{name}"]) for name in ("scores", "r", "Q"))
        assert scaled_path_holds(scores, r, epsilon, iterations) and scaled_path_holds(scores.float(), r, epsilon, iterations)
        for solver in (sinkhorn, sinkhorn_log_domain):
            torch.testing.assert_close(solver(scores, r, epsilon, iterations), expected, atol=1e-12, rtol=0)
            torch.testing.assert_close(solver(scores.float(), r, epsilon, iterations).double(), expected, atol=5e-6, rtol=0)


def test_inputs_are_untouched_and_half_precision_computes_in_float32() -> None:
    scores = torch.rand(64, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    before = scores.clone()
    q = sinkhorn(scores, None, 0.05, 3)
    assert torch.equal(scores, before)
    for dtype in (torch.float16, torch.bfloat16):
        q_half = sinkhorn(scores.to(dtype), None, 0.05, 3)
        assert q_half.dtype == torch.float32
        torch.testing.assert_close(q_half, sinkhorn(scores.to(dtype).float(), None, 0.05, 3), atol=0, rtol=0)
    assert q.is_contiguous() and q.shape == (64, 4)


def test_invalid_scores_still_raise_through_the_fallback() -> None:
    with pytest.raises(DataError, match="NaN"):
        sinkhorn(torch.tensor([[0.0, math.inf], [0.0, 0.0]]))
    with pytest.raises(DataError, match="NaN"):  # class 1 has mass but every sample forbids it
        sinkhorn(torch.tensor([[0.0, -math.inf], [0.0, -math.inf]]))
