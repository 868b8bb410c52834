"""The optimizer-step loop every recipe runs: accumulation, clipping, the method's allocation step after each
optimizer step, scalars, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoints import (
    TRAINER_STATE,
    Checkpointer,
    CheckpointError,
    load_optimizer,
    rng_state,
    save_optimizer,
    set_rng_state,
)
from .methods import AdapterMethod
from .records import JsonLinesTracker, flat_config
from .run_config import TrainingStopped
from .startup import refuse_another_run, settle_output_dir

log = logging.getLogger(__name__)


def all_finite(tensors, accelerator) -> bool:
    """Whether every tensor is finite on every process (a collective: every process must call it)."""
    local = all(bool(torch.isfinite(t).all()) for t in tensors)
    return bool(
        accelerator.reduce(torch.tensor(float(local), device=accelerator.device), reduction="sum").item()
        == accelerator.num_processes
    )


def real_tokens(batch: dict) -> torch.Tensor | int:
    """Tokens a micro-batch trains on, padding excluded (0 for a batch of images). A packed micro-batch has no
    padding (its attention_mask, where it has one, is the 4-D block mask)."""
    if "input_ids" not in batch:
        return 0
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


def batches_per_process(examples: int, micro_batch_size: int, num_processes: int) -> int:
    """Micro-batches each process sees per epoch: accelerate gives every process the same count, the last ones
    filled up from the start of the epoch."""
    return math.ceil(math.ceil(examples / micro_batch_size) / num_processes)


def steps_per_epoch(batches_per_process: int, gradient_accumulation: int) -> int:
    """Optimizer steps in one pass: a last, shorter accumulation still makes a step (accelerate syncs at the end
    of a dataloader), so no example of the epoch goes unused."""
    return math.ceil(batches_per_process / gradient_accumulation)


class EpochPermutation(torch.utils.data.Sampler):
    """Each epoch's order is a permutation seeded by (seed, epoch) alone, so a resumed run sees exactly the batches
    of the uninterrupted one; ``set_epoch`` (called through accelerate's prepared loader) picks the epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True)
class DataIdentity:
    """Which training data a run trains on, as its checkpoints record it."""

    source: str  # what messages name: the file, folder or hub id the rows came from
    fingerprint: str  # of the rows' contents (checkpoints.content_fingerprint)


@dataclass
class TrainingRun:
    """What the loop trains: the method and its prepared model, optimizer and per-step LR scheduler, the data."""

    method: AdapterMethod
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: torch.utils.data.Dataset
    collator: Callable
    data: DataIdentity
    total_steps: int
    num_workers: int = 0


class TrainLoop:
    """The loop every recipe runs: gradient accumulation, clipping, the method's allocation step after each
    optimizer step, scalars (``accelerator.log``: JSON lines, TensorBoard, wandb; tqdm on the main process) and
    checkpoints that resume exactly (adapter and rank masks, optimizer, LR scheduler, RNG, position in the epoch).

    ``run_config`` is a recipe config with ``method``, ``train`` (a TrainConfig) and ``checkpoint`` sections.
    """

    def __init__(self, run_config, accelerator, run: TrainingRun, out: Path):
        self.config = run_config
        self.accelerator = accelerator
        self.run_spec = run
        self.method, self.model, self.optimizer, self.scheduler = run.method, run.model, run.optimizer, run.scheduler
        self.total_steps = run.total_steps
        self.out = Path(out)
        self.checkpointer = Checkpointer(self.out / "checkpoints", run_config.checkpoint.keep_last, accelerator)
        train = run_config.train
        # Starting a DataLoader iterator draws a worker seed from its generator, by default the global one that
        # dropout also uses; an own generator keeps a resumed run's dropout masks identical to the uninterrupted run's.
        self.loader = accelerator.prepare(
            torch.utils.data.DataLoader(
                run.dataset,
                batch_size=train.micro_batch_size,
                sampler=EpochPermutation(len(run.dataset), train.seed),
                collate_fn=run.collator,
                num_workers=run.num_workers,
                generator=torch.Generator().manual_seed(train.seed),
            )
        )
        self.global_step, self.epoch, self.batches_done, self.last_loss = 0, 0, 0, float("nan")
        self.skipped_steps = 0
        # what run() measured, for metrics.json: each optimizer step's seconds (logging, hooks and checkpoints
        # excluded) and the tokens trained on by all processes, padding excluded
        self.step_seconds: list[float] = []
        self.tokens_this_run = 0
        self._step_loss = torch.zeros((), device=accelerator.device)  # this process's mean micro-batch loss, last step

    def _run_identity(self) -> dict:
        return {
            "method": self.config.method,
            "total_steps": self.total_steps,
            "examples": len(self.run_spec.dataset),
            "data_fingerprint": self.run_spec.data.fingerprint,
        }

    def _trim_logs(self, last_step: int) -> None:
        for tracker in self.accelerator.trackers:
            if isinstance(tracker, JsonLinesTracker):
                tracker.trim(last_step)

    def resume(self) -> bool:
        """Restore the newest valid checkpoint when ``checkpoint.resume`` is on; True if one was restored. Without
        one, the run starts at step 0 and logs left by an earlier attempt that never checkpointed are cleared."""
        resume_from = self.checkpointer.latest_valid() if self.config.checkpoint.resume else None
        if resume_from is None:
            settle_output_dir(self.out, self.config, self.accelerator.is_main_process, resumed=False)
            self._trim_logs(0)
            return False
        state = self._read(resume_from / TRAINER_STATE, lambda path: json.loads(path.read_text()))
        refuse_another_run(resume_from, state, self._run_identity(), self.run_spec.data.source, self.config)
        settle_output_dir(self.out, self.config, self.accelerator.is_main_process, resumed=True)
        self._read(resume_from / "adapter", lambda path: self.method.load_checkpoint(resume_from, self.model))
        self._read(resume_from / "optimizer.pt", lambda path: load_optimizer(self.model, self.optimizer, path))
        self._read(
            resume_from / "scheduler.pt",
            lambda path: self.scheduler.load_state_dict(torch.load(path, weights_only=True)),
        )
        rng_file = resume_from / f"rng_{self.accelerator.process_index}.pt"
        self._read(rng_file, lambda path: set_rng_state(torch.load(path, weights_only=False)))
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]
        self.last_loss = state.get("loss", float("nan"))
        self.skipped_steps = state.get("skipped_steps", 0)
        log.info(
            "resumed from %s: step %d, epoch %d, %d micro-batches into it",
            resume_from,
            self.global_step,
            self.epoch,
            self.batches_done,
        )
        self._trim_logs(self.global_step)
        return True

    @staticmethod
    def _read(path: Path, load: Callable[[Path], Any]) -> Any:
        """``load(path)``, with any failure reported as a CheckpointError naming the file."""
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001 - safetensors, torch.load and json each raise their own types
            raise CheckpointError(f"cannot load checkpoint file {path}: {type(e).__name__}: {e}") from e

    def save_checkpoint(self) -> None:
        is_main = self.accelerator.is_main_process

        def write(directory: Path) -> None:
            self.method.save_checkpoint(directory, self.model, is_main)
            save_optimizer(self.model, self.optimizer, directory / "optimizer.pt", is_main)
            if is_main:
                torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            torch.save(rng_state(), directory / f"rng_{self.accelerator.process_index}.pt")

        self.check_weights_finite("checkpoint")
        trainer_state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "loss": self.last_loss,
            "skipped_steps": self.skipped_steps,
            **self._run_identity(),
            "config": flat_config(dataclasses.asdict(self.config)),
        }
        log.info("checkpoint %s", self.checkpointer.save(self.global_step, write, trainer_state))

    def check_weights_finite(self, what: str) -> None:
        """Refuse to save non-finite trained weights (collective)."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in trained]
        if not all_finite(local, self.accelerator):
            raise TrainingStopped(
                f"step {self.global_step}: trained weights contain NaN or inf; not writing the {what}"
            )

    def _update_is_finite(self, grad_norm) -> bool:
        """Whether this optimizer step's loss and gradient norm are finite on every process: one small all-reduce
        and one host sync per optimizer step, the price of never applying a NaN update."""
        checks = [self._step_loss]
        if grad_norm is not None:  # DeepSpeed clips inside its own step and returns no norm
            checks.append(torch.as_tensor(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm))
        return all_finite(checks, self.accelerator)

    def _non_finite(self, grad_norm) -> None:
        """Stop, or skip this step's update under train.on_nonfinite=skip_step (bounded)."""
        self._reduce_loss()
        norm = float(grad_norm) if grad_norm is not None else "n/a"
        what = f"step {self.global_step + 1}: non-finite loss ({self.last_loss}) or gradient norm ({norm})"
        train = self.config.train
        if train.on_nonfinite == "stop":
            raise TrainingStopped(
                f"{what}; stopped before updating the weights (lower train.lr, check the data, or "
                "train.on_nonfinite=skip_step)"
            )
        self.skipped_steps += 1
        if self.skipped_steps > train.max_skipped_steps:
            raise TrainingStopped(
                f"{what}; {self.skipped_steps} steps skipped, more than train.max_skipped_steps="
                f"{train.max_skipped_steps}"
            )
        log.warning("%s; update skipped (%d of at most %d)", what, self.skipped_steps, train.max_skipped_steps)

    def _reduce_loss(self) -> None:
        """The last step's loss, averaged over processes: a collective, so only where every process does it."""
        self.last_loss = self.accelerator.reduce(self._step_loss, reduction="mean").item()

    def _log_step(self, changes: list[dict], grad_norm) -> None:
        # (AdaLoRA's loss includes PEFT's orthogonal regulariser, which its forward adds; FlexLoRA's penalty enters
        # the gradient only and is logged on its own as orth_penalty.)
        scalars = {
            "epoch": self.epoch,
            "loss": self.last_loss,
            "lr": self.scheduler.get_last_lr()[0],
            **self.method.scalars(),
            "rank_changes": float(len(changes)),
            "skipped_steps": self.skipped_steps,
        }
        if grad_norm is not None:  # DeepSpeed clips inside its own step and returns no norm
            scalars["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.accelerator.log(scalars, step=self.global_step)

    def run(self, on_step: Callable[[int], None] | None = None) -> float:
        """Train up to ``total_steps``. ``on_step(step)`` runs after every optimizer step, before that step's
        checkpoint (evaluations go there). Returns the seconds spent training, ``on_step``'s time excluded."""
        accelerator, train = self.accelerator, self.config.train
        progress = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc=self.config.method,
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        )
        max_norm = train.max_grad_norm or math.inf
        accumulation = accelerator.gradient_accumulation_steps
        batches_per_epoch = batches_per_process(
            len(self.run_spec.dataset), train.micro_batch_size, accelerator.num_processes
        )
        started, hook_seconds = time.time(), 0.0
        step_started, tokens = started, torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.model.train()
        step_loss, step_batches = torch.zeros((), device=accelerator.device), 0
        while self.global_step < self.total_steps:
            self.loader.set_epoch(self.epoch)
            loader = (
                accelerator.skip_first_batches(self.loader, self.batches_done) if self.batches_done else self.loader
            )
            for batch in loader:
                if step_batches == 0:  # a new accumulation window: the epoch's last one may be shorter
                    window = min(accumulation, batches_per_epoch - self.batches_done)
                with accelerator.accumulate(self.model):
                    loss = self.model(**batch).loss
                    # accelerate divides every loss by gradient_accumulation_steps; times accumulation / window, the
                    # step's gradient is the mean over the micro-batches it really accumulates (the same factor on
                    # every process, which all see the same number of micro-batches)
                    accelerator.backward(loss * (accumulation / window))
                    step_loss += loss.detach()
                    tokens += real_tokens(batch)
                    step_batches += 1
                    self.batches_done += 1
                    if not accelerator.sync_gradients:
                        continue
                    if step_batches != window:
                        raise RuntimeError(
                            f"step {self.global_step + 1} accumulated {step_batches} micro-batches, expected {window} "
                            f"(epoch {self.epoch}, {batches_per_epoch} micro-batches per epoch): its gradient would "
                            "not be their mean"
                        )
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                    self._step_loss = step_loss / step_batches
                    changes = []
                    if self._update_is_finite(grad_norm):
                        self.optimizer.step()
                        # after optimizer.step, before zero_grad: sensitivity-based scores read the live gradients
                        changes = self.method.step(self.global_step + 1, self.optimizer)
                    else:
                        self._non_finite(grad_norm)
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                self.global_step += 1
                step_loss, step_batches = torch.zeros((), device=accelerator.device), 0
                self.step_seconds.append(time.time() - step_started)
                progress.update(1)
                last = self.global_step == self.total_steps
                every = self.config.checkpoint.every_n_steps
                checkpoint_due = last or (every and self.global_step % every == 0)
                log_due = self.global_step % train.log_every == 0 or last or changes
                if log_due or checkpoint_due:  # the same decision on every process
                    self._reduce_loss()
                if log_due:
                    self._log_step(changes, grad_norm)
                    progress.set_postfix(
                        loss=f"{self.last_loss:.4f}", rank=int(self.method.scalars()["active_rank_total"])
                    )
                if on_step is not None:
                    hook_started = time.time()
                    on_step(self.global_step)
                    hook_seconds += time.time() - hook_started
                # The last step is checkpointed too, so rerunning a finished run only re-saves (and re-scores) it.
                if checkpoint_due:
                    self.save_checkpoint()
                step_started = time.time()
                if self.global_step >= self.total_steps:
                    break
            else:
                self.epoch, self.batches_done = self.epoch + 1, 0
        progress.close()
        self.tokens_this_run = int(accelerator.reduce(tokens, reduction="sum").item())
        return time.time() - started - hook_seconds
