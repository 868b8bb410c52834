"""Resetting the optimizer state of the directions the allocator touched, and nothing else."""

from __future__ import annotations

import math

import torch

from .distributed import deepspeed_state_pieces, is_zero3_param, is_zero12_param, local_piece, write_slot
from .layer import FlexLoRALayer


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
                    f"optimizer state {key!r} has shape {tuple(value.shape)}, not the parameter's "
                    f"{tuple(param.shape)}: FlexLoRA can only reset element-wise optimizer state (Adam, AdamW, "
                    "SGD with momentum, ...)"
                )
            pieces.append(local_piece(value))
    for piece in pieces:
        write_slot(piece, slot, slot_dim, 0.0)
    return len(pieces)


def shape_matched_lambda_multiplier(d_out: int, d_in: int, factor_init: str, init_std: float) -> float:
    """lambda's lr over the lr (``lambda_lr_multiplier: auto``) at which one Adam step on lambda moves Delta W as far as
    one step on a LoRA B of the same shape does.

    Under Adam each parameter moves by about the lr per step (the update is about sign(gradient) * lr early on).
    LoRA (PEFT's init): Delta W = s B A with B [d_out, r] at 0 and A [r, d_in] kaiming-uniform (a = sqrt 5), entries
    U(-1/sqrt d_in, 1/sqrt d_in), so each row of A has length about 1/sqrt 3 and the rows are nearly orthogonal. One
    step moves every entry of B by lr, so ||s dB A||_F = s * lr * sqrt(d_out * r) / sqrt 3.
    FlexLoRA: Delta W = s P diag(lambda) Q with lambda at 0; one step moves each of the r entries of lambda by
    lr_lambda, so ||s P diag(d lambda) Q||_F = s * lr_lambda * sqrt(r) * |p| * |q|, with |p| = |q| = 1 for
    orthonormal factors and about init_std * sqrt(d_out), init_std * sqrt(d_in) for Gaussian ones.
    Equal pace: lr_lambda / lr = sqrt(d_out / 3) / (|p| * |q|), e.g. 11.3 for a 384 x 384 matrix with orthonormal
    factors and 73 with Gaussian ones at std 0.02 (their P and Q also move, so the ratio holds at the start only).
    """
    if factor_init == "orthonormal":
        lengths = 1.0
    else:
        lengths = init_std * math.sqrt(d_out) * init_std * math.sqrt(d_in)
    return math.sqrt(d_out / 3) / lengths


def param_groups(model: torch.nn.Module, lr: float, lambda_lr_multiplier: float | str = 1.0) -> list[dict]:
    """Optimizer parameter groups for every trainable parameter of ``model``: FlexLoRA's lambda vectors at
    ``lr * lambda_lr_multiplier``, everything else at ``lr``. A multiplier of 1 is the paper's single group; ``"auto"``
    gives each matrix's lambda ``shape_matched_lambda_multiplier`` of its shape and factor init (one group per value).

    Why a separate rate can matter (beyond the paper): under Adam every parameter moves by about the lr per step, so a
    step on the r entries of lambda changes ||Delta W||_F by about lr * sqrt(r) * scaling (P and Q have unit columns
    once the orthogonality regulariser holds), while a LoRA step on B [d_out, r] changes it by about
    lr * sqrt(d_out * r) * |A row| * scaling: the SVD form's update grows about sqrt(d_out) times slower at the same lr.
    LR schedulers scale every group by the same factor, so the ratios hold throughout.
    """
    auto = lambda_lr_multiplier == "auto"
    if not auto and not (isinstance(lambda_lr_multiplier, (int, float)) and 0 < lambda_lr_multiplier < float("inf")):
        raise ValueError(f"lambda_lr_multiplier must be a finite number > 0 or 'auto', got {lambda_lr_multiplier!r}")
    lambdas: dict[int, tuple[torch.Tensor, float]] = {}  # id(lambda) -> (lambda, its multiplier)
    for module in model.modules():
        if isinstance(module, FlexLoRALayer) and module.lora_lambda.requires_grad:
            multiplier = (
                shape_matched_lambda_multiplier(module.d_out, module.d_in, module.factor_init, module.init_std)
                if auto
                else lambda_lr_multiplier
            )
            lambdas[id(module.lora_lambda)] = (module.lora_lambda, multiplier)
    others = [param for param in model.parameters() if param.requires_grad and id(param) not in lambdas]
    if lambda_lr_multiplier != 1.0 and not lambdas:
        raise ValueError(
            "lambda_lr_multiplier is set but the model has no trainable FlexLoRA lambda (lora_lambda) parameters"
        )
    groups = [{"params": others, "lr": lr}] if others else []
    for multiplier in sorted({m for _, m in lambdas.values()}):
        groups.append({"params": [p for p, m in lambdas.values() if m == multiplier], "lr": lr * multiplier})
    return groups
