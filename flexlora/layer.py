"""The FlexLoRA layer: a frozen linear map plus Delta W = P diag(lambda * mask) Q * (alpha / r).

P [d_out, R], lambda [R] and Q [R, d_in] are allocated once at capacity R = max_rank and never change
shape; ``rank_mask`` (a 0/1 buffer) says which of the R directions are active. Keeping shapes fixed is what
lets FSDP / ZeRO shard the adapter once and the allocator edit it in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .config import FlexLoRAConfig
from .expansion import direction_seed

ADAPTABLE_TYPES = (nn.Linear, Conv1D)


def orthogonality_penalty(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2 over the active directions: ||P_a^T P_a - I||_F^2 + ||Q_a Q_a^T - I||_F^2.

    Masking columns of P and rows of Q to zero gives the same value as slicing out the active ones, and
    keeps shapes static.
    """
    m = mask.to(p.dtype)
    pm = p * m
    qm = q * m[:, None]
    eye = torch.diag(m)
    return ((pm.T @ pm - eye) ** 2).sum() + ((qm @ qm.T - eye) ** 2).sum()


class _OrthogonalityRegulariser(torch.autograd.Function):
    """Pass ``output`` through unchanged and return eq. 2's Gram residuals G_P = P_a^T P_a - I, G_Q = Q_a Q_a^T - I;
    in backward, add ``weight`` x the gradient of ||G_P||_F^2 + ||G_Q||_F^2 to P and Q.

    The same as adding ``weight * orthogonality_penalty(P, Q, mask)`` to the loss, but (1) built inside the layer's
    forward, where FSDP / ZeRO-3 have the full P and Q in memory, with its backward running exactly when the
    layer's own backward does (so sharded parameters are materialised, and activation checkpointing works), and
    (2) with the gradient written out, 4 P G_P and 4 G_Q Q, in six ops per layer instead of an autograd graph of
    ~17 small ones: that graph cost ~7 % of a SmolLM2 train step on a CPU (bench/results/overhead.md). The penalty's
    value is only needed for logging and is computed from the residuals when asked for.
    """

    @staticmethod
    def forward(ctx, output, p, q, mask, weight):
        m = mask.to(p.dtype)
        active_pairs = torch.outer(m, m)
        minus_eye = torch.diag(-m)
        # Masking P's columns (Q's rows) first would give the same Gram matrices: (P m)^T (P m) = (P^T P) * m m^T.
        gram_p = torch.addcmul(minus_eye, p.T @ p, active_pairs)
        gram_q = torch.addcmul(minus_eye, q @ q.T, active_pairs)
        ctx.save_for_backward(p, q, gram_p, gram_q)
        ctx.weight = weight
        ctx.mark_non_differentiable(gram_p, gram_q)
        return output.view_as(output), gram_p, gram_q

    @staticmethod
    def backward(ctx, grad_output, _grad_gram_p, _grad_gram_q):
        p, q, gram_p, gram_q = ctx.saved_tensors
        # gram_* are zero in the rows and columns of inactive slots, so those slots get no gradient, as with a mask.
        # (addmm with beta=0 ignores its first argument: one fused, scaled matmul.)
        scale = 4 * ctx.weight
        grad_p = torch.addmm(p, p, gram_p, beta=0, alpha=scale) if ctx.needs_input_grad[1] else None
        grad_q = torch.addmm(q, gram_q, q, beta=0, alpha=scale) if ctx.needs_input_grad[2] else None
        return grad_output, grad_p, grad_q, None, None


class FlexLoRALayer(nn.Module):
    def __init__(self, base_layer: nn.Module, config: FlexLoRAConfig, module_index: int):
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE_TYPES):
            raise TypeError(f"FlexLoRA adapts nn.Linear and transformers Conv1D layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # Conv1D stores its weight as [d_in, d_out]
        weight = base_layer.weight
        self.d_out, self.d_in = (weight.shape[1], weight.shape[0]) if self.fan_in_fan_out else weight.shape
        self.capacity = config.max_rank
        self.initial_rank = config.r
        self.scaling = config.lora_alpha / config.r
        self.orth_reg_weight = config.orth_reg_weight
        self.penalty_grad_scale = 1.0  # 1 / gradient-accumulation steps, set by the training integration
        self.merged = False
        self._last_grams: tuple[torch.Tensor, torch.Tensor] | None = None  # eq. 2's residuals, last training forward
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

        dtype = getattr(torch, config.adapter_dtype)
        factory = {"dtype": dtype, "device": weight.device}
        self.lora_P = nn.Parameter(torch.empty(self.d_out, self.capacity, **factory))
        self.lora_lambda = nn.Parameter(torch.zeros(self.capacity, **factory))
        self.lora_Q = nn.Parameter(torch.empty(self.capacity, self.d_in, **factory))
        mask = torch.zeros(self.capacity, **factory)
        mask[: config.r] = 1.0
        self.register_buffer("rank_mask", mask)
        if weight.device.type != "meta":
            generator = torch.Generator().manual_seed(direction_seed(config.seed, -1, module_index, 0))
            with torch.no_grad():
                self.lora_P.copy_(torch.randn(self.d_out, self.capacity, generator=generator) * config.init_std)
                self.lora_Q.copy_(torch.randn(self.capacity, self.d_in, generator=generator) * config.init_std)

    def active_rank(self) -> int:
        if self.rank_mask.is_meta:  # shape-only model (e.g. for parameter counts): nothing has moved yet
            return self.initial_rank
        return int(self.rank_mask.sum().item())

    def delta_weight(self) -> torch.Tensor:
        """Delta W in the layout of the base weight ([d_out, d_in], or [d_in, d_out] for Conv1D)."""
        delta = (self.lora_P * (self.lora_lambda * self.rank_mask * self.scaling)) @ self.lora_Q
        return delta.T if self.fan_in_fan_out else delta

    @property
    def last_orth_penalty(self) -> torch.Tensor | None:
        """Eq. 2's value in the last training forward (None before the first one)."""
        if self._last_grams is None:
            return None
        gram_p, gram_q = self._last_grams
        return gram_p.square().sum() + gram_q.square().sum()

    def orth_penalty(self) -> torch.Tensor:
        return orthogonality_penalty(self.lora_P, self.lora_Q, self.rank_mask)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("adapter already merged into the base weight")
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # The mask buffer keeps its own dtype while FSDP2 mixed precision casts lambda to bf16 for compute.
        gains = self.lora_lambda * self.rank_mask.to(self.lora_lambda.dtype) * self.scaling
        h = self.dropout(x.to(self.lora_Q.dtype))
        delta = F.linear(F.linear(h, self.lora_Q) * gains, self.lora_P)
        if self.training and self.orth_reg_weight > 0 and torch.is_grad_enabled():
            delta, gram_p, gram_q = _OrthogonalityRegulariser.apply(
                delta, self.lora_P, self.lora_Q, self.rank_mask, self.orth_reg_weight * self.penalty_grad_scale
            )
            self._last_grams = (gram_p.detach(), gram_q.detach())
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, capacity={self.capacity}, scaling={self.scaling:g}"
