"""Scoring a causal LM on the commonsense suite with lm-eval-harness (the library part of ``python -m eval.commonsense``).

Two protocols: ``llm-adapters`` (LLM-Adapters' generative protocol as lm-eval custom tasks over local
``<data_dir>/<task>/<split>.json`` files; what the paper's Table 2 reports) and ``lm-eval`` (lm-eval's own standard
log-likelihood tasks, data from the hub). See eval/commonsense.py for the command line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data.commonsense import evaluation_prompt, load_rows

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

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        self.tasks = [canonical_task(t) for t in self.tasks]
        if not self.tasks:
            raise ValueError("eval.tasks is empty")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit must be >= 1 or null, got {self.limit}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.batch_size and eval.max_new_tokens must be >= 1")

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
        raise ValueError(
            f"{path}: {len(bad)} row(s) have answers that {task}'s pattern {pattern.pattern!r} cannot extract: {'; '.join(bad[:10])}"
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
                    raise ValueError(
                        "the llm-adapters protocol needs a data folder of <task>/<split>.json files (eval.data_dir / --data-dir)"
                    )
                path = local_task_file(data_dir, task, config.split)
                check_local_task_file(task, path)
                spec = llm_adapters_task_config(task, path, config.max_new_tokens)
                runs.append(TaskRun(task, protocol, spec["task"], spec, f"exact_match,{FILTER_NAME}", str(path)))
            else:
                if task not in LM_EVAL_TASKS:
                    raise ValueError(f"{task} has no lm-eval standard task; use the llm-adapters protocol for it")
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


# ---- the table --------------------------------------------------------------------------------------------


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def format_table(results: dict, model_name: str, method: str, params: int | None) -> str:
    """Markdown in the layout of the paper's Table 2 (accuracy in %), one row per protocol."""
    tasks = [t for t, _ in PAPER_TASKS] + [t for t in COLUMNS if t not in dict(PAPER_TASKS)]
    present = [t for t in tasks if any(t in per_task for per_task in results.values())]
    header = ["Model", "Method", "Param."] + [COLUMNS[t] for t in present] + ["Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for protocol, per_task in results.items():
        cells, scores = [], []
        for task in present:
            if task in per_task:
                score = 100 * per_task[task]["accuracy"]
                scores.append(score)
                cells.append(f"{score:.1f}")
            else:
                cells.append("-")
        n = sorted({r["n"] for r in per_task.values()})
        label = f"{method} [{protocol}, n={n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'}]"
        avg = f"{sum(scores) / len(scores):.1f}" if scores else "-"
        lines.append("| " + " | ".join([model_name, label, human_count(params)] + cells + [avg]) + " |")
    return "\n".join(lines)


# ---- loading a saved adapter --------------------------------------------------------------------------------


def attach_adapter(model, adapter_dir: str | Path):
    """Load a FlexLoRA (native) or PEFT adapter folder onto ``model``; returns (model, method label, params).

    A training output folder (with ``adapter/`` or ``peft/`` inside) is accepted too.
    """
    from flexlora import load_adapters

    directory = Path(adapter_dir)
    if (directory / "flexlora_config.json").is_file():
        adapters, _ = load_adapters(model, directory)
        return model, f"FlexLoRA r={adapters.config.r}", adapters.parameter_count().capacity
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

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


def write_report(results: dict, table: str, path: str | Path, **info) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**info, "results": results, "table": table}, indent=2))
