"""Initial values of a newly activated direction (paper §3.3 and the §5.3 ablation), as pure functions.

Random vectors come from a generator seeded by (seed, step, module, slot) and are drawn at full length,
so any process that holds only a shard of P or Q can slice the same values a single process would use.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier: spreads consecutive integers over the 64-bit range


def direction_seed(seed: int, step: int, module_index: int, slot: int) -> int:
    value = 0
    for part in (seed, step, module_index, slot):
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def gaussian_direction(d_out: int, d_in: int, std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length Gaussian P-column [d_out] and Q-row [d_in], float32 on CPU."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.randn(d_out, generator=generator) * std
    q = torch.randn(d_in, generator=generator) * std
    return p, q


def initial_factors(
    d_out: int, d_in: int, capacity: int, factor_init: str, std: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """P [d_out, capacity] and Q [capacity, d_in] at step 0, float32 on CPU (lambda starts at 0 whatever they are).

    gaussian:    entries N(0, std^2), columns / rows of length about std * sqrt(d) (0.4 for d = 384 at std 0.02).
    orthonormal: the same Gaussian draws orthonormalised (QR), so P^T P = Q Q^T = I and the regulariser starts at 0.
    """
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(d_out, capacity, generator=generator)
    q = torch.randn(capacity, d_in, generator=generator)
    if factor_init == "gaussian":
        return p * std, q * std
    if factor_init == "orthonormal":
        return torch.linalg.qr(p.double())[0].float(), torch.linalg.qr(q.T.double())[0].T.float()
    raise ValueError(f"unknown factor_init {factor_init!r}")


def _orthonormal_to(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt: the unit vector along ``vector`` with the span of ``basis`` columns removed."""
    v = vector.double()
    if basis.numel():
        q, _ = torch.linalg.qr(basis.double())
        v = v - q @ (q.T @ v)
    norm = v.norm()
    if norm <= 1e-12:
        raise ValueError("cannot draw a new direction orthogonal to the active ones: they already span the space")
    return (v / norm).float()


def new_direction(
    kind: str,
    d_out: int,
    d_in: int,
    std: float,
    seed: int,
    small_value: float = 1e-3,
    active_p: torch.Tensor | None = None,
    active_q: torch.Tensor | None = None,
    unit_length: bool = False,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Return (lambda, P-column [d_out], Q-row [d_in]) for a new direction.

    zero_impact: lambda = 0, Gaussian vectors (the model output does not change); scaled to unit length when
                 ``unit_length`` (factor_init=orthonormal), which needs no other direction, so it stays shard-local.
    zero:        lambda = 0, zero vectors.
    orthogonal:  lambda = 0, unit vectors orthogonal to the active P columns / Q rows.
    small:       lambda = small_value, the same orthogonal vectors (changes the output slightly).
    ``active_p`` [d_out, r] and ``active_q`` [r, d_in] are needed for orthogonal and small.
    """
    if kind == "zero":
        return 0.0, torch.zeros(d_out), torch.zeros(d_in)
    p, q = gaussian_direction(d_out, d_in, std, seed)
    if kind == "zero_impact":
        return (0.0, p / p.norm(), q / q.norm()) if unit_length else (0.0, p, q)
    if kind in ("orthogonal", "small"):
        if active_p is None or active_q is None:
            raise ValueError(f"expand_init={kind!r} needs the active P columns and Q rows")
        p = _orthonormal_to(p, active_p.detach().float().cpu())
        q = _orthonormal_to(q, active_q.detach().float().cpu().T)
        return (small_value if kind == "small" else 0.0), p, q
    raise ValueError(f"unknown expand_init {kind!r}")
