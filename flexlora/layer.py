"""The FlexLoRA layer: a frozen linear map plus Delta W = P diag(lambda * mask) Q * (alpha / r).

P [d_out, R], lambda [R] and Q [R, d_in] are allocated once at capacity R = max_rank and never change
shape; ``rank_mask`` (a 0/1 buffer) says which of the R directions are active. Keeping shapes fixed is what
lets FSDP / ZeRO shard the adapter once and the allocator edit it in place.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .config import FlexLoRAConfig
from .distributed import full_shape
from .expansion import direction_seed, initial_factors
from .regulariser import LossScaleTracker, OrthogonalityRegulariser, gram_residuals, penalty_from_residuals

ADAPTABLE_TYPES = (nn.Linear, Conv1D)
DENSE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SUPPORTED_BASE_LAYERS = (
    "nn.Linear or transformers Conv1D with a float32 / bfloat16 / float16 / float64 weight, "
    "or bitsandbytes Linear4bit (nf4 / fp4)"
)


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (nf4 or fp4), whose weight is packed 4-bit storage dequantized inside its forward.
    bitsandbytes is not imported here: a model can only hold such a layer once something has imported it."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def features(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) as the module declares them (Linear's out_features / in_features, Conv1D's nf / nx), never read
    from its weight's storage, which for a packed 4-bit layer is [d_in * d_out / 2, 1] bytes."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


def unsupported_reason(module: nn.Module) -> str | None:
    """What FlexLoRA cannot adapt exactly in ``module`` (its type, and its weight's type, dtype and shape), or None.

    FlexLoRA adds Delta W to the base layer's output and merges it into the base weight, which is exact for a dense
    floating-point weight of the declared shape, and for a bitsandbytes Linear4bit (its forward dequantizes; merging
    dequantizes explicitly). Other weights (int8, float8, tensor subclasses such as torchao's NF4Tensor) are refused.
    """
    if is_bnb_4bit(module):
        return None
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if not isinstance(module, ADAPTABLE_TYPES):
        return kind
    weight = module.weight
    d_out, d_in = features(module)
    declared = (d_in, d_out) if isinstance(module, Conv1D) else (d_out, d_in)
    if (
        type(weight) not in (torch.Tensor, nn.Parameter)
        or weight.dtype not in DENSE_WEIGHT_DTYPES
        or full_shape(weight) != declared
    ):
        return f"{kind}, weight {type(weight).__name__} {weight.dtype} {list(full_shape(weight))}"
    return None


class FlexLoRALayer(nn.Module):
    """``matrix_count`` (N, the number of matrices adapted together) and ``loss_scale_tracker`` are shared by the layers
    of one model (``flexlora.inject`` sets them); a layer used alone is its own model of one matrix."""

    def __init__(
        self,
        base_layer: nn.Module,
        config: FlexLoRAConfig,
        module_index: int,
        matrix_count: int = 1,
        loss_scale_tracker: LossScaleTracker | None = None,
    ):
        super().__init__()
        reason = unsupported_reason(base_layer)
        if reason is not None:
            raise TypeError(f"FlexLoRA cannot adapt a {reason} exactly; it adapts {SUPPORTED_BASE_LAYERS}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # Conv1D stores its weight as [d_in, d_out]
        weight = base_layer.weight
        self.d_out, self.d_in = features(base_layer)
        self.capacity = config.max_rank
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
        # A base built without weights (on meta: parameter counts, the non-main processes of FSDP2's sharded loading)
        # still gets a real mask, as accelerate's init_empty_weights keeps buffers real: it is state, not a weight.
        mask = torch.zeros(self.capacity, dtype=dtype, device="cpu" if weight.is_meta else weight.device)
        mask[: config.r] = 1.0
        # Not in the model's state dict (save_adapters / load_adapters store it): accelerate's FSDP2 sharded loading
        # broadcasts every state-dict entry as a sharded parameter and keeps non-persistent buffers as they are.
        self.register_buffer("rank_mask", mask, persistent=False)
        self.factor_init = config.factor_init
        self.init_std = config.init_std
        if weight.device.type != "meta":
            p, q = initial_factors(
                self.d_out,
                self.d_in,
                self.capacity,
                config.factor_init,
                config.init_std,
                direction_seed(config.seed, -1, module_index, 0),
            )
            with torch.no_grad():
                self.lora_P.copy_(p)
                self.lora_Q.copy_(q)

    def active_rank(self) -> int:
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

    def merge_problem(self, dequantize_to: torch.dtype | None) -> str | None:
        """Why ``merge(dequantize_to)`` would refuse, or None."""
        if not is_bnb_4bit(self.base_layer):
            return None
        if dequantize_to is None:
            return (
                "has a 4-bit base (bitsandbytes Linear4bit), where Delta W cannot be added without rounding it "
                "away: pass dequantize_to=<torch dtype, e.g. torch.bfloat16> to replace it by a dense nn.Linear of "
                "that dtype"
            )
        if getattr(self.base_layer.weight.quant_state, "packing_format_for_cpu", False):
            return (
                "has a 4-bit base that bitsandbytes repacked for CPU inference (an eval-mode forward without grad "
                "on an AVX512-BF16 CPU), a layout its dequantization does not read: merge before such inference"
            )
        return None

    @torch.no_grad()
    def merge(self, dequantize_to: torch.dtype | None = None) -> None:
        """Add Delta W into the base weight. A 4-bit base is first replaced by a dense nn.Linear holding its
        dequantized weight in ``dequantize_to`` (required then; ignored for a dense base)."""
        if self.merged:
            raise RuntimeError("adapter already merged into the base weight")
        problem = self.merge_problem(dequantize_to)
        if problem is not None:
            raise ValueError(f"this FlexLoRA layer {problem}")
        if is_bnb_4bit(self.base_layer):
            self.base_layer = self._dequantized_base(dequantize_to)
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    def _dequantized_base(self, dtype: torch.dtype) -> nn.Linear:
        """The 4-bit base as a frozen dense nn.Linear: bitsandbytes' dequantization of its weight (the matrix its
        forward multiplies by), in ``dtype``."""
        import bitsandbytes as bnb

        base = self.base_layer
        dense = torch.nn.utils.skip_init(
            nn.Linear, self.d_in, self.d_out, bias=base.bias is not None, device=base.weight.device, dtype=dtype
        )
        dense.weight.copy_(bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        return dense.requires_grad_(False)

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
                delta,
                self.lora_P,
                self.lora_Q,
                self.rank_mask,
                self.orth_reg_weight * self.orth_share,
                self.orth_reg == "eq2_sum",
                self.loss_scale_tracker.current,
            )
            self._last_grams = (gram_p.detach(), gram_q.detach())
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, capacity={self.capacity}, scaling={self.scaling:g}"
