"""Sinkhorn-Knopp with unequal marginals (CPSL, Li et al., CVPR 2022, CPSL Eq. 5-6).

CPSL's self-labeling turns the cosine scores of pixel features against the cluster prototypes
into soft cluster assignments by solving an entropic optimal-transport problem (Eq. 5) whose
class marginal is the estimated class distribution ``r`` (Eq. 12) instead of the equipartition
of Asano et al.; Eq. 6 gives its solution ``Q* = diag(alpha) exp(scores / epsilon) diag(beta)``,
found by Sinkhorn-Knopp iterations (Alg. 1 lines 11-13). The solver knows nothing else of CPSL
(any scores, any marginal), so it has a module of its own:

- :func:`sinkhorn`: the assignments ``Q`` (matched to the authors' recorded outputs, the parity
  fixture ``cpsl_sinkhorn.npz``, to 1e-10 in float64), as matrix-vector scalings of a stabilised
  ``exp``, at the speed of the authors' plain formulation, with :func:`sinkhorn_log_domain` as the
  fallback where a scaling would leave the floating-point range;
- :func:`sinkhorn_log_domain`: the same iterations on ``log Q`` (safe for any finite scores, slower);
- :func:`class_marginal_error`: how far an assignment's class mass is from ``r``;
- :func:`normalized_marginal`: ``r / sum(r)``, validated (also CPSL's class-distribution estimate,
  :class:`~segadapt.methods.cpsl.ClassDistribution`).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, DataError

__all__ = ["class_marginal_error", "normalized_marginal", "sinkhorn", "sinkhorn_log_domain"]


def normalized_marginal(class_marginal: torch.Tensor | None, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """The class marginal ``r / sum(r)`` of Eq. 5 (CPSL Eq. 12's class distribution), as ``like``'s dtype and device.

    ``None`` gives the uniform marginal (equipartition, Asano et al.). ``r`` may be counts or any
    positive scale.

    Raises:
        DataError: ``r`` of the wrong length, negative, non-finite or all zero.

    Shape:
        - class_marginal: ``[K]`` or ``None``; output: ``[K]``

    Examples:
        >>> normalized_marginal(torch.tensor([3, 1]), 2, torch.zeros(1))
        tensor([0.7500, 0.2500])
        >>> normalized_marginal(None, 4, torch.zeros(1, dtype=torch.float64))
        tensor([0.2500, 0.2500, 0.2500, 0.2500], dtype=torch.float64)
    """
    return _marginal_and_values(class_marginal, num_classes, like)[0]


def _marginal_and_values(class_marginal: torch.Tensor | None, num_classes: int, like: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """:func:`normalized_marginal`, also as Python floats (no further device sync)."""
    if class_marginal is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=like.dtype, device=like.device), [1.0 / num_classes] * num_classes
    marginal = torch.as_tensor(class_marginal).to(dtype=like.dtype, device=like.device)
    if marginal.shape != (num_classes,):
        raise DataError(f"class_marginal must have shape ({num_classes},) for {num_classes} classes, got {tuple(marginal.shape)}")
    values = marginal.tolist()  # one device sync for all three checks
    if not all(math.isfinite(value) and value >= 0 for value in values) or sum(values) <= 0:
        raise DataError(f"class_marginal must be finite, non-negative and not all zero, got {values}")
    return marginal / marginal.sum(), [value / sum(values) for value in values]


def class_marginal_error(assignments: torch.Tensor, class_marginal: torch.Tensor | None = None) -> float:
    """``max_k | mean_b Q[b, k] - r_k / sum(r) |``: how far an assignment is from the class marginal of CPSL Eq. 5.

    Shape:
        - assignments: ``[B, K]``, rows summing to 1 (as :func:`sinkhorn` returns)
        - class_marginal: ``[K]`` or ``None`` (uniform)

    Examples:
        >>> class_marginal_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        0.0
    """
    marginal = normalized_marginal(class_marginal, assignments.shape[1], assignments)
    return float((assignments.mean(dim=0) - marginal).abs().max())


def _check_arguments(scores: torch.Tensor, epsilon: float, iterations: int, tolerance: float | None) -> None:
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise DataError(f"sinkhorn expects scores [B, K] with B, K > 0, got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ConfigError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ConfigError(f"sinkhorn iterations must be >= 1, got {iterations}")
    if tolerance is not None and tolerance <= 0:
        raise ConfigError(f"sinkhorn tolerance must be > 0 (or None for a fixed iteration count), got {tolerance}")


def _work_dtype(scores: torch.Tensor) -> torch.dtype:
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    class_marginal: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 3,
    tolerance: float | None = None,
) -> torch.Tensor:
    """Soft cluster assignments by Sinkhorn-Knopp with unequal class marginals (CPSL Eq. 5, 6; Alg. 1 l.11-13).

    Solves Eq. 5's transport problem ``Q* = diag(alpha) exp(scores / epsilon) diag(beta)`` (Eq. 6) with the
    class marginal ``r`` (Eq. 12: the estimated class distribution; ``None`` is the equipartition of
    Asano et al., the paper's "w/o CB" variant) and the uniform sample marginal ``h = 1/B``, then
    rescales so that each sample's assignment sums to 1. Each iteration first scales every class column
    to mass ``r_k`` and then every sample row to 1, which is exactly what the authors' ``sinkhorn`` does
    on ``Q^T`` (docs/reference_code.md, "CPSL: Sinkhorn"; the parity fixture ``cpsl_sinkhorn.npz`` is matched to
    1e-10 in float64). Only the ratios of ``r`` matter, so ``r`` need not sum to 1.

    Eq. 6's form is computed directly: ``E = exp((scores - rowmax) / epsilon)`` once (every row keeps its
    maximum over the classes with mass at 1, so nothing overflows), then the iterations only update the
    vectors ``alpha = B r / (E^T beta)`` and ``beta = 1 / (E alpha)`` (matrix-vector products, no rescaled
    copy of the matrix): on CPU 0.7-0.95x the time of the authors' plain ``exp``-then-normalise
    (docs/RESULTS.md, section 6), without its overflow once ``|score| / epsilon > 88``. Every class and
    sample sum is checked against the mass that ``exp``'s underflow can lose; if any falls below it (a
    class or sample far below the others, e.g. ``|score| / epsilon`` in the hundreds), the result comes
    from :func:`sinkhorn_log_domain` instead, so float32 is safe for any finite scores. Classes with ``r_k = 0`` get exactly zero assignment;
    ``-inf`` scores forbid a sample-class pair. float16/bfloat16/float32 inputs are computed and
    returned in float32, float64 stays float64. The assignment is a target, never differentiated
    (runs under ``no_grad``).

    Args:
        scores: ``f_SL(Z)``, e.g. cosine scores of :class:`SelfLabelingHead` in ``[-1, 1]``.
        class_marginal: ``r``, non-negative, ``None`` for the uniform marginal.
        epsilon: the entropic temperature ``epsilon`` of Eq. 6 (0.05 in Sec. 4.1).
        iterations: Sinkhorn iterations (3 in the authors' code; the paper gives none); with
            ``tolerance`` the most iterations run (raise it, e.g. to 100, when converging).
        tolerance: if set, stop as soon as :func:`class_marginal_error` is below it (checked after each
            iteration). The rows always sum to 1; only the class marginal is approximate.

    Returns:
        ``Q`` ``[B, K]``, non-negative, each row summing to 1, column sums close to ``B * r_k / sum(r)``.

    Raises:
        DataError: NaN or ``+inf`` scores, or a class with ``r_k > 0`` that is ``-inf`` for every sample.

    Shape:
        - scores: ``[B, K]``; class_marginal: ``[K]``; output: ``[B, K]``

    Examples:
        >>> scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
        >>> q = sinkhorn(scores, torch.tensor([0.5, 0.5]), iterations=50, tolerance=1e-6)
        >>> q.sum(dim=1).round(decimals=6)
        tensor([1., 1., 1., 1.])
        >>> q.sum(dim=0).round(decimals=4)
        tensor([2., 2.])
    """
    _check_arguments(scores, epsilon, iterations, tolerance)
    work = scores.to(_work_dtype(scores))
    marginal, masses = _marginal_and_values(class_marginal, scores.shape[1], work)
    assignments = _scaled_sinkhorn(work, marginal, masses, epsilon, iterations, tolerance)
    return assignments if assignments is not None else sinkhorn_log_domain(scores, class_marginal, epsilon, iterations, tolerance)


def _class_sums(kernel: torch.Tensor, weights: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``kernel^T weights`` (``[B, K]``, ``[B]`` -> ``[K]``), on CPU summed per block of rows.

    One CPU gemv over 65,536 rows accumulates sequentially (float32 relative error 5e-6, measured);
    per-block products then a sum over the blocks keep it at ``torch.sum``'s 1e-7, at gemv's speed.
    """
    num_blocks = kernel.shape[0] // block
    if kernel.is_cuda or num_blocks < 4:
        return weights @ kernel
    cut = num_blocks * block
    sums = torch.bmm(weights[:cut].view(num_blocks, 1, block), kernel[:cut].view(num_blocks, block, -1)).sum(dim=0)[0]
    return sums.addmv_(kernel[cut:].T, weights[cut:]) if cut < kernel.shape[0] else sums


def _exp_(exponents: torch.Tensor, floor: float) -> torch.Tensor:
    """``exp_`` in place; on CPU, entries below ``log(floor)`` become ``floor`` (``-inf``: exactly 0), as ``exp``
    is ~100x slower where its results are subnormal or 0 (measured: 32 ms instead of 0.35 ms on 65,536 x 19)."""
    lowest = math.inf if exponents.is_cuda else float(exponents.amin())
    if not lowest < math.log(floor):  # NaN too: it goes on to fail the checks
        return exponents.exp_()
    forbidden = torch.isneginf(exponents) if lowest == -math.inf else None
    values = exponents.clamp_min_(math.log(floor)).exp_()
    return values if forbidden is None else values.masked_fill_(forbidden, 0.0)


def _scaled_sinkhorn(
    scores: torch.Tensor, marginal: torch.Tensor, masses: list[float], epsilon: float, iterations: int, tolerance: float | None
) -> torch.Tensor | None:
    """Eq. 6 as ``diag(beta) E diag(alpha)``, ``E = exp((scores - rowmax) / epsilon)``; ``None`` where underflow may bias it.

    With ``floor = tiny / eps_machine`` (``tiny``: the smallest normal float), which is also what an entry
    of ``E`` (or of the starting ``beta``) at most gains by :func:`_exp_`, a sum of ``n`` products of
    ``E`` with a scaling ``w`` is off by at most ``n * floor * (1 + max w)``. The result is kept only if
    every iteration's class sums are at least ``B * floor / eps_machine * (1 + max beta)`` and its sample
    sums at least ``K * floor / eps_machine * (1 + max alpha)``: rounding, not underflow, then bounds the error.
    """
    num_samples, num_classes = scores.shape
    info = torch.finfo(scores.dtype)
    floor = info.tiny / info.eps
    smallest_mass = min(mass for mass in masses if mass > 0)
    if 0.0 in masses:
        # the shift is each row's max over the classes with mass: one without sets no scale (its alpha is 0), its exp is floor
        zero_classes = torch.tensor([k for k, mass in enumerate(masses) if mass == 0], device=scores.device)
        row_max = scores.index_fill(1, zero_classes, -math.inf).amax(dim=1, keepdim=True)
        exponents = torch.sub(scores, row_max).div_(epsilon).index_fill_(1, zero_classes, math.log(floor))
    else:
        row_max = scores.amax(dim=1, keepdim=True)
        exponents = torch.sub(scores, row_max).div_(epsilon)
    kernel = _exp_(exponents, floor)  # the only [B, K] buffer; each row's max over classes with mass is 1
    # the plain start exp(scores / eps) is kernel * exp(row_max / eps): this beta, up to a constant (at least floor,
    # as _exp_; a row of -inf is NaN in the kernel already)
    sample_scale = row_max[:, 0].sub(row_max.max()).div_(epsilon).clamp_min_(math.log(floor)).exp_()
    class_floor, sample_floor = num_samples * floor / info.eps, num_classes * floor / info.eps
    max_beta = 1.0  # the starting beta is at most 1
    pending: list[torch.Tensor] = []  # per iteration: max alpha, min (E alpha)

    def in_range() -> bool:
        nonlocal max_beta
        values = torch.stack(pending).tolist()
        pending.clear()
        for max_alpha, min_sample_sum in zip(values[::2], values[1::2]):
            # min over r_k > 0 of the class sums B r_k / alpha_k >= B min r / max alpha; written so that NaN and inf fail
            if not (max_alpha * class_floor * (1 + max_beta) <= num_samples * smallest_mass and min_sample_sum >= sample_floor * (1 + max_alpha)):
                return False
            max_beta = 1 / min_sample_sum
        return True

    eager = tolerance is not None  # which synchronises anyway; else one check at the end (a sync on CUDA)
    # class columns to mass B r_k (not r_k): both marginals then total B, and alpha, beta do not drift by B per iteration
    class_mass = marginal * num_samples
    class_sums = _class_sums(kernel, sample_scale)
    for iteration in range(iterations):
        class_scale = class_mass / class_sums.clamp_min_(info.tiny)  # r_k = 0: alpha_k = 0, even where the class sum underflowed
        sample_sums = kernel @ class_scale
        pending += [class_scale.amax(), sample_sums.amin()]
        if eager and not in_range():
            return None
        sample_scale = sample_sums.reciprocal()
        if iteration + 1 < iterations or tolerance is not None:
            class_sums = _class_sums(kernel, sample_scale)
        # mean_b Q[b, k] = alpha_k (E^T beta)_k / B: class_marginal_error of Q without forming Q
        if tolerance is not None and float((class_scale * class_sums / num_samples - marginal).abs().max()) < tolerance:
            break
    if not eager and not in_range():
        return None
    return kernel.mul_(class_scale).mul_(sample_scale[:, None])


@torch.no_grad()
def sinkhorn_log_domain(
    scores: torch.Tensor,
    class_marginal: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 3,
    tolerance: float | None = None,
) -> torch.Tensor:
    """:func:`sinkhorn` (CPSL Eq. 5-6) computed on ``log Q`` with ``logsumexp``: safe for any finite scores, slower.

    The same iterations, arguments and result as :func:`sinkhorn` (which falls back to this where its
    scalings would underflow); every step rescales the whole ``[K, B]`` matrix, so it costs 1.1-1.4x
    the plain formulation on CPU and 4.4x on an H100, and 20x on CPU where ``exp`` underflows to
    subnormals (docs/RESULTS.md, section 6). Classes whose mass shrinks to nothing and 65,536+ samples
    stay finite in float32.

    Examples:
        >>> scores = torch.tensor([[900.0, 0.0], [0.0, 900.0], [-900.0, 900.0]])  # exp(900 / 0.05) overflows
        >>> sinkhorn_log_domain(scores, iterations=10)
        tensor([[1., 0.],
                [0., 1.],
                [0., 1.]])
    """
    _check_arguments(scores, epsilon, iterations, tolerance)
    # Q^T [K, B] as the reference does: the class sums then run over contiguous memory (the [B, K]
    # layout measured 1.5x slower on CPU); in-place updates because the matrix is 65,536+ x K per call
    log_q = (scores.T.to(_work_dtype(scores)) / epsilon).contiguous()
    marginal = normalized_marginal(class_marginal, scores.shape[1], log_q)
    log_marginal = marginal.log().unsqueeze(1)
    has_mass = marginal.unsqueeze(1) > 0
    for _ in range(iterations):
        class_log_mass = torch.logsumexp(log_q, dim=1, keepdim=True)
        # where(): a zero-mass class is -inf everywhere, and -inf - (-inf) would be NaN
        log_q.add_(torch.where(has_mass, log_marginal - class_log_mass, -math.inf))
        log_q.sub_(torch.logsumexp(log_q, dim=0, keepdim=True))
        if tolerance is not None and class_marginal_error(log_q.exp().T, marginal) < tolerance:
            break
    assignments = log_q.exp_().T.contiguous()
    if not torch.isfinite(assignments.sum()):
        raise DataError("sinkhorn produced NaN: the scores contain NaN or +inf, or a class with r_k > 0 is -inf for every sample")
    return assignments
