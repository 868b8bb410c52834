"""LLM-Adapters instruction data: loading, validation, the prompt templates and tokenisation.

The format is a list of ``{"instruction", "input", "output", "answer"}`` records, as in
AGI-Edgerunners/LLM-Adapters (``ft-training_set/commonsense_170k.json`` and ``dataset/<task>/test.json``).
The two prompt templates below reproduce LLM-Adapters' text character for character, odd whitespace
included (16-space indents, trailing spaces, a whitespace-only line between sections in the training
template), because a model fine-tuned on one rendering is scored on the other.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..records import read_jsonl

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
        header = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
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
        header = "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        sections = [("### Instruction:", instruction)]
    body = "\n\n".join(f"{_INDENT}{title}\n{_INDENT}{text}" for title, text in sections)
    return f"{header}\n\n{body}\n\n{_INDENT}### Response:\n{_INDENT}"


# ---- loading and validation -----------------------------------------------------------------------------


def validate_rows(rows: Any, source: str, require_answer: bool = False) -> list[dict[str, str]]:
    """Check every record; raise one error naming each bad row by its index (the first 20 of them).

    A row needs all four fields as strings, a non-empty ``instruction`` and ``output`` (and ``answer`` when
    ``require_answer``, as scoring does). Rows are never dropped: a bad row stops the run.
    """
    if not isinstance(rows, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {type(rows).__name__}")
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
                problem = "field(s) " + ", ".join(f"{f} ({type(row[f]).__name__})" for f in wrong_type) + " are not strings"
            elif empty:
                problem = f"empty {', '.join(empty)}"
        if problem:
            errors.append(f"row {index}: {problem}")
        else:
            clean.append({f: row[f] for f in FIELDS})
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise ValueError(f"{source}: {len(errors)} malformed row(s) of {len(rows)}:\n  {shown}{more}")
    return clean


def read_json_rows(path: Path) -> Any:
    """A JSON list (``.json``) or one object per line (``.jsonl``)."""
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def task_files(directory: Path, split: str) -> dict[str, Path]:
    """``<task>/<split>.json`` for every task folder that has one, in name order."""
    return {p.parent.name: p for p in sorted(directory.glob(f"*/{split}.json"))}


def load_rows(path: str | Path, split: str = "train", require_answer: bool = False) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Rows from a JSON/JSONL file, a directory of ``<task>/<split>.json`` files (concatenated in task-name
    order), or a Hugging Face hub dataset id. Returns the rows and how many came from each source.
    """
    local = Path(path)
    if local.is_file():
        rows = validate_rows(read_json_rows(local), str(local), require_answer)
        return rows, {local.name: len(rows)}
    if local.is_dir():
        files = task_files(local, split)
        if not files:
            raise FileNotFoundError(f"{local}: no <task>/{split}.json files in this directory")
        rows, counts = [], {}
        for task, file in files.items():
            task_rows = validate_rows(read_json_rows(file), str(file), require_answer)
            rows += task_rows
            counts[task] = len(task_rows)
        return rows, counts
    if str(path).startswith((".", "/", "~")) or str(path).endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"data path {path} does not exist (and does not look like a hub dataset id)")
    import datasets  # only hub ids need it; local files are plain JSON

    dataset = datasets.load_dataset(str(path), split=split)
    rows = validate_rows(list(dataset), f"{path} [{split}]", require_answer)
    return rows, {str(path): len(rows)}


# ---- a small self-made dataset, for running without any downloaded data ---------------------------------


def synthetic_rows(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """Deterministic commonsense-format rows with a learnable rule (simple arithmetic comparisons).

    ``synthetic_truefalse`` asks a true/false question (answer ``true``/``false``), ``synthetic_choice`` a
    four-way multiple choice (``answer1``..``answer4``): the same answer vocabularies as BoolQ and ARC.
    """
    rng = random.Random(f"{task}:{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        if task == "synthetic_truefalse":
            truth = a > b
            question = f"is {a} greater than {b}?"
            instruction = (
                f"Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false"
            )
            answer = "true" if truth else "false"
        elif task == "synthetic_choice":
            correct = a + b
            options = {correct}
            while len(options) < 4:
                options.add(correct + rng.choice([-1, 1]) * rng.randint(1, 9))
            options = sorted(options)
            rng.shuffle(options)
            listed = " ".join(f"Answer{i + 1}: {value}" for i, value in enumerate(options))
            instruction = (
                f"Please choose the correct answer to the question: What is {a} plus {b}?\n\n{listed}\n\n"
                "Answer format: answer1/answer2/answer3/answer4"
            )
            answer = f"answer{options.index(correct) + 1}"
        else:
            raise ValueError(f"unknown synthetic task {task!r}; use synthetic_truefalse or synthetic_choice")
        rows.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    return rows


SYNTHETIC_TASKS = ("synthetic_truefalse", "synthetic_choice")


def write_synthetic_dataset(directory: str | Path, train_per_task: int, dev_per_task: int, seed: int = 0) -> Path:
    """Write ``<task>/{train,dev}.json`` like the real commonsense folder (same loaders, same scorer)."""
    directory = Path(directory)
    for task in SYNTHETIC_TASKS:
        rows = synthetic_rows(task, train_per_task + dev_per_task, seed)
        (directory / task).mkdir(parents=True, exist_ok=True)
        (directory / task / "train.json").write_text(json.dumps(rows[:train_per_task], indent=1))
        (directory / task / "dev.json").write_text(json.dumps(rows[train_per_task:], indent=1))
    return directory


# ---- tokenisation -----------------------------------------------------------------------------------------


def tokenize_rows(
    rows: list[dict[str, str]],
    tokenizer,
    cutoff_len: int,
    train_on_inputs: bool = True,
    add_eos_token: bool = True,
    chunk_size: int = 1024,
    progress: bool = False,
) -> list[dict[str, list[int]]]:
    """LLM-Adapters' ``generate_and_tokenize_prompt``: truncate to ``cutoff_len`` tokens, append EOS when there
    is room, labels = input ids; with ``train_on_inputs=False`` the prompt part (the template rendered with an
    empty output) is masked with -100 so only the response is learnt.
    """
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; LLM-Adapters training appends one to every example")
    examples = []
    for start in tqdm(range(0, len(rows), chunk_size), desc="tokenising", disable=not progress):
        chunk = rows[start : start + chunk_size]
        full = tokenizer([training_prompt(r) for r in chunk], truncation=True, max_length=cutoff_len)["input_ids"]
        prompt_lengths = None
        if not train_on_inputs:
            prompts = tokenizer([training_prompt({**r, "output": ""}) for r in chunk], truncation=True, max_length=cutoff_len)
            prompt_lengths = [len(ids) for ids in prompts["input_ids"]]
        for i, ids in enumerate(full):
            ids = list(ids)
            if add_eos_token and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
                ids.append(tokenizer.eos_token_id)
            labels = list(ids)
            if prompt_lengths is not None:
                masked = min(prompt_lengths[i], len(ids))
                labels[:masked] = [-100] * masked
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass
class DataConfig:
    """Where the training rows come from and how they become token sequences."""

    path: str = "../shared/data/commonsense"  # json/jsonl file, a folder of <task>/<split>.json, a hub id, or "synthetic"
    split: str = "train"
    if_missing: str = "error"  # error | synthetic: what to do when a local path does not exist
    cutoff_len: int = 256
    train_on_inputs: bool = True  # False: loss on the response tokens only
    add_eos_token: bool = True
    max_samples: int | None = None  # take this many rows (a seeded shuffle) instead of all; None = all
    synthetic_train_per_task: int = 2000
    synthetic_dev_per_task: int = 200
    seed: int = 42

    def __post_init__(self) -> None:
        errors = []
        if self.if_missing not in ("error", "synthetic"):
            errors.append(f"data.if_missing must be 'error' or 'synthetic', got {self.if_missing!r}")
        if self.cutoff_len < 8:
            errors.append(f"data.cutoff_len must be >= 8, got {self.cutoff_len}")
        if self.max_samples is not None and self.max_samples < 1:
            errors.append(f"data.max_samples must be >= 1 or null, got {self.max_samples}")
        if errors:
            raise ValueError("; ".join(errors))

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
