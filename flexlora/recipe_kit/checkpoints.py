"""Checkpoints: adapter, rank masks, optimizer, LR scheduler, allocator state, RNG, data position and the resolved
config, written atomically and sealed by a manifest (every file's size and sha256, written last). Resume takes the
newest checkpoint whose manifest verifies and says which newer ones it skipped and why."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: a folder without it is incomplete


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_fingerprint(rows: Iterable) -> str:
    """sha256 of JSON-serialisable rows, in order: what a checkpoint records of the training data it was trained on,
    so that a resume onto data whose contents changed (same path, same row count) is refused."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps(files, indent=1))


def manifest_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a checkpoint to resume from (None: every file is there, whole and unchanged)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{directory / MANIFEST} is unreadable: {e}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


class Checkpointer:
    """``<root>/step_<N>/`` folders, written atomically (temp folder + manifest + rename) and pruned to
    ``keep_last``."""

    def __init__(self, root: Path, keep_last: int, accelerator):
        self.root = Path(root)
        self.keep_last = keep_last
        self.accelerator = accelerator

    def folders(self) -> list[Path]:
        """Every ``step_<N>`` folder, oldest first, finished or not."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def complete(self) -> list[Path]:
        """Checkpoint folders that were finished (a manifest), oldest first; not yet verified."""
        return [p for p in self.folders() if (p / MANIFEST).is_file()]

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; each newer one that does not (a folder without a manifest
        included) is named in a warning."""
        for candidate in reversed(self.folders()):
            problem = (
                manifest_problem(candidate)
                if (candidate / MANIFEST).is_file()
                else f"it has no {MANIFEST} (an interrupted write or a partial copy)"
            )
            if problem is None:
                return candidate
            log.warning("skipping checkpoint %s: %s; falling back to an older one", candidate, problem)
        return None

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict) -> Path:
        """Every process calls this; ``write(tmp_dir)`` runs on every process (collectives allowed)."""
        final = self.root / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = self.root / f".tmp_{CHECKPOINT_PREFIX}{step:08d}"
        try:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            write(tmp)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
                write_manifest(tmp)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                for old in self.complete()[: -self.keep_last]:
                    shutil.rmtree(old)
        except (OSError, RuntimeError) as e:  # torch.save on a full disk says only "basic_ios::clear: iostream error"
            raise CheckpointError(f"could not write checkpoint {tmp} (disk full or not writable?): {e}") from e
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

    state = get_optimizer_state_dict(
        model, unwrap_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if is_main:
        torch.save(state, path)


def load_optimizer(model: nn.Module, optimizer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from flexlora.optim_state import unwrap_optimizer

    state = torch.load(path, weights_only=False)
    set_optimizer_state_dict(model, unwrap_optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))
