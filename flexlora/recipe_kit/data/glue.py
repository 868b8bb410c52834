"""GLUE: the eight tasks of the paper's NLU experiments (Table 1), their data and their official metrics.

Data comes either from the original GLUE tsv files (``<data_dir>/<CoLA|SST-2|MRPC|QQP|STS-B|MNLI|QNLI|RTE>/``,
as written by the GLUE download script) or from the hub dataset ``nyu-mll/glue``; both give the same
``GlueSplit`` with labels numbered as the hub numbers them, so a model trained on one source can be scored on
the other. The metric functions are pure (numpy in, float out) and follow GLUE's definitions: Matthews
correlation for CoLA, accuracy and binary F1 (positive class 1) for MRPC and QQP, Pearson and Spearman
correlation for STS-B, accuracy elsewhere (MNLI on its matched and mismatched dev sets).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import DataError, load_hub_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    name: str  # canonical lower-case name, as the hub config names it (cola, sst2, ... stsb)
    directory: str  # folder of the original GLUE release
    text_columns: tuple[str, ...]  # tsv column names of the one or two input sentences
    label_column: str
    labels: tuple[str, ...] | None  # tsv label strings in the hub's class-id order; None: regression
    main_metric: str  # what the paper's Table 1 reports for the task (used to pick the best evaluation)
    hub_text_columns: tuple[str, ...]
    # evaluation split name -> (tsv file, hub split); MNLI has two dev sets, every other task one
    eval_splits: dict[str, tuple[str, str]] = field(default_factory=lambda: {"validation": ("dev.tsv", "validation")})
    # CoLA's tsv files have no header line; these are the names given to its columns
    headerless_columns: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("0", "1"),
            "matthews_correlation",
            ("sentence",),
            headerless_columns=("source", "label", "original_label", "sentence"),
        ),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), "accuracy", ("sentence",)),
        GlueTask(
            "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "accuracy", ("sentence1", "sentence2")
        ),
        GlueTask(
            "qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), "accuracy", ("question1", "question2")
        ),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, "pearson", ("sentence1", "sentence2")),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            ("premise", "hypothesis"),
            eval_splits={
                "matched": ("dev_matched.tsv", "validation_matched"),
                "mismatched": ("dev_mismatched.tsv", "validation_mismatched"),
            },
        ),
        GlueTask(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("entailment", "not_entailment"),
            "accuracy",
            ("question", "sentence"),
        ),
        GlueTask(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("entailment", "not_entailment"),
            "accuracy",
            ("sentence1", "sentence2"),
        ),
    )
}


def get_task(name: str) -> GlueTask:
    """Accept the GLUE spelling ("STS-B", "SST-2", "CoLA") as well as the hub's ("stsb", "sst2", "cola")."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# ---- data ------------------------------------------------------------------------------------------------
@dataclass
class GlueSplit:
    """Parallel lists: the first sentence, the second one (sentence-pair tasks only) and the label."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float]
    source: str  # where the rows came from, for messages

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int], source: str) -> "GlueSplit":
        return GlueSplit(
            [self.text_a[i] for i in indices],
            None if self.text_b is None else [self.text_b[i] for i in indices],
            [self.labels[i] for i in indices],
            source,
        )


SCORE_RANGE = {"stsb": (0.0, 5.0)}  # regression targets: STS-B similarity scores run from 0 to 5


def read_glue_tsv(path: str | Path, task: GlueTask | str) -> GlueSplit:
    """Read one original GLUE tsv file; any malformed line raises ``DataError`` naming the file and line.

    Lines are split on tabs only: GLUE's files are not CSV-quoted (MRPC and QQP sentences contain bare quote
    characters), and a quote-aware reader would merge lines. Refused: text that is not UTF-8, a line with the
    wrong number of fields, an empty (or blank) sentence, a label outside the task's labels, an STS-B score that
    is not a number in [0, 5], a file without data rows.
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    data = path.read_bytes()
    try:
        # utf-8-sig: the MRPC files start with a byte-order mark, which would otherwise become part of "Quality"
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if lines and lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file")
    first_data_line = 1
    columns = task.headerless_columns
    if columns is None:
        columns = tuple(lines[0].rstrip("\r").split("\t"))
        first_data_line = 2
        missing = [c for c in (*task.text_columns, task.label_column) if c not in columns]
        if missing:
            raise DataError(
                f"{path}:1: header {list(columns)} lacks column(s) {missing} of GLUE task {task.name}; is this the "
                f"{task.directory} file?"
            )
    text_index = [columns.index(c) for c in task.text_columns]
    label_index = columns.index(task.label_column)
    label_ids = {label: i for i, label in enumerate(task.labels)} if task.labels is not None else None

    texts: list[list[str]] = [[] for _ in text_index]
    labels: list[Any] = []
    for number, line in enumerate(lines[first_data_line - 1 :], start=first_data_line):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != len(columns):
            raise DataError(
                f"{path}:{number}: {len(fields)} tab-separated field(s), expected {len(columns)} ({', '.join(columns)})"
            )
        raw = fields[label_index]
        if label_ids is None:
            try:
                value = float(raw)
            except ValueError:
                raise DataError(f"{path}:{number}: {task.label_column} {raw!r} is not a number") from None
            if not math.isfinite(value):
                raise DataError(f"{path}:{number}: {task.label_column} {raw!r} is not finite")
            low, high = SCORE_RANGE.get(task.name, (-math.inf, math.inf))
            if not low <= value <= high:
                raise DataError(f"{path}:{number}: {task.label_column} {raw!r} is outside [{low:g}, {high:g}]")
            labels.append(value)
        else:
            if raw not in label_ids:
                raise DataError(f"{path}:{number}: label {raw!r} is not one of {list(task.labels)}")
            labels.append(label_ids[raw])
        for store, index, name in zip(texts, text_index, task.text_columns):
            if not fields[index].strip():
                raise DataError(f"{path}:{number}: empty {name}")
            store.append(fields[index])
    if not labels:
        raise DataError(f"{path}: no data rows (only a header line)")
    return GlueSplit(texts[0], texts[1] if len(texts) > 1 else None, labels, str(path))


def load_glue_local(task: GlueTask | str, data_dir: str | Path) -> dict[str, GlueSplit]:
    """``train`` plus every evaluation split whose dev file exists under ``<data_dir>/<GLUE folder>``.

    ``data_dir`` may be the folder holding all tasks or the task's own folder.
    """
    task = get_task(task) if isinstance(task, str) else task
    root = Path(data_dir)
    folder = root / task.directory if (root / task.directory).is_dir() else root
    if not (folder / "train.tsv").is_file():
        raise DataError(
            f"no train.tsv for GLUE task {task.name} in {root / task.directory} or {root}", ["data.data_dir"]
        )
    splits = {"train": read_glue_tsv(folder / "train.tsv", task)}
    for split, (filename, _) in task.eval_splits.items():
        if (folder / filename).is_file():
            splits[split] = read_glue_tsv(folder / filename, task)
    return splits


def glue_split_from_records(task: GlueTask | str, records, source: str) -> GlueSplit:
    """Convert rows of the hub dataset (a ``datasets.Dataset`` or any mapping of columns) to a ``GlueSplit``."""
    task = get_task(task) if isinstance(task, str) else task
    missing = [c for c in (*task.hub_text_columns, "label") if c not in records.column_names]
    if missing:
        raise DataError(f"{source}: column(s) {missing} missing; found {records.column_names}")
    labels = list(records["label"])
    if not task.is_regression:
        unlabelled = sum(1 for label in labels if label < 0)
        if unlabelled:  # GLUE's test splits carry label -1: they cannot be scored locally
            raise DataError(f"{source}: {unlabelled} row(s) have no label (-1); GLUE test labels are not public")
        labels = [int(label) for label in labels]
    else:
        labels = [float(label) for label in labels]
    texts = [list(records[c]) for c in task.hub_text_columns]
    return GlueSplit(texts[0], texts[1] if len(texts) > 1 else None, labels, source)


def load_glue_hub(
    task: GlueTask | str, dataset: str = "nyu-mll/glue", cache_dir: str | None = None
) -> dict[str, GlueSplit]:
    """``train`` and the evaluation split(s) of the hub dataset (downloaded once into the datasets cache)."""
    task = get_task(task) if isinstance(task, str) else task
    splits = {
        "train": glue_split_from_records(
            task,
            load_hub_dataset("data.hub_dataset", dataset, task.name, split="train", cache_dir=cache_dir),
            f"{dataset}/{task.name}/train",
        )
    }
    for split, (_, hub_split) in task.eval_splits.items():
        records = load_hub_dataset("data.hub_dataset", dataset, task.name, split=hub_split, cache_dir=cache_dir)
        splits[split] = glue_split_from_records(task, records, f"{dataset}/{task.name}/{hub_split}")
    return splits


def carve_validation(train: GlueSplit, size: int | float, seed: int) -> tuple[GlueSplit, GlueSplit]:
    """Hold out a seeded random part of ``train`` as the validation split (``size``: rows, or a fraction < 1)."""
    count = int(round(size * len(train))) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < count < len(train):
        raise DataError(
            f"validation size {size!r} leaves no rows on one side of the {len(train)} rows of {train.source}"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held, kept = sorted(order[:count]), sorted(order[count:])
    return train.select(kept, f"{train.source} (minus {count} held out)"), train.select(
        held, f"{train.source} ({count} held out)"
    )


def subsample(split: GlueSplit, limit: int | None, seed: int) -> GlueSplit:
    """At most ``limit`` rows, drawn without replacement with a seeded generator; order kept."""
    if limit is None or limit >= len(split):
        return split
    if limit < 1:
        raise ValueError(f"row limit must be >= 1, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(split)), limit))
    return split.select(chosen, f"{split.source} ({limit} of {len(split)} rows)")


class EncodedGlue:
    """A map-style dataset of tokenised rows (``input_ids``, ``attention_mask``, ... and ``labels``).

    Tokenised once up front; padding happens per batch (``transformers.DataCollatorWithPadding``), so short
    batches stay short. Rows longer than ``max_length`` tokens are truncated (the longer sentence first) and
    counted: ``truncated``, logged with the split's source.
    """

    def __init__(self, split: GlueSplit, tokenizer, max_length: int):
        args = (split.text_a,) if split.text_b is None else (split.text_a, split.text_b)
        # one token over the limit tells a truncated row from one that fits exactly; those rows are then encoded
        # again at max_length, so every row is exactly what truncation at max_length gives
        encoded = tokenizer(*args, truncation=True, max_length=max_length + 1)
        self.encoded = {key: list(values) for key, values in encoded.items()}
        long = [i for i, ids in enumerate(self.encoded["input_ids"]) if len(ids) > max_length]
        if long:
            again = tokenizer(*([column[i] for i in long] for column in args), truncation=True, max_length=max_length)
            for key, values in again.items():
                for i, value in zip(long, values):
                    self.encoded[key][i] = value
            log.info(
                "%s: %d of %d rows are longer than max_length=%d tokens and were truncated",
                split.source,
                len(long),
                len(split),
                max_length,
            )
        self.truncated = len(long)
        self.labels = split.labels
        self.keys = list(self.encoded.keys())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: self.encoded[key][index] for key in self.keys}
        item["labels"] = self.labels[index]
        return item


# ---- metrics ---------------------------------------------------------------------------------------------
def _arrays(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be 1-D and of equal length")
    if len(p) == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions, labels) -> float:
    p, y = _arrays(predictions, labels)
    return float((p == y).mean())


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    from sklearn.metrics import f1_score

    p, y = _arrays(predictions, labels)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(predictions, labels) -> float:
    """Matthews correlation coefficient (CoLA); 0 when a row or column of the confusion matrix is empty."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _arrays(predictions, labels)
    return float(matthews_corrcoef(y, p))


def pearson(predictions, labels) -> float:
    """Pearson correlation (STS-B); NaN when either side is constant (the correlation is undefined)."""
    p, y = _arrays(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if p.std() == 0 or y.std() == 0:
        return float("nan")
    from scipy.stats import pearsonr

    return float(pearsonr(p, y)[0])


def spearman(predictions, labels) -> float:
    """Spearman rank correlation (STS-B), ties given their average rank; NaN when either side is constant."""
    p, y = _arrays(predictions, labels)
    if np.all(p == p[0]) or np.all(y == y[0]):
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(p, y)[0])


def predictions_from_logits(task: GlueTask | str, logits) -> np.ndarray:
    """Class ids (argmax) for classification tasks, the scalar output for STS-B."""
    task = get_task(task) if isinstance(task, str) else task
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(len(logits), -1)[:, 0] if logits.ndim > 1 else logits
    if logits.ndim != 2 or logits.shape[1] != task.num_labels:
        raise ValueError(f"{task.name}: expected logits of shape [N, {task.num_labels}], got {logits.shape}")
    return logits.argmax(axis=1)


def majority_share(predictions) -> float:
    """The share of the most frequent predicted class: 1.0 means the classifier predicts one class only, which a
    metric such as MRPC accuracy does not show by itself."""
    predictions = np.asarray(predictions)
    return float(np.unique(predictions, return_counts=True)[1].max() / len(predictions))


def glue_metrics(task: GlueTask | str, predictions, labels) -> dict[str, float]:
    """Every metric GLUE reports for ``task``, plus ``combined_score`` where GLUE averages two of them."""
    task = get_task(task) if isinstance(task, str) else task
    if task.name == "cola":
        return {"matthews_correlation": matthews_correlation(predictions, labels)}
    if task.name == "stsb":
        scores = {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
        scores["combined_score"] = (scores["pearson"] + scores["spearman"]) / 2
        return scores
    if task.name in ("mrpc", "qqp"):
        scores = {"accuracy": accuracy(predictions, labels), "f1": f1_binary(predictions, labels)}
        scores["combined_score"] = (scores["accuracy"] + scores["f1"]) / 2
        return scores
    return {"accuracy": accuracy(predictions, labels)}
