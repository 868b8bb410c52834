"""The set-up and save sequence every recipe shares, around its own data, model and evaluation:
budget -> method -> optimizer -> ``accelerator.prepare`` -> LR schedule -> loop, and at the end the adapter, its PEFT
export, rank pattern, allocation history and heatmap."""

from __future__ import annotations

import json
import logging
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from accelerate.utils import DistributedType
from transformers import get_scheduler

from flexlora.optim_state import param_groups
from flexlora.schedule import in_allocation_window

from .loop import DataIdentity, TrainingRun, TrainLoop, batches_per_process, steps_per_epoch
from .methods import AdapterMethod, build_method
from .models import allocate_trainable_parameters
from .records import plot_rank_heatmap
from .run_config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Training:
    loop: TrainLoop
    method: AdapterMethod
    model: nn.Module  # prepared (wrapped / sharded)
    adapter_parameters: int
    total_steps: int


def refuse_unsupported_engine(config, accelerator) -> None:
    """The recipes run on one process, DDP or FSDP2; PEFT's AdaLoRA baseline and a 4-bit base not under FSDP."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "the recipes run on one process, DDP or FSDP2 (accelerate_configs/fsdp2.yaml, ddp.yaml, cpu*.yaml), "
            "not DeepSpeed, whose engine keeps the optimizer state the recipes' checkpoints save"
        )
    if config.method == "adalora" and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "method=adalora cannot run under FSDP: PEFT's AdaLoRA allocator reads whole, unsharded A/E/B tensors "
            "and gradients. Run the AdaLoRA baseline with accelerate_configs/ddp.yaml (or one process)."
        )
    if config.model.quantization != "none" and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            f"model.quantization={config.model.quantization} cannot run under FSDP2: bitsandbytes' "
            "Linear4bit keeps its quantization state beside the packed weight, where fully_shard cannot "
            "shard it (torchtune shards torchao's NF4Tensor; these recipes do not). Run one process or "
            "DDP (accelerate_configs/ddp.yaml)"
        )


def schedule_warnings(config, total_steps: int, warmup: int) -> list[str]:
    """What in the schedules runs but cannot do what it is for: an LR warm-up as long as the run, or a rank schedule
    (``adapter.delta_t`` within t_warmup .. total_steps - t_final) with at most one allocation step."""
    warnings = []
    if warmup >= total_steps:
        warnings.append(
            f"the LR warm-up ({warmup} steps, train.warmup_steps / train.warmup_ratio) is not shorter than the run "
            f"({total_steps} steps): the learning rate never reaches train.lr"
        )
    adapter = config.adapter
    if config.method != "lora" and adapter.b0 > 0:
        allocations = sum(
            in_allocation_window(step, adapter.t_warmup, adapter.t_final, total_steps, adapter.delta_t)
            for step in range(1, total_steps + 1)
        )
        if allocations <= 1:
            warnings.append(
                f"adapter.delta_t={adapter.delta_t} allows {allocations} allocation step(s) between adapter.t_warmup="
                f"{adapter.t_warmup} and {total_steps} steps - adapter.t_final={adapter.t_final}: ranks barely move; "
                "lower delta_t to let them"
            )
    return warnings


def build_training(
    config,
    accelerator,
    model: nn.Module,
    dataset,
    collator: Callable,
    data: DataIdentity,
    task_type: str | None,
    out: Path,
    num_workers: int = 0,
) -> Training:
    """Adapt ``model`` with ``config.method`` under the budget rule and make the loop that trains it.

    ``config`` has the recipe sections method, adapter, train and checkpoint; ``data`` names the training data and
    fingerprints its contents, so a checkpoint of other data is not resumed. The number of optimizer steps comes from
    the data (``train.epochs``) unless ``train.max_steps`` is set.
    """
    refuse_unsupported_engine(config, accelerator)
    train = config.train
    accumulation = train.gradient_accumulation(accelerator.num_processes)
    accelerator.gradient_accumulation_steps = accumulation
    batches = batches_per_process(len(dataset), train.micro_batch_size, accelerator.num_processes)
    per_epoch = steps_per_epoch(batches, accumulation)
    total_steps = train.max_steps or train.epochs * per_epoch
    warmup = train.warmup_for(total_steps)
    log.info(
        "%d training examples, %d micro-batches of %d per process per epoch, gradient accumulation %d -> "
        "%d optimizer steps per epoch, %d in total (%d warmup)",
        len(dataset),
        batches,
        train.micro_batch_size,
        accumulation,
        per_epoch,
        total_steps,
        warmup,
    )
    if accelerator.is_main_process:  # once, not once per process
        for warning in schedule_warnings(config, total_steps, warmup):
            log.warning(warning)

    method = build_method(config.method, model, config.adapter, total_steps, task_type=task_type)
    allocate_trainable_parameters(method.model, accelerator)  # a model built without weights (FSDP2 sharded loading)
    params = method.parameter_count()
    trained_extra = sum(p.numel() for n, p in method.model.named_parameters() if p.requires_grad and ".lora_" not in n)
    log.info(
        "method %s: %s adapter parameters allocated (+%s in trained heads), %d target matrices, total active rank %d",
        config.method,
        f"{params:,}",
        f"{trained_extra:,}",
        len(method.initial_ranks()),
        sum(method.ranks().values()),
    )
    if train.lambda_lr_multiplier != 1.0 and config.method != "flexlora":
        multiplier = train.lambda_lr_multiplier
        shown = multiplier if isinstance(multiplier, str) else f"{multiplier:g}"
        raise ConfigError(
            f"train.lambda_lr_multiplier={shown} applies to FlexLoRA's lambda only; "
            f"method={config.method} has none (leave it at 1)"
        )
    optimizer = torch.optim.AdamW(
        param_groups(method.model, train.lr, train.lambda_lr_multiplier), lr=train.lr, weight_decay=train.weight_decay
    )
    prepared, optimizer = accelerator.prepare(
        method.model, optimizer
    )  # one call: FSDP2 shards model and optimizer together
    # Stepped once per optimizer step by hand: accelerate's prepared scheduler steps once per process.
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    run = TrainingRun(method, prepared, optimizer, scheduler, dataset, collator, data, total_steps, num_workers)
    return Training(TrainLoop(config, accelerator, run, out), method, prepared, params, total_steps)


def save_outputs(training: Training, out: Path, is_main: bool, title: str) -> dict[str, int]:
    """The adapter (and its PEFT form), rank_pattern.json, allocation.jsonl and rank_heatmap.png; returns the rank
    pattern. Every process calls it (saving a sharded model is collective)."""
    method = training.method
    training.loop.check_weights_finite("final adapter")
    rank_pattern = method.save_final(out, training.model, is_main)
    if is_main:
        (out / "rank_pattern.json").write_text(json.dumps(rank_pattern, indent=2))
        method.write_history(out / "allocation.jsonl")
        plot_rank_heatmap(
            method.initial_ranks(), method.history(), training.total_steps, out / "rank_heatmap.png", title=title
        )
    return rank_pattern


def run_metrics(training: Training, train_seconds: float) -> dict:
    """What every recipe's metrics.json starts with."""
    method, loop = training.method, training.loop
    return {
        "method": loop.config.method,
        "adapter_parameters": training.adapter_parameters,
        "steps": loop.global_step,
        "skipped_steps": loop.skipped_steps,  # updates not applied under train.on_nonfinite=skip_step
        "final_loss": loop.last_loss,
        "train_seconds_this_run": round(train_seconds, 1),
        "tokens_this_run": loop.tokens_this_run,  # padding excluded, all processes; 0 for images
        "tokens_per_second_this_run": round(loop.tokens_this_run / train_seconds, 1)
        if loop.tokens_this_run and train_seconds > 0
        else None,
        "median_step_seconds_this_run": round(statistics.median(loop.step_seconds), 4) if loop.step_seconds else None,
        "total_active_rank": sum(method.ranks().values()),
        "rank_changes": len(method.history()),
        "peak_memory": peak_memory(loop.accelerator.device),
    }


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory so far: tensors on a CUDA device (``torch.cuda.max_memory_allocated``), else the
    process's peak resident set size (model loading included)."""
    if device.type == "cuda":
        return {"what": "cuda_max_memory_allocated", "mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"what": "max_rss", "mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
