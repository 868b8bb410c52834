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


def param_groups(model: torch.nn.Module, lr: float, lambda_lr_multiplier: float = 1.0) -> list[dict]:
    """Optimizer parameter groups for every trainable parameter of ``model``: FlexLoRA's lambda vectors at
    ``lr * lambda_lr_multiplier``, everything else at ``lr``. A multiplier of 1 is the paper's single group.

    Why a separate rate can matter (beyond the paper): under Adam every parameter moves by about the lr per step, so a
    step on the r entries of lambda changes ||Delta W||_F by about lr * sqrt(r) * scaling (P and Q have unit columns
    once the orthogonality regulariser holds), while a LoRA step on B [d_out, r] changes it by about
    lr * sqrt(d_out * r) * |A row| * scaling: the SVD form's update grows about sqrt(d_out) times slower at the same lr.
    LR schedulers scale every group by the same factor, so the ratio holds throughout.
    """
    if not (lambda_lr_multiplier > 0 and lambda_lr_multiplier < float("inf")):
        raise ValueError(f"lambda_lr_multiplier must be a finite number > 0, got {lambda_lr_multiplier}")
    lambdas, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (lambdas if name.rpartition(".")[2] == "lora_lambda" else others).append(param)
    if lambda_lr_multiplier != 1.0 and not lambdas:
        raise ValueError("lambda_lr_multiplier is set but the model has no trainable FlexLoRA lambda (lora_lambda) parameters")
    groups = [{"params": others, "lr": lr}] if others else []
    if lambdas:
        groups.append({"params": lambdas, "lr": lr * lambda_lr_multiplier})
    return groups
