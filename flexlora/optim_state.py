"""Resetting the optimizer state of the directions the allocator touched, and nothing else."""

from __future__ import annotations

import torch

from .distributed import deepspeed_state_pieces, is_zero3_param, is_zero12_param, local_piece, write_slot


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's / DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def reset_slot_state(optimizer, param: torch.Tensor, slot: int, slot_dim: int) -> int:
    """Zero every per-element state tensor of ``param`` (Adam moments, momentum, ...) at ``slot``.

    ``slot_dim`` is the dimension of ``param`` that indexes directions (1 for P, 0 for lambda and Q).
    Returns how many state tensors were edited. Scalar state (Adam's step count) is shared by the whole
    tensor and left alone, as is the learning-rate schedule. Under DeepSpeed the state lives in DeepSpeed's
    flat partitions, not in ``optimizer.state[param]``; this process's part of it is edited there.
    """
    if is_zero3_param(param) or is_zero12_param(param):
        pieces = deepspeed_state_pieces(param)
    else:
        state = unwrap_optimizer(optimizer).state.get(param)
        pieces = []
        for key, value in (state or {}).items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if value.shape != param.shape:
                raise RuntimeError(
                    f"optimizer state {key!r} has shape {tuple(value.shape)}, not the parameter's {tuple(param.shape)}: "
                    "FlexLoRA can only reset element-wise optimizer state (Adam, AdamW, SGD with momentum, ...)"
                )
            pieces.append(local_piece(value))
    for piece in pieces:
        write_slot(piece, slot, slot_dim, 0.0)
    return len(pieces)
