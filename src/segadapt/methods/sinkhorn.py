"""Sinkhorn-Knopp with unequal marginals in the log domain (CPSL, Li et al., CVPR 2022, CPSL Eq. 5-6).

CPSL's self-labeling turns the cosine scores of pixel features against the cluster prototypes
into soft cluster assignments by solving an entropic optimal-transport problem (Eq. 5) whose
class marginal is the estimated class distribution ``r`` (Eq. 12) instead of the equipartition
of Asano et al.; Eq. 6 gives its solution ``Q* = diag(alpha) exp(scores / epsilon) diag(beta)``,
found by Sinkhorn-Knopp iterations (Alg. 1 lines 11-13). The solver knows nothing else of CPSL
(any scores, any marginal), so it has a module of its own:

- :func:`sinkhorn`: the assignments ``Q`` (matched to the authors' recorded outputs, the parity
  fixture ``cpsl_sinkhorn.npz``, to 1e-10 in float64);
- :func:`class_marginal_error`: how far an assignment's class mass is from ``r``;
- :func:`normalized_marginal`: ``r / sum(r)``, validated (also CPSL's class-distribution estimate,
  :class:`~segadapt.methods.cpsl.ClassDistribution`).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, DataError

__all__ = ["class_marginal_error", "normalized_marginal", "sinkhorn"]


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
    if class_marginal is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=like.dtype, device=like.device)
    marginal = torch.as_tensor(class_marginal).to(dtype=like.dtype, device=like.device)
    if marginal.shape != (num_classes,):
        raise DataError(f"class_marginal must have shape ({num_classes},) for {num_classes} classes, got {tuple(marginal.shape)}")
    if not torch.isfinite(marginal).all() or (marginal < 0).any() or marginal.sum() <= 0:
        raise DataError(f"class_marginal must be finite, non-negative and not all zero, got {marginal.tolist()}")
    return marginal / marginal.sum()


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

    The work is done on ``log Q`` with ``logsumexp``, so float32 is safe for any finite scores,
    65,536+ samples and classes whose mass shrinks to nothing; classes with ``r_k = 0`` get exactly
    zero assignment; ``-inf`` scores forbid a sample-class pair. float16/bfloat16/float32 inputs are
    computed and returned in float32, float64 stays float64. The assignment is a target, never
    differentiated (runs under ``no_grad``).

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
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise DataError(f"sinkhorn expects scores [B, K] with B, K > 0, got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ConfigError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ConfigError(f"sinkhorn iterations must be >= 1, got {iterations}")
    if tolerance is not None and tolerance <= 0:
        raise ConfigError(f"sinkhorn tolerance must be > 0 (or None for a fixed iteration count), got {tolerance}")
    # Q^T [K, B] as the reference does: the class sums then run over contiguous memory (the [B, K]
    # layout measured 1.5x slower on CPU); in-place updates because the matrix is 65,536+ x K per call
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    log_q = (scores.T.to(dtype) / epsilon).contiguous()
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
