"""Matrix importance scores (paper eqs. 3, 5-7, 10, 11) as pure functions.

Every function takes the singular values of N matrices stacked as ``lam`` [N, R] and the 0/1 ``mask``
[N, R] of active directions, and returns one score per matrix [N]. Inactive slots never contribute.
Scores are defined for every edge case: active rank 1, zero energy (right after initialisation) and
empty matrices all score 0; non-finite input raises (the allocator names the module).
"""

from __future__ import annotations

import torch


def _check_inputs(lam: torch.Tensor, mask: torch.Tensor) -> None:
    if lam.shape != mask.shape or lam.dim() != 2:
        raise ValueError(f"lam and mask must both be [N, R]; got {tuple(lam.shape)} and {tuple(mask.shape)}")
    if not torch.isfinite(lam).all():
        rows = torch.nonzero(~torch.isfinite(lam).all(dim=1)).flatten().tolist()
        raise FloatingPointError(f"non-finite singular values in matrices {rows}")


def _normalised_energy(lam: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_i = lambda_i^2 / sum_j lambda_j^2 over active slots; s = 0 where a matrix has no energy."""
    energy = (lam * mask) ** 2
    total = energy.sum(dim=1, keepdim=True)
    s = torch.where(total > 0, energy / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(energy))
    return s, total.squeeze(1)


def _entropy_sum(s: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_i s_i log(s_i + eps) (<= 0); zero entries contribute nothing."""
    return (s * torch.log(s + eps)).sum(dim=1)


def _log_rank(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rank = mask.sum(dim=1)
    # log r vanishes at r = 1; such matrices (and empty ones) score 0 instead of 0/0.
    return rank, torch.log(rank.clamp_min(2.0))


def spectral_entropy(lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 3: I = -(1/log r) sum_i s_i log(s_i + eps), clamped to [0, 1]."""
    _check_inputs(lam, mask)
    s, total = _normalised_energy(lam, mask)
    rank, log_r = _log_rank(mask)
    score = -_entropy_sum(s, eps) / log_r
    defined = (rank > 1) & (total > 0)
    return torch.where(defined, score.clamp(0.0, 1.0), torch.zeros_like(score))


def nuclear_norm(lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 7: (1/n) sum_i |lambda_i| over the n active directions."""
    _check_inputs(lam, mask)
    rank = mask.sum(dim=1)
    return (lam.abs() * mask).sum(dim=1) / rank.clamp_min(1.0)


def frobenius_norm(lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 7: (1/n) sqrt(sum_i lambda_i^2) over the n active directions."""
    _check_inputs(lam, mask)
    rank = mask.sum(dim=1)
    return ((lam * mask) ** 2).sum(dim=1).sqrt() / rank.clamp_min(1.0)


def elementwise_energy_entropy(lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 10 (I_Elem): -(1/(r log r)) sum_i |lambda_i| s_i log(s_i + eps)."""
    _check_inputs(lam, mask)
    s, total = _normalised_energy(lam, mask)
    rank, log_r = _log_rank(mask)
    score = -((lam.abs() * mask) * s * torch.log(s + eps)).sum(dim=1) / (rank.clamp_min(1.0) * log_r)
    defined = (rank > 1) & (total > 0)
    return torch.where(defined, score.clamp_min(0.0), torch.zeros_like(score))


def matrixwise_energy_entropy(lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 11 (I_Mat): -(1/(r log r)) (sum_i |lambda_i|) (sum_i s_i log(s_i + eps))."""
    _check_inputs(lam, mask)
    s, total = _normalised_energy(lam, mask)
    rank, log_r = _log_rank(mask)
    score = -(lam.abs() * mask).sum(dim=1) * _entropy_sum(s, eps) / (rank.clamp_min(1.0) * log_r)
    defined = (rank > 1) & (total > 0)
    return torch.where(defined, score.clamp_min(0.0), torch.zeros_like(score))


def mean_slot_sensitivity(slot_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AdaLoRA-style sensitivity (eqs. 5-6) lifted to a matrix: the mean triplet score of its active slots.

    ``slot_scores`` [N, R] holds, per slot, the smoothed sensitivity x uncertainty of lambda_i plus the means
    over the i-th column of P and the i-th row of Q (AdaLoRA's triplet score).
    """
    _check_inputs(slot_scores, mask)
    rank = mask.sum(dim=1)
    return (slot_scores * mask).sum(dim=1) / rank.clamp_min(1.0)


SPECTRAL_METRICS = {
    "entropy": spectral_entropy,
    "nuclear": nuclear_norm,
    "frobenius": frobenius_norm,
    "elem": elementwise_energy_entropy,
    "mat": matrixwise_energy_entropy,
}


def matrix_importance(
    metric: str,
    lam: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    slot_sensitivity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score N matrices with the named metric (one of ``FlexLoRAConfig.importance``)."""
    if metric == "sensitivity":
        if slot_sensitivity is None:
            raise ValueError("importance='sensitivity' needs per-slot sensitivity scores (gradients were never seen)")
        return mean_slot_sensitivity(slot_sensitivity, mask)
    try:
        fn = SPECTRAL_METRICS[metric]
    except KeyError:
        raise ValueError(
            f"unknown importance metric {metric!r}; choose from {sorted(SPECTRAL_METRICS) + ['sensitivity']}"
        )
    return fn(lam, mask, eps)
