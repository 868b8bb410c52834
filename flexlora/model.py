"""Model surgery: put FlexLoRA layers into any transformers (or plain torch) model."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .config import FlexLoRAConfig
from .errors import ModelMismatchError
from .layer import ADAPTABLE_TYPES, SUPPORTED_BASE_LAYERS, FlexLoRALayer, features, unsupported_reason
from .regulariser import LossScaleTracker


def module_targets(targets: list[str] | str) -> list[str] | str:
    """``target_modules`` as it is matched: a plain word (letters, digits, ``_``) is one module name, like a one-item
    list; any other string is a regex that must match the whole dotted name (PEFT's rule)."""
    if isinstance(targets, str) and re.fullmatch(r"\w+", targets):
        return [targets]
    return targets


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry matches the name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class ParameterCount:
    capacity: int  # adapter parameters allocated (P, lambda, Q at max_rank): the paper's "Params." column
    active: int  # adapter parameters in active directions right now
    modules_to_save: int  # extra trainable parameters (e.g. a classifier head)
    total: int  # every parameter of the model

    def __str__(self) -> str:
        return (
            f"trainable params: {self.capacity + self.modules_to_save:,} (adapter capacity {self.capacity:,}, "
            f"active {self.active:,}, modules_to_save {self.modules_to_save:,}) || all params: {self.total:,} || "
            f"trainable%: {100 * (self.capacity + self.modules_to_save) / self.total:.4f}"
        )


class Adapters:
    """Handle on the FlexLoRA layers of one model, in module order (which fixes allocation tie-breaking).

    The layers stay the same Python objects through DDP / FSDP2 wrapping, so this handle keeps working after
    ``accelerator.prepare``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: FlexLoRAConfig,
        layers: dict[str, FlexLoRALayer],
        saved: list[str],
        loss_scale_tracker: LossScaleTracker,
        requires_grad_before: list[tuple[nn.Parameter, bool]] | None = None,
    ):
        self.model = model
        self._requires_grad_before = requires_grad_before or []
        self.config = config
        self.layers = layers
        self.modules_to_save = saved
        self.loss_scale_tracker = loss_scale_tracker
        self._hooks = [
            model.register_forward_pre_hook(self._begin_forward),
            model.register_forward_hook(self._mark_output_loss),
        ]

    def _training_forward(self) -> bool:
        return self.model.training and torch.is_grad_enabled() and self.config.orth_reg_weight > 0

    def _begin_forward(self, module, args) -> None:
        if self._training_forward():
            self.loss_scale_tracker.begin_forward()

    def _mark_output_loss(self, module, args, output):
        loss = output.get("loss") if isinstance(output, dict) else None  # transformers' ModelOutput is a dict
        if self._training_forward() and isinstance(loss, torch.Tensor) and loss.requires_grad:
            output["loss"] = self.loss_scale_tracker.mark(loss)
        return output

    def mark_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` with a zero-valued anchor that tells the orthogonality regulariser how the backward scales it
        (gradient accumulation, fp16 loss scaling). Done automatically when the model's output has a ``loss``; call it
        on a loss computed outside the model, before dividing or scaling it."""
        return self.loss_scale_tracker.mark(loss)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def active_ranks(self) -> dict[str, int]:
        return {name: layer.active_rank() for name, layer in self.layers.items()}

    def total_active_rank(self) -> int:
        return sum(self.active_ranks().values())

    def parameter_count(self) -> ParameterCount:
        capacity = active = 0
        for layer in self.layers.values():
            per_direction = layer.d_out + layer.d_in + 1
            capacity += per_direction * layer.capacity
            active += per_direction * layer.active_rank()
        saved = sum(
            p.numel()
            for name, module in self.model.named_modules()
            if name in self.modules_to_save
            for p in module.parameters()
        )
        total = sum(p.numel() for p in self.model.parameters())
        return ParameterCount(capacity=capacity, active=active, modules_to_save=saved, total=total)

    def orth_penalty(self) -> float:
        """The orthogonality regulariser's value (without its weight) in the last training forward, for logging."""
        values = [layer.last_orth_penalty for layer in self.layers.values() if layer.last_orth_penalty is not None]
        return float(torch.stack(values).sum()) if values else 0.0

    @torch.no_grad()
    def merge_and_unload(self, dequantize_to: torch.dtype | None = None) -> nn.Module:
        """Fold every Delta W into its base weight and put the plain base layers back.

        A 4-bit base (bitsandbytes Linear4bit) is refused unless ``dequantize_to`` names a dtype: each such layer then
        becomes a dense nn.Linear of that dtype holding its dequantized weight + Delta W (4-bit layers that were not
        adapted stay as they are). Nothing changes when a layer is refused."""
        problems = [
            (name, problem)
            for name, layer in self.layers.items()
            for problem in [layer.merge_problem(dequantize_to)]
            if problem is not None
        ]
        if problems:
            (name, problem), more = problems[0], len(problems) - 1
            raise ValueError(f"merge_and_unload: {name}{f' (and {more} more)' if more else ''} {problem}")
        for hook in self._hooks:
            hook.remove()
        for name, layer in self.layers.items():
            layer.merge(dequantize_to)
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base_layer)
        self.layers = {}
        return self.model

    def unload(self) -> nn.Module:
        """Take the adapters out without merging them: the base layers back in place, every parameter's
        ``requires_grad`` as it was before ``inject``, the model as it was."""
        for hook in self._hooks:
            hook.remove()
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base_layer)
        for param, flag in self._requires_grad_before:
            param.requires_grad_(flag)
        self.layers = {}
        return self.model


def _shown(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def adapted_by(model: nn.Module) -> str | None:
    """What has already adapted ``model`` (PEFT or FlexLoRA), or None for a plain model."""
    if isinstance(model, (PeftModel, BaseTuner)) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return (
            f"PEFT (a {type(model).__name__} holding PEFT adapter layers): take them out first, with PEFT's "
            "merge_and_unload() (keeps a trained adapter in the weights) or unload()"
        )
    if any(isinstance(m, FlexLoRALayer) for m in model.modules()):
        return "FlexLoRA: inject once per model (Adapters.unload() takes the layers out again)"
    return None


def find_targets(
    model: nn.Module, config: FlexLoRAConfig, rank_field: str = "max_rank", flexlora_layers: bool = True
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The (name, module) pairs ``config.target_modules`` names in ``model`` and the names of its
    ``modules_to_save``, checked against the model before anything changes. ModelMismatchError when the model is
    already adapted, a target or a module to save matches nothing, or a target matrix has fewer than
    ``config.<rank_field>`` independent directions (min(d_out, d_in)), which would make a rank budget a lie. With
    ``flexlora_layers`` (FlexLoRA's own layers, not PEFT's) a target FlexLoRA cannot adapt exactly is refused too."""
    wrapped = adapted_by(model)
    if wrapped is not None:
        raise ModelMismatchError(f"this model is already adapted by {wrapped}")
    targets = module_targets(config.target_modules)
    matched = [(name, module) for name, module in model.named_modules() if name and _matches(name, targets)]
    if not matched:
        linear_names = sorted(
            {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, ADAPTABLE_TYPES)}
        )
        if isinstance(targets, str):
            last_parts = [name for name in linear_names if re.fullmatch(targets, name)]
            hint = f"; it matches only the last part of {last_parts}: give them as a list" if last_parts else ""
            raise ModelMismatchError(
                f"target_modules regex {targets!r} matched no module of {type(model).__name__} (a regex must match "
                f"the whole dotted name, e.g. '.*\\.(q_proj|v_proj)'){hint}; its linear layers are named "
                f"{[name for name in linear_names if name not in last_parts]}",
                ("target_modules",),
            )
        raise ModelMismatchError(
            f"target_modules {targets!r} matched no module of {type(model).__name__}; its linear layers are named "
            f"{linear_names}",
            ("target_modules",),
        )
    if flexlora_layers:
        wrong = [f"{name} ({reason})" for name, m in matched for reason in [unsupported_reason(m)] if reason]
        if wrong:
            raise ModelMismatchError(
                f"target_modules matched modules FlexLoRA cannot adapt exactly: {_shown(wrong)}; "
                f"it adapts {SUPPORTED_BASE_LAYERS}",
                ("target_modules",),
            )
    rank = getattr(config, rank_field)
    too_small = [
        f"{name} [d_out={d_out}, d_in={d_in}]"
        for name, m in matched
        if unsupported_reason(m) is None  # a layer PEFT adapts in its own way (an embedding) has no such bound here
        for d_out, d_in in [features(m)]
        if rank > min(d_out, d_in)
    ]
    if too_small:
        what = f"max_rank={rank} (the capacity per matrix; r={config.r})" if rank_field == "max_rank" else f"r={rank}"
        raise ModelMismatchError(
            f"{what} is larger than min(d_out, d_in) of {_shown(too_small)}: a matrix has no more than "
            "min(d_out, d_in) independent directions; lower r (and max_rank) or leave those modules out of "
            "target_modules",
            ("r", "max_rank") if rank_field == "max_rank" else ("r",),
        )
    saved = [name for name, _ in model.named_modules() if name and _matches(name, config.modules_to_save)]
    missing = [t for t in config.modules_to_save if not any(_matches(n, [t]) for n in saved)]
    if missing:
        raise ModelMismatchError(
            f"modules_to_save {missing} matched no module of {type(model).__name__}; its top-level modules are "
            f"{[name for name, _ in model.named_children()]}",
            ("modules_to_save",),
        )
    return matched, saved


def inject(model: nn.Module, config: FlexLoRAConfig) -> Adapters:
    """Replace every target module by a FlexLoRA layer, freeze everything else, return the handle. Every check
    (``find_targets``) runs before the model changes, so a refused model is left as it was.

    Call this before ``accelerator.prepare`` / FSDP / DeepSpeed: shapes are fixed from here on.
    """
    config.validate()  # again: fields may have been changed since construction (e.g. target_modules set to a bad regex)
    matched, saved = find_targets(model, config)
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    layers: dict[str, FlexLoRALayer] = {}
    tracker = LossScaleTracker()
    for index, (name, module) in enumerate(matched):
        layer = FlexLoRALayer(module, config, module_index=index, matrix_count=len(matched), loss_scale_tracker=tracker)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers[name] = layer
    for name in saved:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return Adapters(model, config, layers, saved, tracker, requires_grad)
