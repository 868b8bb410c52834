"""Checkpoints: adapter, rank masks, optimizer, LR scheduler, allocator state, RNG and data position, written
atomically; ``latest()`` finds the newest complete one for auto-resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


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

    from flexlora.optim_state import unwrap_optimizer

    state = get_optimizer_state_dict(model, unwrap_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        torch.save(state, path)


def load_optimizer(model: nn.Module, optimizer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from flexlora.optim_state import unwrap_optimizer

    state = torch.load(path, weights_only=False)
    set_optimizer_state_dict(model, unwrap_optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))
