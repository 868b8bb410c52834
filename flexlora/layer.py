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
from .regulariser import LossScaleTracker, OrthogonalityRegulariser, gram_residuals, penalty_from_residuals

ADAPTABLE_TYPES = (nn.Linear, Conv1D)


class FlexLoRALayer(nn.Module):
    """``matrix_count`` (N, the number of matrices adapted together) and ``loss_scale_tracker`` are shared by the layers
    of one model (``flexlora.inject`` sets them); a layer used alone is its own model of one matrix."""

    def __init__(self, base_layer: nn.Module, config: FlexLoRAConfig, module_index: int, matrix_count: int = 1,
                 loss_scale_tracker: LossScaleTracker | None = None):
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
        self.orth_reg = config.orth_reg
        # this matrix's share of the regulariser: 1 (eq2_sum), or 1 / (2N) for the mean over 2N factors (mean_norm)
        self.orth_share = 1.0 / (2 * matrix_count) if config.orth_reg == "mean_norm" else 1.0
        self.loss_scale_tracker = loss_scale_tracker or LossScaleTracker()
        self.merged = False
        self._last_grams: tuple[torch.Tensor, torch.Tensor] | None = None  # Gram residuals of the last training forward
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

    def _penalty_share(self, gram_p: torch.Tensor, gram_q: torch.Tensor) -> torch.Tensor:
        """This matrix's term of the regulariser without its weight w (the terms of all matrices sum to the value)."""
        return penalty_from_residuals(gram_p, gram_q, self.orth_reg) * self.orth_share

    @property
    def last_orth_penalty(self) -> torch.Tensor | None:
        """This matrix's term of the regulariser (unweighted) in the last training forward (None before the first)."""
        if self._last_grams is None:
            return None
        return self._penalty_share(*self._last_grams)

    def orth_penalty(self) -> torch.Tensor:
        """This matrix's term of the regulariser (unweighted) now, differentiable."""
        return self._penalty_share(*gram_residuals(self.lora_P, self.lora_Q, self.rank_mask))

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
            delta, gram_p, gram_q = OrthogonalityRegulariser.apply(
                delta, self.lora_P, self.lora_Q, self.rank_mask, self.orth_reg_weight * self.orth_share, self.orth_reg == "eq2_sum",
                self.loss_scale_tracker.current,
            )
            self._last_grams = (gram_p.detach(), gram_q.detach())
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, capacity={self.capacity}, scaling={self.scaling:g}"
