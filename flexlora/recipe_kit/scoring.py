"""Scoring a causal LM on the commonsense suite with lm-eval-harness (the library of ``python -m eval.commonsense``).

Two protocols: ``llm-adapters`` (LLM-Adapters' generative protocol as lm-eval custom tasks over local
``<data_dir>/<task>/<split>.json`` files; what the paper's Table 2 reports) and ``lm-eval`` (lm-eval's own standard
log-likelihood tasks, data from the hub). The command line ``python -m eval.commonsense`` is defined in
``scoring_cli``.

With ``eval.baselines`` (``--baselines``) the table gets two more rows on the same items: the untuned base (the same
model with its adapter switched off) and a constant answer (each task's most common gold answer among the scored
items).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
from peft import PeftModel

from ..config import choice_problem, raise_problems
from ..export import load_adapters
from ..layer import FlexLoRALayer
from .data import DataError
from .data.commonsense import evaluation_prompt, load_rows
from .run_config import ConfigError
from .sections import minimum_problem

log = logging.getLogger(__name__)

# (LLM-Adapters dataset folder, the paper's Table 2 column), in the paper's column order.
PAPER_TASKS = [
    ("boolq", "BoolQ"),
    ("piqa", "PIQA"),
    ("social_i_qa", "SIQA"),
    ("hellaswag", "HellaS."),
    ("winogrande", "WinoG."),
    ("ARC-Easy", "ARC-e"),
    ("ARC-Challenge", "ARC-c"),
    ("openbookqa", "OBQA"),
]
COLUMNS = dict(PAPER_TASKS) | {"synthetic_truefalse": "Synth-TF", "synthetic_choice": "Synth-MC"}
LM_EVAL_TASKS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_iqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "openbookqa": "openbookqa",
}
# LLM-Adapters commonsense_evaluate.py extract_answer: the first match of these in the generated response.
_CHOICE = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": _CHOICE,
    "ARC-Challenge": _CHOICE,
    "ARC-Easy": _CHOICE,
    "openbookqa": _CHOICE,
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "synthetic_truefalse": r"true|false",
    "synthetic_choice": _CHOICE,
}
PROTOCOLS = ("llm-adapters", "lm-eval", "both")
FILTER_NAME = "llm_adapters"


def canonical_task(name: str) -> str:
    """Accept the LLM-Adapters folder name, the lm-eval task name or the paper's column, in any case."""
    lookup = {}
    for task in ANSWER_PATTERNS:
        lookup[task.lower()] = task
        lookup[COLUMNS[task].lower()] = task
    for task, lm_name in LM_EVAL_TASKS.items():
        lookup[lm_name] = task
    key = name.lower()
    if key not in lookup:
        raise ValueError(f"unknown commonsense task {name!r}; known: {', '.join(ANSWER_PATTERNS)}")
    return lookup[key]


@dataclass
class EvalConfig:
    enabled: bool = True
    protocol: str = "llm-adapters"  # llm-adapters | lm-eval | both
    tasks: list[str] = field(default_factory=lambda: [t for t, _ in PAPER_TASKS])
    data_dir: str | None = None  # folder of <task>/<split>.json; None: the training data folder
    split: str = "dev"  # <split>.json, or <split>.approx.json when only that exists (hellaswag here)
    limit: int | None = None  # items per task (the first ones); None: all
    batch_size: int = 8
    max_new_tokens: int = 32  # LLM-Adapters generates 32 new tokens
    baselines: bool = False  # also score the untuned base and the constant most-common answer on the same items

    def __post_init__(self) -> None:
        problems = [choice_problem("protocol", self.protocol, PROTOCOLS)]
        canonical = []
        for task in self.tasks:
            try:
                canonical.append(canonical_task(task))
            except ValueError as error:
                problems.append(f"tasks: {error}")
        self.tasks = canonical
        problems += [
            None if self.tasks or len(problems) > 1 else "tasks is empty: name the tasks to score",
            minimum_problem("limit", self.limit, 1, nullable=True),
            minimum_problem("batch_size", self.batch_size, 1),
            minimum_problem("max_new_tokens", self.max_new_tokens, 1),
        ]
        raise_problems(self, problems)

    def protocols(self) -> list[str]:
        return ["llm-adapters", "lm-eval"] if self.protocol == "both" else [self.protocol]


# ---- the LLM-Adapters protocol as lm-eval tasks ---------------------------------------------------------


def local_task_file(data_dir: str | Path, task: str, split: str) -> Path:
    folder = Path(data_dir) / task
    candidates = [folder / f"{split}.json", folder / f"{split}.approx.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {split} file for task {task}: tried {', '.join(str(c) for c in candidates)}")


def check_local_task_file(task: str, path: Path) -> int:
    """Every row well-formed and its answer one the task's regex can produce; returns the row count."""
    rows, _ = load_rows(path, require_answer=True)
    pattern = re.compile(ANSWER_PATTERNS[task])
    bad = [f"row {i}: answer {row['answer']!r}" for i, row in enumerate(rows) if not pattern.fullmatch(row["answer"])]
    if bad:
        raise DataError(
            f"{path}: {len(bad)} row(s) have answers that {task}'s pattern {pattern.pattern!r} cannot extract: "
            + "; ".join(bad[:10])
        )
    return len(rows)


def _doc_to_text(doc: dict) -> str:
    return evaluation_prompt(doc["instruction"], doc["input"])


def llm_adapters_task_config(task: str, data_file: str | Path, max_new_tokens: int = 32) -> dict:
    """An lm-eval task config (dict form) for one LLM-Adapters dataset file."""
    return {
        "task": f"llm_adapters_{task.lower().replace('-', '_')}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": _doc_to_text,
        "doc_to_target": "answer",
        # LLM-Adapters stops only at EOS or after max_new_tokens; lm-eval adds EOS to `until` itself.
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [
            {
                "name": FILTER_NAME,
                "filter": [
                    {"function": "regex", "regex_pattern": ANSWER_PATTERNS[task], "group_select": 0, "fallback": ""}
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


# ---- running lm-eval ------------------------------------------------------------------------------------


@dataclass
class TaskRun:
    task: str  # canonical (LLM-Adapters folder) name
    protocol: str
    lm_eval_name: str
    spec: str | dict
    metric_key: str
    source: str


def plan_tasks(config: EvalConfig, data_dir: str | Path | None) -> list[TaskRun]:
    runs = []
    for protocol in config.protocols():
        for task in config.tasks:
            if protocol == "llm-adapters":
                if data_dir is None:
                    raise ConfigError(
                        "the llm-adapters protocol needs a data folder of <task>/<split>.json files "
                        "(eval.data_dir / --data-dir)",
                        ["eval.data_dir"],
                    )
                path = local_task_file(data_dir, task, config.split)
                check_local_task_file(task, path)
                spec = llm_adapters_task_config(task, path, config.max_new_tokens)
                runs.append(TaskRun(task, protocol, spec["task"], spec, f"exact_match,{FILTER_NAME}", str(path)))
            else:
                if task not in LM_EVAL_TASKS:
                    raise ConfigError(
                        f"{task} has no lm-eval standard task; use the llm-adapters protocol for it", ["eval.tasks"]
                    )
                name = LM_EVAL_TASKS[task]
                runs.append(TaskRun(task, protocol, name, name, "acc,none", f"lm-eval:{name}"))
    return runs


def evaluate(model, tokenizer, config: EvalConfig, data_dir: str | Path | None) -> dict:
    """Run every planned task through lm-eval on an in-memory model; returns {protocol: {task: result}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    runs = plan_tasks(config, data_dir)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    # Indexing lm-eval's ~10k built-in task files takes ~10 s: only when a standard task is asked for.
    manager = TaskManager(include_defaults="lm-eval" in config.protocols())
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=[run.spec for run in runs],
            limit=config.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
    except Exception as e:
        if "lm-eval" in config.protocols() and ("offline" in str(e).lower() or "connect" in str(e).lower()):
            raise RuntimeError(
                f"lm-eval's standard tasks download their data from the hub, which failed ({e}); "
                "use --protocol llm-adapters with local files offline"
            ) from e
        raise
    results: dict[str, dict] = {}
    for run in runs:
        task_result = output["results"][run.lm_eval_name]
        stderr_key = run.metric_key.replace(",", "_stderr,", 1)
        stderr = task_result.get(stderr_key)
        results.setdefault(run.protocol, {})[run.task] = {
            "accuracy": float(task_result[run.metric_key]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": int(output["n-samples"][run.lm_eval_name]["effective"]),
            "lm_eval_task": run.lm_eval_name,
            "source": run.source,
        }
    return results


# ---- the baselines ----------------------------------------------------------------------------------------

BASE_ROW = "untuned base (adapter off)"
CONSTANT_ROW = "constant: most common answer"


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes as its base model: a PEFT model through its own ``disable_adapter``, a
    model with FlexLoRA layers with every direction's mask at 0 (Delta W = 0 exactly); the masks are restored after."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
        return
    layers = [module for module in model.modules() if isinstance(module, FlexLoRALayer)]
    if not layers:
        raise ValueError("the model has no FlexLoRA layers and is not a PEFT model: there is no adapter to switch off")
    if any(layer.merged for layer in layers):
        raise ValueError("an adapter merged into the base weights cannot be switched off")
    masks = [layer.rank_mask.clone() for layer in layers]
    try:
        for layer in layers:
            layer.rank_mask.zero_()
        yield
    finally:
        for layer, mask in zip(layers, masks):
            layer.rank_mask.copy_(mask)


def constant_answer_results(config: EvalConfig, data_dir: str | Path | None) -> dict:
    """What always giving each task's most common gold answer scores, under the llm-adapters protocol (lm-eval's
    standard tasks read hub data, which is not at hand; they get no constant row).

    "Most common" is counted on the scored items themselves (lm-eval's ``limit`` takes the first ones), not on the
    training data: it is the best any constant answer can score on these items, an upper bound for a constant, so a
    method at or below it on a task has learned nothing there that shows."""
    if "llm-adapters" not in config.protocols():
        return {}
    per_task = {}
    for run in plan_tasks(EvalConfig(tasks=config.tasks, split=config.split), data_dir):
        answers = [row["answer"] for row in load_rows(run.source, require_answer=True)[0][: config.limit]]
        answer, count = Counter(answers).most_common(1)[0]
        per_task[run.task] = {"accuracy": count / len(answers), "stderr": None, "n": len(answers), "answer": answer}
    return {"llm-adapters": per_task}


@dataclass
class TableRow:
    method: str  # the Method cell, before " [protocol, n=...]"
    params: int | None  # adapter parameters; None: not a model
    results: dict  # {protocol: {task: result}}, as ``evaluate`` returns


def score(model, tokenizer, config: EvalConfig, data_dir, method: str, params: int | None) -> list[TableRow]:
    """The model's row; with ``config.baselines`` also the untuned base's (unless ``params`` is None: the model is the
    base itself) and the constant answer's, on the same items."""
    rows = [TableRow(method, params, evaluate(model, tokenizer, config, data_dir))]
    if config.baselines:
        if params is not None:
            with adapter_disabled(model):
                rows.append(TableRow(BASE_ROW, 0, evaluate(model, tokenizer, config, data_dir)))
        rows.append(TableRow(CONSTANT_ROW, None, constant_answer_results(config, data_dir)))
    return rows


# ---- the table --------------------------------------------------------------------------------------------


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def format_table(rows: list[TableRow], model_name: str) -> str:
    """Markdown in the layout of the paper's Table 2 (accuracy in %), one line per row and protocol."""
    tasks = [t for t, _ in PAPER_TASKS] + [t for t in COLUMNS if t not in dict(PAPER_TASKS)]
    present = [t for t in tasks if any(t in per_task for row in rows for per_task in row.results.values())]
    header = ["Model", "Method", "Param."] + [COLUMNS[t] for t in present] + ["Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for protocol, per_task in row.results.items():
            cells, scores = [], []
            for task in present:
                if task in per_task:
                    accuracy = 100 * per_task[task]["accuracy"]
                    scores.append(accuracy)
                    cells.append(f"{accuracy:.1f}")
                else:
                    cells.append("-")
            n = sorted({r["n"] for r in per_task.values()})
            label = f"{row.method} [{protocol}, n={n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'}]"
            avg = f"{sum(scores) / len(scores):.1f}" if scores else "-"
            lines.append("| " + " | ".join([model_name, label, human_count(row.params)] + cells + [avg]) + " |")
    return "\n".join(lines)


# ---- loading a saved adapter --------------------------------------------------------------------------------


def attach_adapter(model, adapter_dir: str | Path):
    """Load a FlexLoRA (native) or PEFT adapter folder onto ``model``; returns (model, method label, params).

    A training output folder (with ``adapter/`` or ``peft/`` inside) is accepted too.
    """
    directory = Path(adapter_dir)
    if (directory / "flexlora_config.json").is_file():
        adapters, _ = load_adapters(model, directory)
        return model, f"FlexLoRA r={adapters.config.r}", adapters.parameter_count().capacity
    if (directory / "adapter_config.json").is_file():
        peft_model = PeftModel.from_pretrained(model, str(directory))
        peft_config = peft_model.peft_config["default"]
        kind = peft_config.peft_type.value
        rank = getattr(peft_config, "target_r", None) if kind == "ADALORA" else peft_config.r
        label = {"LORA": "LoRA", "ADALORA": "AdaLoRA"}.get(kind, kind) + f" r={rank}"
        params = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
        return peft_model, label, params
    for inner in ("adapter", "peft"):
        if (directory / inner).is_dir():
            return attach_adapter(model, directory / inner)
    raise FileNotFoundError(
        f"{directory} is neither a FlexLoRA adapter (flexlora_config.json) nor a PEFT adapter (adapter_config.json)"
    )


def write_report(rows: list[TableRow], table: str, path: str | Path, **info) -> None:
    """``results``: the first row's (the scored model's); ``baselines``: the other rows' by their Method cell."""
    baselines = {row.method: row.results for row in rows[1:]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    report = {**info, "results": rows[0].results, "baselines": baselines, "table": table}
    Path(path).write_text(json.dumps(report, indent=2))
