"""Fine-tuning a classifier (GLUE on an encoder, VTAB on a ViT): train with evaluations, keep the best and final
scores. Batches are dicts of tensors with ``labels``."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from flexlora.config import raise_problems

from .loop import DataIdentity
from .records import read_jsonl, trim_jsonl
from .sections import CheckpointConfig, LoggingConfig, check_run_sections, minimum_problem
from .train_setup import build_training, run_metrics, save_outputs

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    every_n_steps: int = 0  # evaluate every N optimizer steps; 0: only after the last step (which always happens)
    batch_size: int = 64  # per process

    def __post_init__(self) -> None:
        raise_problems(
            self,
            [
                minimum_problem("every_n_steps", self.every_n_steps, 0),
                minimum_problem("batch_size", self.batch_size, 1),
            ],
        )


@dataclass
class ClassifierRunSections:
    """The sections a classifier recipe's config has besides method, output_dir, model, data, adapter and train
    (which the recipe's own config class adds after these)."""

    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check_sections(self, task: str) -> None:
        """The checks every classifier config shares, reported at once; ``task`` fills ``{task}`` in output_dir."""
        check_run_sections(
            self,
            None
            if self.adapter.modules_to_save
            else "adapter.modules_to_save is empty: the new classifier head must be trained (e.g. [classifier])",
            task=task,
        )


@torch.no_grad()
def predict(
    model: nn.Module, dataset, collator, batch_size: int, accelerator, desc: str, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) over the whole dataset, gathered from every process without padding duplicates."""
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=collator,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
        )  # leaves the global RNG alone (see epoch_loader)
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
    """The evaluation row with the highest ``key`` (NaN, written as null, counts as worst; the earliest wins ties)."""
    scored = [r for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return max(scored, key=lambda r: r[key]) if scored else None


def train_and_evaluate(
    config,
    accelerator,
    model: nn.Module,
    task_type: str | None,
    train_dataset,
    train_data: DataIdentity,
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
    ``train_data`` names ``train_dataset``'s source and fingerprints its contents (what checkpoints record).
    ``score(logits, labels)`` gives the metrics of one evaluation split; ``main_metric`` ("<split>/<metric>")
    picks the best evaluation; ``describe`` (task, model ...) heads metrics.json; ``num_workers`` feeds the loaders.
    """
    is_main = accelerator.is_main_process
    out = Path(config.output_dir)
    training = build_training(
        config, accelerator, model, train_dataset, collator, train_data, task_type, out, num_workers
    )
    loop, total_steps = training.loop, training.total_steps
    if loop.resume() and is_main and loop.global_step == total_steps:  # a finished run is scored again below
        trim_jsonl(out / "eval.jsonl", loop.global_step - 1)
    eval_seconds = 0.0

    def evaluate(step: int) -> dict[str, float]:
        nonlocal eval_seconds
        started_eval = time.time()
        row: dict[str, float] = {}
        for split, dataset in eval_datasets.items():
            logits, labels = predict(
                training.model, dataset, collator, config.eval.batch_size, accelerator, f"eval {split}", num_workers
            )
            row.update({f"{split}/{k}": v for k, v in score(logits, labels).items()})
        eval_seconds += time.time() - started_eval
        accelerator.log({f"eval/{k}": v for k, v in row.items()}, step=step)  # eval.jsonl, TensorBoard, wandb
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

    save_outputs(training, out, is_main, title)
    head = sum(p.numel() for n, p in training.method.model.named_parameters() if p.requires_grad and ".lora_" not in n)
    metrics = {
        **describe,
        **run_metrics(training, train_seconds),
        "head_parameters": head,
        "eval_seconds_this_run": round(eval_seconds, 1),
        "main_metric": main_metric,
        "final": final_row,
    }
    if is_main:
        metrics["best"] = best_evaluation(read_jsonl(out / "eval.jsonl"), main_metric)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return metrics
