"""Which matrices lose or gain a direction, and which slot: pure functions, deterministic tie-breaking."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def select_matrices(
    scores: Sequence[float],
    ranks: Sequence[int],
    budget: int,
    min_rank: int,
    max_rank: int,
    mode: str,
) -> tuple[list[int], list[int]]:
    """Return (prune, expand) matrix indices.

    Prune the ``budget`` least important matrices with rank > min_rank; expand the ``budget`` most important
    with rank < max_rank. Ties go to the lower index (module order). In ``flex`` mode both lists have the same
    length, shrunk if needed so the total rank is conserved, and no matrix appears in both.
    """
    if budget <= 0:
        return [], []
    n = len(scores)
    prunable = sorted((i for i in range(n) if ranks[i] > min_rank), key=lambda i: (scores[i], i))
    expandable = sorted((i for i in range(n) if ranks[i] < max_rank), key=lambda i: (-scores[i], i))
    if mode == "prune_only":
        return prunable[:budget], []
    if mode == "expand_only":
        return [], expandable[:budget]
    if mode != "flex":
        raise ValueError(f"unknown allocation mode {mode!r}")
    for k in range(min(budget, len(prunable), len(expandable)), 0, -1):
        prune = prunable[:k]
        taken = set(prune)
        expand = [i for i in expandable if i not in taken][:k]
        if len(expand) == k:
            return prune, expand
    return [], []


def weakest_active_slot(lam: torch.Tensor, mask: torch.Tensor) -> int:
    """The active slot with the smallest |lambda| (lowest index on ties)."""
    active = torch.nonzero(mask > 0).flatten()
    if active.numel() == 0:
        raise ValueError("no active slot to prune")
    magnitudes = lam[active].abs()
    return int(active[int(torch.argmin(magnitudes))])  # argmin returns the first minimum


def first_free_slot(mask: torch.Tensor) -> int:
    free = torch.nonzero(mask == 0).flatten()
    if free.numel() == 0:
        raise ValueError("no free slot to expand into")
    return int(free[0])
