"""LLM-Adapters instruction data: loading, validation, the prompt templates and tokenisation.

The format is a list of ``{"instruction", "input", "output", "answer"}`` records, as in
AGI-Edgerunners/LLM-Adapters (``ft-training_set/commonsense_170k.json`` and ``dataset/<task>/test.json``).
The two prompt templates below reproduce LLM-Adapters' text character for character, odd whitespace
included (16-space indents, trailing spaces, a whitespace-only line between sections in the training
template), because a model fine-tuned on one rendering is scored on the other.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from flexlora.config import choice_problem, raise_problems

from ..sections import minimum_problem
from . import DataError, load_hub_dataset
from .packing import packing_problem

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output", "answer")
MAX_REPORTED_ERRORS = 20
_INDENT = " " * 16  # LLM-Adapters' templates are indented f-strings; the indent is part of the prompt text


def training_prompt(row: dict[str, str]) -> str:
    """LLM-Adapters ``finetune.py`` ``generate_prompt``: the text a model is fine-tuned on (response included)."""
    if row["input"]:
        header = (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request. "
        )
        sections = [("### Instruction:", row["instruction"]), ("### Input:", row["input"])]
    else:
        header = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.  "
        )
        sections = [("### Instruction:", row["instruction"])]
    body = f"\n{_INDENT}\n".join(f"{_INDENT}{title}\n{_INDENT}{text}" for title, text in sections)
    return f"{header}\n\n{body}\n{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{row['output']}"


def evaluation_prompt(instruction: str, input: str = "") -> str:
    """LLM-Adapters ``commonsense_evaluate.py`` ``generate_prompt``: the text a model is scored on.

    It differs from the training template in whitespace only (one trailing space fewer after the header,
    empty lines between sections) and ends where the response starts.
    """
    if input:
        header = (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request."
        )
        sections = [("### Instruction:", instruction), ("### Input:", input)]
    else:
        header = (
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        )
        sections = [("### Instruction:", instruction)]
    body = "\n\n".join(f"{_INDENT}{title}\n{_INDENT}{text}" for title, text in sections)
    return f"{header}\n\n{body}\n\n{_INDENT}### Response:\n{_INDENT}"


# ---- loading and validation -----------------------------------------------------------------------------


_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can spell lone UTF-16 surrogates ("\\ud800"); no tokenizer takes them


def validate_rows(
    rows: Any, source: str, require_answer: bool = False, line_numbers: list[int] | None = None
) -> list[dict[str, str]]:
    """Check every record; raise one ``DataError`` naming each bad row by its index (the first 20 of them).

    A row needs all four fields as strings, a non-empty ``instruction`` and ``output`` (and ``answer`` when
    ``require_answer``, as scoring does). Rows are never dropped: a bad row stops the run, and so does an empty
    list. ``line_numbers`` (JSON lines files) adds each row's line to the message.
    """
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON list of records, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{source}: no rows (an empty list of records): nothing to train or score on")
    errors: list[str] = []
    clean: list[dict[str, str]] = []
    non_empty = ("instruction", "output", "answer") if require_answer else ("instruction", "output")
    for index, row in enumerate(rows):
        problem = None
        if not isinstance(row, dict):
            problem = f"expected an object, got {type(row).__name__}"
        else:
            missing = [f for f in FIELDS if f not in row]
            wrong_type = [f for f in FIELDS if f in row and not isinstance(row[f], str)]
            empty = [f for f in non_empty if f in row and isinstance(row[f], str) and not row[f].strip()]
            if missing:
                problem = f"missing field(s) {', '.join(missing)}"
            elif wrong_type:
                problem = (
                    "field(s) " + ", ".join(f"{f} ({type(row[f]).__name__})" for f in wrong_type) + " are not strings"
                )
            elif empty:
                problem = f"empty {', '.join(empty)}"
            elif any(_SURROGATE.search(row[f]) for f in FIELDS):
                bad = [f for f in FIELDS if _SURROGATE.search(row[f])]
                problem = f"field(s) {', '.join(bad)} hold an unpaired UTF-16 surrogate (a broken \\uXXXX escape)"
        if problem:
            where = f"row {index}" if line_numbers is None else f"row {index} (line {line_numbers[index]})"
            errors.append(f"{where}: {problem}")
        else:
            clean.append({f: row[f] for f in FIELDS})
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{source}: {len(errors)} malformed row(s) of {len(rows)}:\n  {shown}{more}")
    return clean


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, a byte-order mark allowed); other encodings are refused by line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None


def _read_rows(path: Path) -> tuple[Any, list[int] | None]:
    """The parsed records and, for JSON lines files, the line each record came from."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(
            f"{path}: empty file (expected a JSON list of records, or one record per line in a .jsonl file)"
        )
    if path.suffix.lower() == ".jsonl":
        rows, lines = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():  # blank lines are skipped, as JSON lines readers do
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no} is not valid JSON: {e}") from None
                lines.append(line_no)
        return rows, lines
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON: {e}{hint}") from None


def read_json_rows(path: Path) -> Any:
    """A JSON list (``.json``) or one object per line (``.jsonl``); unreadable text raises ``DataError``."""
    return _read_rows(Path(path))[0]


def _load_file(path: Path, require_answer: bool) -> list[dict[str, str]]:
    rows, lines = _read_rows(path)
    return validate_rows(rows, str(path), require_answer, line_numbers=lines)


def task_files(directory: Path, split: str) -> dict[str, Path]:
    """``<task>/<split>.json`` for every task folder that has one, in name order."""
    return {p.parent.name: p for p in sorted(directory.glob(f"*/{split}.json"))}


def load_rows(
    path: str | Path, split: str = "train", require_answer: bool = False
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Rows from a JSON/JSONL file, a directory of ``<task>/<split>.json`` files (concatenated in task-name
    order), or a Hugging Face hub dataset id. Returns the rows and how many came from each source.
    """
    local = Path(path)
    if local.is_file():
        rows = _load_file(local, require_answer)
        return rows, {local.name: len(rows)}
    if local.is_dir():
        files = task_files(local, split)
        if not files:
            raise DataError(f"{local}: no <task>/{split}.json files in this directory", ["data.path"])
        rows, counts = [], {}
        for task, file in files.items():
            task_rows = _load_file(file, require_answer)  # an empty task file is refused, naming it
            rows += task_rows
            counts[task] = len(task_rows)
        return rows, counts
    if str(path).startswith((".", "/", "~")) or str(path).endswith((".json", ".jsonl")):
        raise DataError(f"data path {path} does not exist (and does not look like a hub dataset id)", ["data.path"])
    dataset = load_hub_dataset("data.path", str(path), split=split)
    rows = validate_rows(list(dataset), f"{path} [{split}]", require_answer)
    return rows, {str(path): len(rows)}


# ---- tokenisation -----------------------------------------------------------------------------------------


def tokenize_rows(
    rows: list[dict[str, str]],
    tokenizer,
    cutoff_len: int,
    train_on_inputs: bool = True,
    add_eos_token: bool = True,
    chunk_size: int = 1024,
    progress: bool = False,
    source: str = "training data",
) -> TokenizedRows:
    """LLM-Adapters' ``generate_and_tokenize_prompt``: truncate to ``cutoff_len`` tokens, append EOS when there
    is room, labels = input ids; with ``train_on_inputs=False`` the prompt part (the template rendered with an
    empty output) is masked with -100 so only the response is learnt.

    Nothing is lost silently: the rows truncated by ``cutoff_len`` are counted, and so are those that lost their
    whole response. With ``train_on_inputs=False`` such a row has no target token left (every label -100) and
    is dropped; with ``train_on_inputs=True`` it is kept (it still trains on its prompt, as LLM-Adapters does).
    Both are logged with ``source`` (the data path); when no row keeps any of its response, ``DataError``.
    The result is a list of examples that also carries the counts (``TokenizedRows``).
    """
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer of model.path (or model.tokenizer) has no EOS token; LLM-Adapters training appends one to "
            "every example",
            ["model.tokenizer"],
        )
    if not rows:
        raise DataError(f"{source}: no rows to tokenise")
    examples = TokenizedRows()
    for start in tqdm(range(0, len(rows), chunk_size), desc="tokenising", disable=not progress):
        chunk = rows[start : start + chunk_size]
        texts = [training_prompt(r) for r in chunk]
        # one token over the cutoff tells a truncated row from one that fits exactly; those rows are then tokenised
        # again at the cutoff, so every example is exactly what truncation at cutoff_len gives
        full = list(tokenizer(texts, truncation=True, max_length=cutoff_len + 1)["input_ids"])
        long = [i for i, ids in enumerate(full) if len(ids) > cutoff_len]
        if long:
            cut = tokenizer([texts[i] for i in long], truncation=True, max_length=cutoff_len)["input_ids"]
            for i, ids in zip(long, cut):
                full[i] = ids
        # prompt lengths: for masking (every row) or to see whether a truncated row kept any of its response
        need = long if train_on_inputs else range(len(chunk))
        prompt_lengths = {}
        if need:
            prompts = tokenizer(
                [training_prompt({**chunk[i], "output": ""}) for i in need], truncation=True, max_length=cutoff_len
            )
            prompt_lengths = dict(zip(need, (len(ids) for ids in prompts["input_ids"])))
        examples.truncated += len(long)
        for i, ids in enumerate(full):
            ids = list(ids)
            if add_eos_token and ids and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
                ids.append(tokenizer.eos_token_id)
            labels = list(ids)
            if not train_on_inputs:
                masked = min(prompt_lengths[i], len(ids))
                labels[:masked] = [-100] * masked
                if masked == len(ids):  # no target token left: the loss of this row would be 0/0
                    examples.without_response += 1
                    continue
            elif i in prompt_lengths and prompt_lengths[i] >= len(ids):
                examples.without_response += 1
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if examples.without_response == len(rows):
        raise DataError(
            f"{source}: no row keeps any of its response within cutoff_len={cutoff_len} tokens: "
            f"{examples.truncated} of {len(rows)} rows truncated, {examples.without_response} with no response token "
            "left; raise data.cutoff_len"
        )
    if examples.truncated:
        log.info(
            "%s: %d of %d rows are longer than cutoff_len=%d tokens and were truncated",
            source,
            examples.truncated,
            len(rows),
            cutoff_len,
        )
    if examples.without_response and not train_on_inputs:
        log.warning(
            "%s: dropped %d of %d rows whose whole response was cut away by cutoff_len=%d (no target token left); "
            "training on the other %d",
            source,
            examples.without_response,
            len(rows),
            cutoff_len,
            len(examples),
        )
    elif examples.without_response:
        log.warning(
            "%s: %d of %d rows lost their whole response to cutoff_len=%d; kept (train_on_inputs=true trains on "
            "their prompt)",
            source,
            examples.without_response,
            len(rows),
            cutoff_len,
        )
    return examples


class TokenizedRows(list):
    """The examples ``tokenize_rows`` made (a plain list of dicts), with what truncation did on the way.

    ``truncated``: rows longer than ``cutoff_len`` (cut to it); ``without_response``: rows of which no response
    token survived (dropped when only the response is learnt, so ``len(self)`` is the rows minus those).
    """

    truncated: int = 0
    without_response: int = 0


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


MISSING_DATA_POLICIES = ("error", "synthetic")


@dataclass
class DataConfig:
    """Where the training rows come from and how they become token sequences."""

    # a json/jsonl file, a folder of <task>/<split>.json, a hub id, or "synthetic"
    path: str = "../shared/data/commonsense"
    split: str = "train"
    if_missing: str = "error"  # what to do when a local path does not exist: error, or train on generated rows
    cutoff_len: int = 256
    train_on_inputs: bool = True  # False: loss on the response tokens only
    add_eos_token: bool = True
    # padding-free micro-batches (each one sequence, rows kept apart): auto = under sdpa / flash_attention_2, where
    # that is exact, padded under other attention; true = also, but refused under other attention; false = padded
    packing: Literal[True, False, "auto"] = "auto"
    max_samples: int | None = None  # take this many rows (a seeded shuffle) instead of all; None = all
    synthetic_train_per_task: int = 2000
    synthetic_dev_per_task: int = 200
    seed: int = 42

    def __post_init__(self) -> None:
        raise_problems(
            self,
            [
                choice_problem("if_missing", self.if_missing, MISSING_DATA_POLICIES),
                minimum_problem("cutoff_len", self.cutoff_len, 8),
                minimum_problem("max_samples", self.max_samples, 1, nullable=True),
                packing_problem(self.packing),
                minimum_problem("synthetic_train_per_task", self.synthetic_train_per_task, 1),
                minimum_problem("synthetic_dev_per_task", self.synthetic_dev_per_task, 1),
            ],
        )

    def uses_synthetic(self) -> bool:
        if self.path == "synthetic":
            return True
        looks_local = self.path.startswith((".", "/", "~")) or self.path.endswith((".json", ".jsonl"))
        return looks_local and not Path(self.path).expanduser().exists() and self.if_missing == "synthetic"


def select_rows(rows: list[dict[str, str]], max_samples: int | None, seed: int) -> list[dict[str, str]]:
    """All rows, or a seeded random subset of ``max_samples`` of them (same subset on every process)."""
    if max_samples is None or max_samples >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:max_samples])]


def summarize_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n:,}" for name, n in counts.items())
