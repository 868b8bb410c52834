"""What a run leaves to read: JSON-lines files, and the rank-allocation heatmap (modules by layer depth x training
step, as in the paper's Figure 2)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import sys
from pathlib import Path

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker, on_main_process

from .run_config import ConfigError
from .sections import LoggingConfig

# Figure 2's letters for the matrices of a block: Q K V, A (attention output), I / O (feed-forward in / out), and
# Llama's MLP names. Longest suffix first: "attention.output.dense" must win over "output.dense".
MODULE_LABELS = [
    ("attention.output.dense", "A"),
    ("intermediate.dense", "I"),
    ("output.dense", "O"),
    ("q_proj", "Q"),
    ("query_proj", "Q"),
    ("query", "Q"),
    ("k_proj", "K"),
    ("key_proj", "K"),
    ("key", "K"),
    ("v_proj", "V"),
    ("value_proj", "V"),
    ("value", "V"),
    ("o_proj", "A"),
    ("fc1", "I"),
    ("fc2", "O"),
    ("up_proj", "Up"),
    ("down_proj", "Down"),
    ("gate_proj", "G"),
]


def short_module_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``L3.Q``, ``bert.encoder.layer.3.attention.output.dense`` -> ``L3.A``."""
    match = re.search(r"(?:layers?|h|block|blocks)\.(\d+)\.", name)
    label = next(
        (label for suffix, label in MODULE_LABELS if name == suffix or name.endswith("." + suffix)),
        name.rsplit(".", 1)[-1],
    )
    return f"L{match.group(1)}.{label}" if match else label


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per line (blank lines skipped); a bad line is named by its number."""
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is not valid JSON: {e}") from e
    return rows


class JsonLinesTracker(GeneralTracker):
    """An accelerate tracker that appends every ``accelerator.log`` call to a JSON-lines file of the run folder:
    values named ``eval/<name>`` to eval.jsonl (as ``<name>``), the others to train_log.jsonl, one row per call
    with its step. A NaN or infinite value is written as null (JSON has no NaN). The benchmarks read these files;
    a resumed run trims them to its checkpoint's step."""

    name = "jsonl"
    requires_logging_directory = False
    FILES = {"train": "train_log.jsonl", "eval": "eval.jsonl"}

    def __init__(self, directory: str | Path):
        super().__init__()
        self.directory = Path(directory)

    @property
    def tracker(self):
        return self.directory

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        rows = {
            "train": {k: v for k, v in values.items() if not k.startswith("eval/")},
            "eval": {k.removeprefix("eval/"): v for k, v in values.items() if k.startswith("eval/")},
        }
        for kind, row in rows.items():
            if row:
                finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                with open(self.directory / self.FILES[kind], "a") as f:
                    f.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")

    @on_main_process
    def trim(self, last_step: int) -> None:
        """Drop the rows of steps after ``last_step`` (a resumed run logs them again)."""
        for name in self.FILES.values():
            trim_jsonl(self.directory / name, last_step)


def build_trackers(out: Path, config: LoggingConfig) -> list[GeneralTracker]:
    """The trackers for ``Accelerator(log_with=...)``: JSON lines always, TensorBoard in <out>/tensorboard, wandb."""
    trackers: list[GeneralTracker] = [JsonLinesTracker(out)]
    if config.tensorboard:
        trackers.append(TensorBoardTracker("tensorboard", out))
    if config.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb=true but wandb is not installed (pip install wandb)", ["logging.wandb"])
        trackers.append(WandBTracker(config.wandb_project, name=config.run_name, resume="allow"))
    return trackers


def flat_config(values: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as the flat scalars trackers store as hyper-parameters (``train.lr`` ...; lists as text)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def rank_timeline(
    initial: dict[str, int], history: list[dict], total_steps: int
) -> tuple[list[str], list[int], list[list[int]]]:
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
    mesh = ax.pcolormesh(
        np.array(edges),
        np.arange(len(names) + 1),
        grid,
        cmap="Blues",
        shading="flat",
        vmin=0,
        vmax=max(1.0, float(grid.max())),
    )
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels([short_module_name(n) for n in names], fontsize=6)
    ax.invert_yaxis()  # shallow layers on top
    ax.set_xlabel("optimizer step")
    ax.set_title(title, fontsize=9)
    fig.colorbar(mesh, ax=ax, label="active rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trim_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (a resumed run writes them again)."""
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= last_step))


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
