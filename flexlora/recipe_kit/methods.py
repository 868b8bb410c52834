"""FlexLoRA (``flexlora.inject`` + ``RankAllocator``), LoRA and AdaLoRA (the real PEFT library, with
``update_and_allocate`` called at every optimizer step), built under one budget rule and driven by the same loop
through one small interface (``AdapterMethod``)."""

from __future__ import annotations

import abc
import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from flexlora.allocator import RankAllocator
from flexlora.config import FlexLoRAConfig, InvalidConfigError
from flexlora.export import export_peft, load_adapter_state, save_adapters
from flexlora.model import Adapters, find_targets, inject, module_targets
from flexlora.names import METHODS

from .run_config import ConfigError


class AdapterMethod(abc.ABC):
    """The few things a training loop needs from an adaptation method."""

    name: str
    model: nn.Module  # the model to hand to accelerator.prepare

    @abc.abstractmethod
    def step(self, global_step: int, optimizer) -> list[dict]:
        """Call after optimizer.step(), before zero_grad(); returns the rank changes made (allocation rows)."""
        ...

    @abc.abstractmethod
    def ranks(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def initial_ranks(self) -> dict[str, int]: ...

    def scalars(self) -> dict[str, float]:
        return {"active_rank_total": float(sum(self.ranks().values()))}

    @abc.abstractmethod
    def parameter_count(self) -> int:
        """Adapter parameters allocated (the paper's "Params." column)."""
        ...

    @abc.abstractmethod
    def history(self) -> list[dict]: ...

    def write_history(self, path: Path) -> None:
        with open(path, "w") as f:
            for row in self.history():
                f.write(json.dumps(row) + "\n")

    @abc.abstractmethod
    def save_checkpoint(self, directory: Path, model: nn.Module, is_main: bool) -> None: ...

    @abc.abstractmethod
    def load_checkpoint(self, directory: Path, model: nn.Module) -> None: ...

    @abc.abstractmethod
    def save_final(self, output_dir: Path, model: nn.Module, is_main: bool) -> dict[str, int]:
        """Write the adapter (and its PEFT form); returns the rank pattern."""
        ...


class FlexLoRAMethod(AdapterMethod):
    name = "flexlora"

    def __init__(self, model: nn.Module, config: FlexLoRAConfig, task_type: str | None):
        self.config = config
        self.task_type = task_type
        self.adapters: Adapters = inject(model, config)
        self.allocator = RankAllocator(self.adapters)
        self.model = model
        self._initial = self.adapters.active_ranks()

    def step(self, global_step, optimizer):
        return [dataclasses.asdict(c) for c in self.allocator.step(global_step, optimizer)]

    def ranks(self):
        return self.adapters.active_ranks()

    def initial_ranks(self):
        return dict(self._initial)

    def scalars(self):
        return {
            "active_rank_total": float(self.adapters.total_active_rank()),
            "orth_penalty": self.adapters.orth_penalty(),
        }

    def parameter_count(self):
        return self.adapters.parameter_count().capacity

    def history(self):
        return [dataclasses.asdict(c) for c in self.allocator.history]

    def write_history(self, path):
        self.allocator.write_history(path)

    def save_checkpoint(self, directory, model, is_main):
        save_adapters(self.adapters, directory / "adapter", self.allocator.state_dict())

    def load_checkpoint(self, directory, model):
        from safetensors.torch import load_file

        from flexlora.export import ADAPTER_FILE, RANK_STATE_FILE

        load_adapter_state(self.adapters, load_file(directory / "adapter" / ADAPTER_FILE))
        self.allocator.load_state_dict(json.loads((directory / "adapter" / RANK_STATE_FILE).read_text())["allocator"])

    def save_final(self, output_dir, model, is_main):
        save_adapters(self.adapters, output_dir / "adapter", self.allocator.state_dict())
        return export_peft(self.adapters, output_dir / "peft", task_type=self.task_type)


_WRAPPER_PARTS = {"module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def _unwrapped_name(name: str) -> str:
    """A parameter name without the path segments DDP / FSDP / activation checkpointing / compile insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _peft_module_name(param_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default`` -> ``model.layers.0.self_attn.q_proj``; also
    AdaLoRA's rank_pattern keys, ``<module>.lora_E`` (no adapter name once PEFT has saved the adapter)."""
    name = re.sub(r"^base_model\.model\.", "", param_name)
    return re.sub(r"\.lora_[A-Za-z]+(\.[^.]+)?(\.weight)?$", "", name)


class PeftMethod(AdapterMethod):
    """LoRA or AdaLoRA through the real PEFT library (``get_peft_model``). The model is checked against the config
    first, as FlexLoRA's ``inject`` checks it (``find_targets``): targets and modules to save that match nothing,
    a rank (``config.<rank_field>``) larger than a target matrix allows, a model already adapted."""

    def __init__(self, model: nn.Module, peft_config, name: str, config: FlexLoRAConfig, rank_field: str):
        from peft import get_peft_model

        find_targets(model, config, rank_field, flexlora_layers=False)
        self.name = name
        self.peft_config = peft_config
        self.model = get_peft_model(model, peft_config)
        self._rows: list[dict] = []

    def _lora_modules(self) -> dict[str, int]:
        """Module name -> allocated rank (rows of lora_A)."""
        found = {}
        for param_name, param in self.model.named_parameters():
            if ".lora_A." in param_name:
                found[_peft_module_name(param_name)] = int(param.shape[0])
        return found

    def ranks(self):
        return self._lora_modules()

    def initial_ranks(self):
        return self._lora_modules()

    def parameter_count(self):
        return sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" in n)

    def step(self, global_step, optimizer):
        return []

    def history(self):
        return list(self._rows)

    def _trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) adapter tensors and trained heads (PEFT's ``modules_to_save`` copies), keyed like
        ``PeftModel.state_dict()``; collective under FSDP. Persistent buffers, which the state dict also holds,
        are left out."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(model, options=options)
        return {k: v for k, v in state.items() if ".lora_" in k or ".modules_to_save." in k}

    def save_checkpoint(self, directory, model, is_main):
        from safetensors.torch import save_file

        state = self._trainable_state(model)
        if is_main:
            (directory / "adapter").mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, directory / "adapter" / "trainable.safetensors")
            (directory / "adapter" / "history.json").write_text(json.dumps(self._rows))

    def load_checkpoint(self, directory, model):
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = load_file(directory / "adapter" / "trainable.safetensors")
        trainable = {_unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad}
        incompatible = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        missing = sorted(trainable & set(incompatible.missing_keys))
        if missing or incompatible.unexpected_keys:
            raise KeyError(
                f"checkpoint {directory} does not fit this model: missing {missing[:5]}, "
                f"unexpected {incompatible.unexpected_keys[:5]}"
            )
        self._rows = json.loads((directory / "adapter" / "history.json").read_text())

    def save_final(self, output_dir, model, is_main):
        state = self._trainable_state(model)
        if is_main:
            self.model.save_pretrained(str(output_dir / "peft"), state_dict=state)
        return self.ranks()


def _common_peft_fields(config: FlexLoRAConfig, task_type: str | None) -> dict:
    """What LoRA and AdaLoRA take from the FlexLoRA config as it is: alpha, dropout, targets, trained heads."""
    return {
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": module_targets(config.target_modules),  # a plain word is one module name, not a regex
        "modules_to_save": config.modules_to_save or None,
        "task_type": task_type,
    }


class LoRAMethod(PeftMethod):
    def __init__(self, model: nn.Module, config: FlexLoRAConfig, task_type: str | None):
        from peft import LoraConfig

        super().__init__(model, LoraConfig(r=config.r, **_common_peft_fields(config, task_type)), "lora", config, "r")


class AdaLoRAMethod(PeftMethod):
    """PEFT's AdaLoRA at FlexLoRA's budget: ``init_r`` = FlexLoRA's capacity ``max_rank`` (the same A, E, B
    parameters per matrix as FlexLoRA's P, lambda, Q) and ``target_r`` = ``r`` (the same total active rank at the
    end). Its schedule takes FlexLoRA's: tinit = t_warmup, tfinal = t_final, deltaT = delta_t, total_step = total_steps
    (set by ``scheduled``).
    """

    def __init__(self, model: nn.Module, config: FlexLoRAConfig, task_type: str | None):
        from peft import AdaLoraConfig

        peft_config = AdaLoraConfig(
            init_r=config.max_rank,
            target_r=config.r,
            tinit=config.t_warmup,
            tfinal=config.t_final,
            deltaT=config.delta_t,
            total_step=config.total_steps,
            beta1=config.sensitivity_beta1,
            beta2=config.sensitivity_beta2,
            orth_reg_weight=config.orth_reg_weight,
            **_common_peft_fields(config, task_type),
        )
        super().__init__(model, peft_config, "adalora", config, "max_rank")
        if task_type is None:
            # A PeftModel without a task type calls the base model directly, which skips AdaLoraModel.forward and with
            # it AdaLoRA's orthogonal regulariser (peft 0.21): route the forward through the tuner instead.
            self.model.forward = self.model.base_model.forward
        self._current = self.initial_ranks()

    def _tuner(self):
        return self.model.base_model  # the AdaLoraModel: owns update_and_allocate and the RankAllocator

    def ranks(self):
        pattern = self._tuner().peft_config["default"].rank_pattern
        if not pattern:
            return self.initial_ranks()
        return {_peft_module_name(k): int(sum(bool(v) for v in mask)) for k, mask in pattern.items()}

    def step(self, global_step, optimizer):
        self._tuner().update_and_allocate(global_step)
        ranks = self.ranks()
        budget = sum(ranks.values())
        changes = []
        for module, after in ranks.items():
            before = self._current[module]
            if after != before:
                action = "prune" if after < before else "expand"
                changes.append(
                    {
                        "step": global_step,
                        "module": module,
                        "action": action,
                        "rank_before": before,
                        "rank_after": after,
                        "budget": budget,
                    }
                )
        self._current = ranks
        self._rows += changes
        return changes

    def save_checkpoint(self, directory, model, is_main):
        super().save_checkpoint(directory, model, is_main)
        if is_main:
            allocator = self._tuner().rankallocator
            torch.save(
                {
                    "ipt": allocator.ipt,
                    "exp_avg_ipt": allocator.exp_avg_ipt,
                    "exp_avg_unc": allocator.exp_avg_unc,
                    "rank_pattern": self._tuner().peft_config["default"].rank_pattern,
                },
                directory / "adapter" / "adalora_state.pt",
            )

    def load_checkpoint(self, directory, model):
        super().load_checkpoint(directory, model)
        state = torch.load(directory / "adapter" / "adalora_state.pt", weights_only=True)
        allocator = self._tuner().rankallocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            state["ipt"],
            state["exp_avg_ipt"],
            state["exp_avg_unc"],
        )
        self._tuner().peft_config["default"].rank_pattern = state["rank_pattern"]
        self._current = self.ranks()


def scheduled(method: str, config: FlexLoRAConfig, total_steps: int) -> FlexLoRAConfig:
    """``config`` for a run of ``total_steps`` optimizer steps, its rank schedule checked against them (a config
    error otherwise). LoRA has no rank schedule, so a short LoRA run is not refused over the t_final of the yaml
    it shares with FlexLoRA."""
    if method == "lora":
        return config
    config = config.replace(total_steps=total_steps)  # FlexLoRA's own checks first: they name the field at fault
    if method == "adalora" and config.t_warmup >= total_steps - config.t_final:  # FlexLoRA allows it with b0=0
        raise InvalidConfigError(
            [
                f"t_warmup ({config.t_warmup}) must be below total_steps - t_final ({total_steps} - "
                f"{config.t_final}) for AdaLoRA, which prunes from t_warmup to total_steps - t_final: lower "
                "t_warmup or t_final, or train longer"
            ]
        )
    return config


def build_method(
    method: str,
    model: nn.Module,
    config: FlexLoRAConfig,
    total_steps: int,
    task_type: str | None = "CAUSAL_LM",
) -> AdapterMethod:
    """Adapt ``model`` with one method under the paper's budget rule (call before ``accelerator.prepare``).

    * lora: rank ``r`` in every target matrix.
    * flexlora: capacity ``max_rank`` (default ceil(1.5 r)) per matrix, ``r`` active at a time; the total
      active rank stays N x r while directions move between matrices.
    * adalora: ``init_r = max_rank``, ``target_r = r``: the same allocated parameters as FlexLoRA, pruned by
      PEFT's own schedule to the same total active rank.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}", ["method"])
    config = scheduled(method, config, total_steps)
    if method == "flexlora":
        return FlexLoRAMethod(model, config, task_type)
    if method == "lora":
        return LoRAMethod(model, config, task_type)
    return AdaLoRAMethod(model, config, task_type)
