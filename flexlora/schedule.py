"""When ranks move and how many (paper eq. 4), as pure functions of the optimizer step."""

from __future__ import annotations

import math

from .config import FlexLoRAConfig


def in_allocation_window(step: int, t_warmup: int, t_final: int, total_steps: int, delta_t: int) -> bool:
    """True at steps t_warmup <= t <= T - t_final with (t - t_warmup) % delta_t == 0."""
    return t_warmup <= step <= total_steps - t_final and (step - t_warmup) % delta_t == 0


def paper_budget(step: int, b0: int, t_warmup: int, t_final: int, total_steps: int) -> int:
    """Eq. 4: b(t) = round(b0 (1 - (t - t_warmup) / (T - t_final))^3), clamped to [0, b0].

    Rounds half up (so the value does not depend on Python's banker's rounding).
    """
    progress = (step - t_warmup) / (total_steps - t_final)
    value = b0 * (1.0 - progress) ** 3
    return int(min(max(math.floor(value + 0.5), 0), b0))


def ranks_to_move(step: int, config: FlexLoRAConfig) -> int:
    """How many matrices prune / expand at this optimizer step (0 outside allocation steps)."""
    if config.total_steps is None:
        raise ValueError(
            "FlexLoRAConfig.total_steps is not set: the allocation schedule needs the total number of optimizer steps"
        )
    if not in_allocation_window(step, config.t_warmup, config.t_final, config.total_steps, config.delta_t):
        return 0
    if config.schedule == "constant":
        return config.b0
    return paper_budget(step, config.b0, config.t_warmup, config.t_final, config.total_steps)
