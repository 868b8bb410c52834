"""Saving, loading and exporting adapters.

Native format (``save_adapters`` / ``load_adapters``): every adapter tensor at capacity plus the masks, so a
reload reproduces outputs *and* the rank state. PEFT format (``export_peft``): a plain LoRA adapter with one
rank per module that ``peft.PeftModel.from_pretrained`` loads on the untouched base model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from .config import FlexLoRAConfig
from .distributed import full_tensor
from .errors import AdapterFileError, UserError
from .model import Adapters, inject
from .names import ADAPTER_TENSORS, FACTOR_TENSORS

ADAPTER_FILE = "flexlora_adapter.safetensors"
CONFIG_FILE = "flexlora_config.json"
RANK_STATE_FILE = "rank_state.json"


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU; a sharded DTensor or ZeRO-3 parameter is gathered (adapter tensors only, never base
    weights)."""
    return full_tensor(t)


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def adapter_state_dict(adapters: Adapters) -> dict[str, torch.Tensor]:
    """Every adapter tensor (and modules_to_save parameter), full-size. Collective under sharding: call on all ranks."""
    state = {}
    for name, layer in adapters.layers.items():
        for attr in ADAPTER_TENSORS:
            state[f"{name}.{attr}"] = _full(getattr(layer, attr))
    for module_name in adapters.modules_to_save:
        for param_name, param in adapters.model.get_submodule(module_name).named_parameters():
            state[f"{module_name}.{param_name}"] = _full(param)
    return state


def save_adapters(adapters: Adapters, directory: str | Path, allocator_state: dict | None = None) -> None:
    """Write the adapter, its config and the rank state. Call on every process; only the main one writes."""
    state = adapter_state_dict(adapters)
    if not _is_main_process():
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / ADAPTER_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(adapters.config.to_dict(), indent=2))
    rank_state = {"ranks": adapters.active_ranks(), "allocator": allocator_state}
    (directory / RANK_STATE_FILE).write_text(json.dumps(rank_state, indent=2))


def load_adapters(model: nn.Module, directory: str | Path) -> tuple[Adapters, dict | None]:
    """Inject FlexLoRA into ``model`` as saved in ``directory`` and load its tensors and masks.

    Returns the adapters and the saved allocator state (``RankAllocator.load_state_dict`` takes it). All or nothing:
    on any failure (a missing, unreadable or corrupt file, a non-finite tensor, an adapter made for another model)
    the model is left exactly as it was and the AdapterFileError names the file.
    """
    directory = Path(directory)
    for name in (ADAPTER_FILE, CONFIG_FILE, RANK_STATE_FILE):
        if not (directory / name).is_file():
            raise AdapterFileError(f"{directory} is not a FlexLoRA adapter directory: {name} is missing")
    config = _read(directory / CONFIG_FILE, lambda path: FlexLoRAConfig.from_dict(json.loads(path.read_text())))
    allocator_state = _read(directory / RANK_STATE_FILE, lambda path: json.loads(path.read_text())["allocator"])
    state = _read(directory / ADAPTER_FILE, load_file)
    try:
        adapters = inject(model, config)  # refuses before changing the model
    except UserError as error:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: {error}", error.fields) from None
    try:
        load_adapter_state(adapters, state)
    except AdapterFileError as error:
        adapters.unload()
        raise AdapterFileError(f"{directory / ADAPTER_FILE}: {error}", error.fields) from None
    return adapters, allocator_state


def _read(path: Path, reader):
    """``reader(path)``; a file that cannot be read or parsed is an AdapterFileError naming it."""
    try:
        return reader(path)
    except UserError as error:  # e.g. a FlexLoRAConfig the saved fields do not make
        raise AdapterFileError(f"{path}: {' '.join(str(error).split())}", error.fields) from None
    except Exception as error:  # noqa: BLE001 - json, safetensors and the file system each raise their own types
        raise AdapterFileError(f"{path}: cannot be read: {type(error).__name__}: {error}") from None


@torch.no_grad()
def load_adapter_state(adapters: Adapters, state: dict[str, torch.Tensor]) -> None:
    """Copy full-size adapter tensors into the model (each process keeps only the rows it holds). Every tensor is
    checked (names, shapes, finite values) before any is copied, so a refused state changes nothing."""
    from .distributed import local_rows

    expected = set(adapter_state_dict_keys(adapters))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    targets = {}
    for name, layer in adapters.layers.items():
        for attr in ADAPTER_TENSORS:
            targets[f"{name}.{attr}"] = getattr(layer, attr)
    for module_name in adapters.modules_to_save:
        for param_name, param in adapters.model.get_submodule(module_name).named_parameters():
            targets[f"{module_name}.{param_name}"] = param
    for key, target in targets.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise AdapterFileError(
                f"{key}: saved shape {tuple(value.shape)} does not match the model's {tuple(target.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterFileError(f"tensor {key} holds non-finite values (nan or inf); the adapter is corrupt")
    for key, target in targets.items():
        local, start, stop = local_rows(target)
        local.copy_(state[key][start:stop].to(local))


def adapter_state_dict_keys(adapters: Adapters) -> list[str]:
    keys = [f"{name}.{attr}" for name in adapters.layers for attr in ADAPTER_TENSORS]
    for module_name in adapters.modules_to_save:
        keys += [f"{module_name}.{p}" for p, _ in adapters.model.get_submodule(module_name).named_parameters()]
    return keys


def export_peft(adapters: Adapters, directory: str | Path, task_type: str | None = None) -> dict[str, int]:
    """Write a plain PEFT LoRA adapter equal to the current FlexLoRA one; returns its rank pattern.

    Per module: lora_A = Q[active], lora_B = P[:, active] * (lambda[active] * alpha / r), rank = active rank,
    alpha = rank (so PEFT's scale alpha / r is 1). Modules with no active direction are left out.
    Call on every process under sharding; only the main one writes.
    """
    state, rank_pattern, fan_in_fan_out = {}, {}, set()
    for name, layer in adapters.layers.items():
        mask = _full(layer.rank_mask) > 0
        rank = int(mask.sum())
        p, lam, q = (_full(getattr(layer, a)).float() for a in FACTOR_TENSORS)
        if rank == 0:
            continue
        rank_pattern[name] = rank
        fan_in_fan_out.add(layer.fan_in_fan_out)
        state[f"base_model.model.{name}.lora_A.weight"] = q[mask].contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = (p[:, mask] * (lam[mask] * layer.scaling)).contiguous()
    for module_name in adapters.modules_to_save:
        for param_name, param in adapters.model.get_submodule(module_name).named_parameters():
            state[f"base_model.model.{module_name}.{param_name}"] = _full(param)
    # refused on every process alike, so none is left waiting at a barrier for the one that raised
    if not rank_pattern:
        raise ValueError("every module was pruned to rank 0: there is no LoRA adapter to export")
    if len(fan_in_fan_out) > 1:
        raise ValueError("PEFT needs one fan_in_fan_out for all modules; this model mixes Linear and Conv1D targets")
    if not _is_main_process():
        return rank_pattern
    # Anchored, escaped names so that "layers.1.q_proj" cannot also match "layers.11.q_proj".
    pattern = {"^" + re.escape(name): rank for name, rank in rank_pattern.items()}
    peft_config = LoraConfig(
        r=adapters.config.r,
        lora_alpha=adapters.config.r,
        target_modules=list(rank_pattern),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=adapters.config.lora_dropout,
        fan_in_fan_out=fan_in_fan_out.pop(),
        modules_to_save=adapters.modules_to_save or None,
        task_type=task_type,
        base_model_name_or_path=getattr(getattr(adapters.model, "config", None), "_name_or_path", None) or None,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    save_file(state, directory / "adapter_model.safetensors")
    return rank_pattern
