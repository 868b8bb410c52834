"""A small self-made commonsense-format dataset with a learnable rule, for running without any downloaded data:
the same answer vocabularies as BoolQ and ARC, written like the real folder so the same loaders and scorer read it."""

from __future__ import annotations

import json
import random
from pathlib import Path


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
                f"Please answer the following question with true or false, question: {question}"
                "\n\nAnswer format: true/false"
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
        rows.append(
            {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
        )
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
