"""Equal-budget quality: FlexLoRA against PEFT LoRA and AdaLoRA, on runs that converge, with seeds.

    python -m bench.quality --cpu --plan    # the runs and their estimated time, nothing run
    python -m bench.quality --cpu           # 2 CPU cores, ~6.5 h estimated; resumable -> bench/results/quality_cpu.{md,json}
    python -m bench.quality --cpu --report  # rewrite the report from the stored run results, nothing run
    python -m bench.quality --smoke         # a minute; what tests/test_bench_smoke.py runs
    python -m bench.quality --full --dry-run   # the paper's settings (DeBERTaV3-base, LLaMA3-8B): recipe commands for GPUs

How a profile measures (``--cpu``: all-MiniLM-L6-v2 on the full GLUE STS-B, CoLA and MRPC train sets):
1. lr sweep: every method at each multiple of the task config's lr on ``sweep_task``, one seed, scored on the
   validation split; each method's best multiple is then used for that method on every task (no other tuning).
2. methods table: the rows below on every task, each at its method's best lr, over seeds; mean +- sample std.
3. convergence: every run is scored every ``eval.every_n_steps``; the curves are kept, and a task counts as converged
   when LoRA's last two scores differ by < 0.5 point in every seed; a task where every method predicts one class
   (``majority_share`` = 1) is flagged, since it ranks nothing.
4. verdicts: FlexLoRA's default row against LoRA r=8, LoRA at equal capacity and AdaLoRA: better / worse only beyond the
   larger seed std, else within noise.
5. allocation statistics per run: rank moves, final rank per matrix kind, and how many expanded directions were pruned
   again at the very next allocation step (a new direction starts at lambda = 0, lowering its matrix's entropy).
6. commonsense: SmolLM2-135M-Instruct at the quickstart's scale, each method over seeds, ``eval.limit`` items per task.

Every run is one recipe run (recipes/deberta_glue.py, recipes/llama3_cr.py: the code users run) in a fresh process,
``--jobs`` at a time with ``--threads`` torch threads each; its bulky outputs go to ``--work-dir/<run id>/`` and its
small result file to ``<out>/quality_<profile>_runs/<run id>.json``, which is committed. A run whose result file exists
with the same recipe arguments is not run again, so an interrupted sweep continues where it stopped, also from a fresh
clone; runs that depend on an unfinished lr sweep are planned once it finishes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.common import load_averages, markdown_table, provenance
from flexlora.training import read_jsonl, short_module_name

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"glue": ROOT / "recipes" / "deberta_glue.py", "cr": ROOT / "recipes" / "llama3_cr.py"}
METHODS = ("lora", "adalora", "flexlora")
GLUE_METRICS = {  # main metric first; the recipe's metrics.json names them "<split>/<metric>"
    "cola": ("CoLA", ["matthews_correlation"]),
    "mrpc": ("MRPC", ["accuracy", "f1"]),
    "rte": ("RTE", ["accuracy"]),
    "stsb": ("STS-B", ["pearson", "spearman"]),
}
CR_TASKS = [("boolq", "BoolQ"), ("piqa", "PIQA"), ("social_i_qa", "SIQA"), ("hellaswag", "HellaS."),
            ("winogrande", "WinoG."), ("ARC-Easy", "ARC-e"), ("ARC-Challenge", "ARC-c"), ("openbookqa", "OBQA")]
CONVERGED_POINTS = 0.5  # LoRA's last two validation scores within this many points (x 100)


@dataclass(frozen=True)
class Row:
    """One line of a table: a method with fixed overrides, at the lr its ``lr_of`` method's sweep chose."""

    label: str
    method: str
    seeds: tuple[int, ...]
    overrides: tuple[tuple[str, str], ...] = ()
    lr_of: str = ""  # whose sweep picks the lr (default: the row's own method)

    @property
    def lr_method(self) -> str:
        return self.lr_of or self.method


@dataclass(frozen=True)
class Profile:
    glue_config: str  # a recipe config per task ({task} is filled in)
    glue_tasks: dict[str, dict]  # task -> overrides for that task (length, evaluation interval, allocation schedule)
    glue_common: dict  # overrides for every GLUE run
    sweep_task: str
    lr_multiples: tuple[float, ...]  # of each task config's train.lr
    rows: tuple[Row, ...]  # the methods table; the first FlexLoRA row is FlexLoRA's default, the verdicts' subject
    ablations: tuple[Row, ...]  # FlexLoRA switches, on ablation_tasks
    ablation_tasks: tuple[str, ...]
    cr_config: str
    cr_overrides: dict
    cr_seeds: tuple[int, ...]
    seconds_per_step: dict[str, float]  # measured here, for the plan's time estimate (task or "cr" -> s per step)
    jobs: int
    threads: int
    note: str


def _schedule(steps: int, every: int) -> dict:
    """A run of ``steps`` optimizer steps scored every ``every``, with allocation in Table 8's proportions
    (T_warmup = T_final = 20 %, Delta_T = 4 % of the steps)."""
    return {"train.max_steps": steps, "eval.every_n_steps": every,
            "adapter.t_warmup": round(0.2 * steps), "adapter.t_final": round(0.2 * steps), "adapter.delta_t": max(1, round(0.04 * steps))}


def _main_rows(seeds: tuple[int, ...], single: tuple[int, ...]) -> tuple[Row, ...]:
    return (
        Row("FlexLoRA r=8 (cap 12), mean_norm", "flexlora", seeds),
        Row("FlexLoRA r=8 (cap 12), eq2_sum", "flexlora", seeds, (("adapter.orth_reg", "eq2_sum"),)),
        Row("LoRA r=8", "lora", seeds),
        Row("AdaLoRA 12->8", "adalora", seeds),
        Row("LoRA r=12 (equal capacity)", "lora", single, (("adapter.r", "12"),)),
        Row("FlexLoRA, allocation frozen", "flexlora", single, (("adapter.b0", "0"),)),
    )


_ABLATIONS = tuple(
    Row(f"{key.split('.')[1]}={value}", "flexlora", (0,), ((key, value),))
    for key, values in (("adapter.importance", ("nuclear", "frobenius", "sensitivity", "elem", "mat")),
                        ("adapter.mode", ("prune_only", "expand_only")),
                        ("adapter.expand_init", ("small", "zero", "orthogonal")))
    for value in values
)

PROFILES = {
    # Seconds per run: a few steps of MiniLM on 32 rows; commonsense uses --set-cr model.path=<tiny model> in the test.
    "smoke": Profile(
        glue_config="recipes/configs/glue/minilm_{task}.yaml",
        glue_tasks={"stsb": _schedule(4, 2)},
        glue_common={"data.max_train_samples": 32, "data.max_eval_samples": 32, "train.batch_size": 8,
                     "train.micro_batch_size": 8, "logging.tensorboard": "false", "checkpoint.every_n_steps": 0},
        sweep_task="stsb", lr_multiples=(1.0, 2.0),
        rows=_main_rows((0,), (0,)), ablations=_ABLATIONS[:1], ablation_tasks=("stsb",),
        cr_config="recipes/configs/quickstart.yaml",
        cr_overrides={"train.max_steps": 3, "adapter.t_warmup": 1, "adapter.t_final": 1, "adapter.delta_t": 1,
                      "data.max_samples": 12, "train.warmup_steps": 1, "eval.limit": 1, "eval.max_new_tokens": 4,
                      "checkpoint.every_n_steps": 0, "logging.tensorboard": "false"},
        cr_seeds=(0,), seconds_per_step={"stsb": 0.1, "cr": 0.1}, jobs=1, threads=1,
        note="structure check only: a few steps on 32 rows; the numbers mean nothing",
    ),
    # Full train sets, Table 8's batch 32, lr and max length per task, 2-3 epochs (linear decay to 0). STS-B's
    # validation split is 10 % carved from train (seed 0, the same for every run); CoLA and MRPC use their dev sets.
    "cpu": Profile(
        glue_config="recipes/configs/glue/minilm_{task}.yaml",
        glue_tasks={
            "stsb": _schedule(324, 54),  # 5,174 rows: 2 epochs
            "cola": _schedule(540, 90),  # 8,551 rows: 2 epochs
            "mrpc": {**_schedule(348, 58), "train.batch_size": 32, "train.micro_batch_size": 32},  # 3,668 rows: 3 epochs
        },
        glue_common={"data.max_train_samples": "null", "data.max_eval_samples": "null", "checkpoint.every_n_steps": 0},
        sweep_task="stsb", lr_multiples=(0.5, 1.0, 2.0),
        rows=_main_rows((0, 1, 2), (0,)), ablations=(), ablation_tasks=(),
        cr_config="recipes/configs/quickstart.yaml",
        cr_overrides={"eval.limit": 50, "checkpoint.every_n_steps": 0},
        cr_seeds=(0, 1),
        seconds_per_step={"stsb": 2.9, "cola": 1.8, "mrpc": 1.7, "cr": 3.0},
        jobs=2, threads=1,
        note="all-MiniLM-L6-v2 on the full STS-B / CoLA / MRPC train sets for 2-3 epochs, and SmolLM2-135M-Instruct on "
             "commonsense at the quickstart's scale (240 steps, 50 dev items per task): a CPU stand-in for the paper's "
             "DeBERTaV3 / LLaMA3-8B runs",
    ),
    # The paper's settings: Table 8 configs (DeBERTaV3-base, full epochs), Table 9 (LLaMA3-8B); 5 seeds on GLUE.
    "full": Profile(
        glue_config="recipes/configs/glue/{task}.yaml",
        glue_tasks={"cola": {}, "mrpc": {}, "rte": {}, "stsb": {}},
        glue_common={},
        sweep_task="stsb", lr_multiples=(0.5, 1.0, 2.0),
        rows=_main_rows((0, 1, 2, 3, 4), (0, 1, 2)), ablations=_ABLATIONS, ablation_tasks=("cola", "mrpc", "rte", "stsb"),
        cr_config="recipes/configs/llama3_8b_cr_r8.yaml", cr_overrides={}, cr_seeds=(0,),
        seconds_per_step={}, jobs=1, threads=0,
        note="the paper's settings (Tables 8 and 9)",
    ),
}


@dataclass(frozen=True)
class Run:
    id: str
    kind: str  # glue | cr
    task: str  # GLUE task, or "commonsense"
    method: str
    seed: int
    lr_multiple: float
    args: tuple[str, ...]  # the recipe's arguments, output_dir excepted (what identifies a finished run)
    steps: int = 0  # for the time estimate (0: unknown)


def config_values(config: str) -> dict:
    return yaml.safe_load((ROOT / config).read_text())


def _slug(overrides: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"-{key.split('.')[-1]}{value}" for key, value in overrides)


def glue_run(profile: Profile, task: str, method: str, seed: int, multiple: float, overrides=()) -> Run:
    config = profile.glue_config.format(task=task)
    lr = multiple * float(config_values(config)["train"]["lr"])
    values = {**profile.glue_common, **profile.glue_tasks[task], "method": method, "train.lr": f"{lr:.4g}",
              "train.seed": seed, "adapter.seed": seed, **dict(overrides)}
    run_id = f"glue-{task}-{method}{_slug(overrides)}-lr{multiple:g}x-s{seed}"
    args = ("--config", config, *(f"{key}={value}" for key, value in values.items()))
    return Run(run_id, "glue", task, method, seed, multiple, args, int(values.get("train.max_steps", 0)))


def cr_run(profile: Profile, method: str, seed: int) -> Run:
    values = {**profile.cr_overrides, "method": method, "train.seed": seed, "adapter.seed": seed}
    args = ("--config", profile.cr_config, *(f"{key}={value}" for key, value in values.items()))
    steps = int(values.get("train.max_steps", config_values(profile.cr_config)["train"].get("max_steps") or 0))
    return Run(f"cr-{method}-s{seed}", "cr", "commonsense", method, seed, 1.0, args, steps)


def sweep_runs(profile: Profile) -> dict[str, list[Run]]:
    return {method: [glue_run(profile, profile.sweep_task, method, 0, m) for m in profile.lr_multiples] for method in METHODS}


def best_multiples(profile: Profile, results: dict[str, dict]) -> dict[str, float]:
    """Each method's lr multiple with the best validation score on the sweep task (methods whose sweep has not
    finished are left out)."""
    metric = GLUE_METRICS[profile.sweep_task][1][0]
    best = {}
    for method, runs in sweep_runs(profile).items():
        if all(results.get(run.id, {}).get("status") == "ok" for run in runs):
            best[method] = max(runs, key=lambda run: _score(results[run.id], metric)).lr_multiple
    return best


def _score(result: dict, metric: str) -> float:
    value = result["scores"].get(metric, float("nan"))
    return -math.inf if math.isnan(value) else value


def plan(profile: Profile, results: dict[str, dict]) -> tuple[list[Run], dict, list[str]]:
    """(every run that can be planned now, table -> cell -> run ids, rows still waiting for an lr sweep).

    Runs with the same settings are one run, whichever tables read it (e.g. the sweep's seed-0 run at the best lr
    is seed 0 of the methods table)."""
    runs: dict[str, Run] = {}
    tables: dict[str, dict] = {"sweep": {}, "methods": {}, "ablations": {}, "commonsense": {}}
    for method, sweep in sweep_runs(profile).items():
        for run in sweep:
            runs.setdefault(run.id, run)
            tables["sweep"][(method, run.lr_multiple)] = [run.id]
    best = best_multiples(profile, results)
    waiting = []
    for table, rows, tasks in (("methods", profile.rows, list(profile.glue_tasks)), ("ablations", profile.ablations, profile.ablation_tasks)):
        for row in rows:
            if row.lr_method not in best:
                waiting.append(row.label)
                continue
            for task in tasks:
                cell = []
                for seed in row.seeds:
                    run = glue_run(profile, task, row.method, seed, best[row.lr_method], row.overrides)
                    runs.setdefault(run.id, run)
                    cell.append(run.id)
                tables[table][(row.label, task)] = cell
    for method in METHODS:
        cell = []
        for seed in profile.cr_seeds:
            run = cr_run(profile, method, seed)
            runs.setdefault(run.id, run)
            cell.append(run.id)
        tables["commonsense"][method] = cell
    return list(runs.values()), tables, waiting


def estimate_seconds(profile: Profile, run: Run) -> float:
    per_step = profile.seconds_per_step.get("cr" if run.kind == "cr" else run.task, 0.0)
    return per_step * run.steps * 1.15  # evaluations and model loading: ~15 %


def full_plan_size(profile: Profile) -> tuple[int, float]:
    """(runs, job-seconds) of the whole sweep, assuming each sweep picks the config's lr (the real count can be smaller
    where a sweep run doubles as a methods-table run)."""
    fake = {run.id: {"status": "ok", "scores": {}} for runs in sweep_runs(profile).values() for run in runs}
    runs, _, _ = plan(profile, fake)
    return len(runs), sum(estimate_seconds(profile, run) for run in runs)


# ---- running -------------------------------------------------------------------------------------------
def _recipe_main(kind: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_quality_{kind}_recipe", RECIPES[kind])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their string annotations through sys.modules
    spec.loader.exec_module(module)
    return module.main


def allocation_statistics(out: Path) -> dict:
    """Rank moves, final rank per matrix kind and expansions pruned again at the next allocation step."""
    history = read_jsonl(out / "allocation.jsonl") if (out / "allocation.jsonl").exists() else []
    steps = sorted({row["step"] for row in history})
    following = dict(zip(steps, steps[1:]))
    pruned_at = {(row["module"], row["step"]) for row in history if row["action"] == "prune"}
    expansions = [row for row in history if row["action"] == "expand"]
    repruned = sum((row["module"], following.get(row["step"])) in pruned_at for row in expansions)
    by_kind: dict[str, list[int]] = {}
    for module, rank in json.loads((out / "rank_pattern.json").read_text()).items():
        by_kind.setdefault(short_module_name(module).split(".", 1)[-1], []).append(rank)
    return {"rank_moves": len(history), "expansions": len(expansions), "expansions_pruned_next": repruned,
            "final_rank_by_kind": {kind: statistics.fmean(ranks) for kind, ranks in by_kind.items()}}


def summarise(run: Run, out: Path) -> dict:
    """What the tables need, from the recipe's outputs (fractions, as the recipe writes them)."""
    metrics = json.loads((out / "metrics.json").read_text())
    summary = {"adapter_parameters": metrics["adapter_parameters"], "total_active_rank": metrics["total_active_rank"],
               "train_seconds": metrics["train_seconds_this_run"], **allocation_statistics(out)}
    if run.kind == "glue":
        split = metrics["main_metric"].split("/")[0]
        names = GLUE_METRICS[run.task][1] + ["majority_share"]
        summary["scores"] = {name: metrics["final"][f"{split}/{name}"] for name in names if f"{split}/{name}" in metrics["final"]}
        main = metrics["main_metric"]
        summary["curve"] = [[row["step"], row[main]] for row in read_jsonl(out / "eval.jsonl")]
    else:
        results = metrics.get("eval", {}).get("llm-adapters")
        if not results:
            raise RuntimeError(f"{out / 'metrics.json'} has no llm-adapters evaluation (eval.enabled must stay true)")
        summary["scores"] = {task: results[task]["accuracy"] for task, _ in CR_TASKS if task in results}
        summary["items_per_task"] = {task: results[task].get("n") for task, _ in CR_TASKS if task in results}
    return summary


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git"


def execute(run: Run, out: Path, threads: int) -> dict:
    """Run one recipe in this (fresh) process, its output in <out>/run.log; never raises."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    saved = os.dup(1), os.dup(2)
    with open(out / "run.log", "w") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            _recipe_main(run.kind)([*run.args, f"output_dir={out}"])
            result = {"status": "ok", **summarise(run, out)}
        except BaseException as error:  # noqa: BLE001 - the sweep records the failure and goes on
            traceback.print_exc()
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:500], "log": str(out / "run.log")}
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return {"id": run.id, "args": list(run.args), **result, "seconds": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit()}


def load_results(runs_dir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(runs_dir.glob("*.json"))} if runs_dir.is_dir() else {}


def is_done(run: Run, results: dict[str, dict]) -> bool:
    stored = results.get(run.id)
    return stored is not None and stored.get("status") == "ok" and stored.get("args") == list(run.args)


def run_all(profile: Profile, runs_dir: Path, work_dir: Path, jobs: int, threads: int) -> dict[str, dict]:
    """Run every pending run, ``jobs`` at a time, planning again after each one (an lr sweep that finishes releases the
    runs that use its choice); each finished run's result file is written at once."""
    from tqdm.auto import tqdm

    results = load_results(runs_dir)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the fresh processes
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "accelerate", "flexlora.training"])
    in_flight: dict[concurrent.futures.Future, Run] = {}
    failed: set[str] = set()
    bar = tqdm(desc="quality runs", unit="run")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        while True:
            runs, _, _ = plan(profile, results)
            busy = {run.id for run in in_flight.values()}
            pending = [run for run in runs if not is_done(run, results) and run.id not in busy and run.id not in failed]
            # lr sweeps first (they release the rest), then the longest runs, so the last minutes are not one job
            sweeps = {run.id for sweep in sweep_runs(profile).values() for run in sweep}
            pending.sort(key=lambda run: (run.id not in sweeps, -estimate_seconds(profile, run)))
            bar.total = len([run for run in runs if is_done(run, results)]) + len(busy) + len(pending)
            bar.refresh()
            while pending and len(in_flight) < jobs:
                run = pending.pop(0)
                in_flight[pool.submit(execute, run, work_dir / run.id, threads)] = run
            if not in_flight:
                break
            done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                run = in_flight.pop(future)
                result = future.result()
                if result["status"] == "ok":
                    results[run.id] = result
                    runs_dir.mkdir(parents=True, exist_ok=True)
                    (runs_dir / f"{run.id}.json").write_text(json.dumps(result, indent=1) + "\n")
                else:
                    failed.add(run.id)
                    results[run.id] = result
                bar.update()
                bar.write(f"{run.id}: {result['status']} in {result['seconds']:.0f} s"
                          + (f" -- {result['error']} (log: {result['log']})" if result["status"] != "ok" else ""))
    bar.close()
    return results


# ---- reporting -----------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float]) -> str:
    """x100, mean +- sample std over seeds ('-' when no run finished)."""
    if not values:
        return "-"
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def ok(results: dict[str, dict], run_ids: list[str]) -> list[dict]:
    return [results[i] for i in run_ids if results.get(i, {}).get("status") == "ok"]


def scores(results: dict[str, dict], run_ids: list[str], metric: str) -> list[float]:
    return [r["scores"][metric] for r in ok(results, run_ids) if metric in r["scores"]]


def verdict(flex: list[float], other: list[float]) -> str:
    """Whether FlexLoRA's mean is above the other's by more than the larger seed std (else: within noise)."""
    if not flex or not other:
        return "not measured"
    (f_mean, f_std), (o_mean, o_std) = mean_std(flex), mean_std(other)
    diff = 100 * (f_mean - o_mean)
    if f_std is None and o_std is None:
        return f"{'**better**' if diff > 0 else '**worse**' if diff < 0 else 'equal'} ({diff:+.1f}, one seed)"
    noise = 100 * max(s for s in (f_std, o_std) if s is not None)
    if abs(diff) <= noise:
        return f"within noise ({diff:+.1f}, std {noise:.1f})"
    return f"{'**better**' if diff > 0 else '**worse**'} ({diff:+.1f}, std {noise:.1f})"


def sweep_table(profile: Profile, results, tables) -> str:
    metric = GLUE_METRICS[profile.sweep_task][1][0]
    best = best_multiples(profile, results)
    base = float(config_values(profile.glue_config.format(task=profile.sweep_task))["train"]["lr"])
    header = ["method"] + [f"lr x {m:g} ({m * base:.2g})" for m in profile.lr_multiples] + ["chosen"]
    rows = [[method] + [cell(scores(results, tables["sweep"][(method, m)], metric)) for m in profile.lr_multiples]
            + [f"x {best[method]:g}" + (" (grid edge)" if best[method] in (min(profile.lr_multiples), max(profile.lr_multiples)) else "")
               if method in best else "sweep not finished"] for method in METHODS]
    return markdown_table(header, rows)


def methods_table(profile: Profile, results, cells, rows: tuple[Row, ...], tasks) -> str:
    header = ["row", "seeds", "adapter params"]
    for task in tasks:
        name, metrics = GLUE_METRICS[task]
        header += [f"{name} {m}" for m in metrics]
    header.append("avg (main metrics)")
    body = []
    for row in rows:
        if (row.label, tasks[0]) not in cells:
            continue
        ids = [i for task in tasks for i in cells[(row.label, task)]]
        done = ok(results, ids)
        line = [row.label, len(ok(results, cells[(row.label, tasks[0])])),
                f"{statistics.fmean(r['adapter_parameters'] for r in done):,.0f}" if done else "-"]
        means = []
        for task in tasks:
            for k, metric in enumerate(GLUE_METRICS[task][1]):
                values = scores(results, cells[(row.label, task)], metric)
                line.append(cell(values))
                if k == 0 and values:
                    means.append(100 * statistics.fmean(values))
        line.append(f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else "-")
        body.append(line)
    return markdown_table(header, body)


def convergence_table(profile: Profile, results, cells) -> tuple[str, dict[str, bool]]:
    """Per task: LoRA r=8's last-two-score gap per seed, the largest gap of any row, and whether every run of every
    method predicted one class. Returns the table and task -> converged."""
    lora = next(row for row in profile.rows if row.method == "lora" and not row.overrides)
    converged, body = {}, []
    for task in profile.glue_tasks:
        if (lora.label, task) not in cells:
            continue

        def gaps(ids):
            return [abs(r["curve"][-1][1] - r["curve"][-2][1]) * 100 for r in ok(results, ids) if len(r["curve"]) >= 2]

        lora_gaps = gaps(cells[(lora.label, task)])
        every = [r for row in profile.rows if (row.label, task) in cells for r in ok(results, cells[(row.label, task)])]
        all_gaps = gaps([r["id"] for r in every])
        one_class = bool(every) and all(r["scores"].get("majority_share", 0.0) >= 1.0 for r in every)
        converged[task] = bool(lora_gaps) and len(lora_gaps) == len(lora.seeds) and max(lora_gaps) < CONVERGED_POINTS
        body.append([GLUE_METRICS[task][0], ", ".join(f"{g:.2f}" for g in lora_gaps) or "-",
                     f"{max(all_gaps):.2f}" if all_gaps else "-",
                     "yes" if converged[task] else "no", "**yes: ranks nothing**" if one_class else "no"])
    header = ["task", "LoRA r=8: last-two gap per seed (points)", "largest gap, any run", f"converged (< {CONVERGED_POINTS})",
              "every run predicts one class"]
    return markdown_table(header, body), converged


def verdict_table(profile: Profile, results, cells, converged: dict[str, bool]) -> str:
    flex = profile.rows[0]
    others = [row for row in profile.rows[1:] if row.method in ("lora", "adalora")]
    body = []
    tasks = [task for task in profile.glue_tasks if (flex.label, task) in cells]
    for task in tasks:
        metric = GLUE_METRICS[task][1][0]
        mine = scores(results, cells[(flex.label, task)], metric)
        body.append([f"{GLUE_METRICS[task][0]} {metric}" + ("" if converged.get(task) else " (not converged)")]
                    + [verdict(mine, scores(results, cells[(row.label, task)], metric)) if (row.label, task) in cells
                       else "not measured" for row in others])

    def averages(label):  # per seed, the mean over tasks of the main metric
        per_seed = []
        for position in range(len(flex.seeds)):
            values = []
            for task in tasks:
                ids = cells.get((label, task), [])
                done = ok(results, ids[position:position + 1])
                if done:
                    values.append(done[0]["scores"][GLUE_METRICS[task][1][0]])
            if len(values) == len(tasks):
                per_seed.append(statistics.fmean(values))
        return per_seed

    if tasks:
        body.append(["GLUE average"] + [verdict(averages(flex.label), averages(row.label)) for row in others])
    return markdown_table(["task", *[f"{flex.label.split(',')[0]} vs {row.label}" for row in others]], body)


def allocation_table(results, cells, rows: tuple[Row, ...]) -> str:
    body, kinds = [], []
    for (label, task), ids in cells.items():
        row = next(r for r in rows if r.label == label)
        done = ok(results, ids)
        if row.method == "lora" or not done:
            continue
        by_kind: dict[str, list[float]] = {}
        for r in done:
            for kind, rank in r["final_rank_by_kind"].items():
                by_kind.setdefault(kind, []).append(rank)
        kinds += [k for k in by_kind if k not in kinds]
        expansions = sum(r["expansions"] for r in done)
        body.append((GLUE_METRICS[task][0], label, len(done), statistics.fmean(r["rank_moves"] for r in done),
                     f"{sum(r['expansions_pruned_next'] for r in done)} / {expansions}" if row.method == "flexlora" else "-", by_kind))
    header = ["task", "row", "runs", "rank moves per run", "expansions pruned at the next step"] + kinds
    return markdown_table(header, [[t, label, n, f"{moves:.0f}", again] + [f"{statistics.fmean(k[kind]):.2f}" if kind in k else "-" for kind in kinds]
                                   for t, label, n, moves, again, k in body])


def commonsense_table(results, cells) -> str:
    header = ["method", "seeds", "items per task"] + [short for _, short in CR_TASKS] + ["avg"]
    body = []
    for method in METHODS:
        done = ok(results, cells[method])
        items = sorted({n for r in done for n in r.get("items_per_task", {}).values() if n})
        averages = [statistics.fmean(r["scores"].values()) for r in done if r["scores"]]
        body.append([method, len(done), ", ".join(map(str, items)) or "-"]
                    + [cell(scores(results, cells[method], task)) for task, _ in CR_TASKS] + [cell(averages)])
    averages = {m: [statistics.fmean(r["scores"].values()) for r in ok(results, cells[m]) if r["scores"]] for m in METHODS}
    verdicts = markdown_table(["", "FlexLoRA vs LoRA", "FlexLoRA vs AdaLoRA"],
                              [["commonsense avg", verdict(averages["flexlora"], averages["lora"]),
                                verdict(averages["flexlora"], averages["adalora"])]])
    return markdown_table(header, body) + "\n\n" + verdicts


def curves_section(results, runs: list[Run]) -> str:
    lines = [f"- `{run.id}`: " + " ".join(f"{step}:{100 * value:.1f}" for step, value in results[run.id]["curve"])
             for run in runs if results.get(run.id, {}).get("status") == "ok" and results[run.id].get("curve")]
    return "\n".join(lines) or "(none yet)"


def report(profile_name: str, profile: Profile, command: str, results: dict[str, dict], wall_s: float,
           loads: tuple[str, str], jobs: int, threads: int) -> str:
    runs, tables, waiting = plan(profile, results)
    done = [run for run in runs if is_done(run, results)]
    planned, estimate = full_plan_size(profile)
    finished_times = sorted(results[run.id]["finished"] for run in done)
    parts = [
        f"# Quality at equal budget: FlexLoRA vs PEFT LoRA / AdaLoRA (`--{profile_name}`)",
        f"Profile: {profile.note}. Every cell is mean ± sample std over seeds, x 100. Same budget: r = 8 on every target "
        "matrix (LoRA rank 8; FlexLoRA capacity 12 with 8 active; AdaLoRA init_r 12 -> target_r 8), same steps, "
        "schedule and data; the lr is each method's best multiple of the task config's lr on the "
        f"{GLUE_METRICS[profile.sweep_task][0]} sweep (validation split, seed 0).",
        provenance(command, "cpu", wall_s, loads),
        f"Runs: {len(done)} of {planned} finished ({estimate / 3600:.1f} h of run time estimated for all of them, "
        f"{estimate / 3600 / max(jobs, 1):.1f} h of wall time at {jobs} at a time); "
        f"{sum(results[run.id]['seconds'] for run in done) / 3600:.1f} h of run time summed over the finished runs"
        + (f", finished between {finished_times[0]} and {finished_times[-1]}" if finished_times else "")
        + f"; runs {jobs} at a time, {threads or 'the default number of'} torch thread(s) each."
        + (f" Waiting for an lr sweep: {', '.join(waiting)}." if waiting else ""),
        f"## lr sweep ({GLUE_METRICS[profile.sweep_task][0]} {GLUE_METRICS[profile.sweep_task][1][0]}, validation split, seed 0)",
        sweep_table(profile, results, tables),
    ]
    failed = [r for r in results.values() if r.get("status") == "failed"]
    if failed:
        parts.append("**Failed runs:**\n\n" + "\n".join(f"- `{r['id']}`: {r['error']} (log {r['log']})" for r in failed))
    tasks = [task for task in profile.glue_tasks]
    convergence, converged = convergence_table(profile, results, tables["methods"])
    parts += ["## GLUE: methods at equal budget (Table 1 layout)", methods_table(profile, results, tables["methods"], profile.rows, tasks),
              "## Did the runs converge?", "Each run is scored every `eval.every_n_steps` and after its last step; a "
              f"task counts as converged when LoRA r=8's last two scores differ by < {CONVERGED_POINTS} point in every "
              "seed.", convergence,
              "## Did FlexLoRA win?", "Better / worse only when the difference of means exceeds the larger seed std of "
              "the two; with one seed on both sides there is no std and any difference counts.",
              verdict_table(profile, results, tables["methods"], converged)]
    if profile.ablations:
        parts += ["## FlexLoRA switches (importance metric, prune / expand, expansion init; paper Tables 4-6)",
                  methods_table(profile, results, {**tables["methods"], **tables["ablations"]}, (profile.rows[0], *profile.ablations),
                                list(profile.ablation_tasks))]
    parts += ["## Allocation: rank moves, re-pruned expansions, final rank per matrix kind (mean over layers and runs; "
              "FlexLoRA starts every matrix at 8 active directions, AdaLoRA at 12)",
              allocation_table(results, {**tables["methods"], **tables["ablations"]}, (*profile.rows, *profile.ablations)),
              "## Commonsense reasoning (Table 2 layout, LLM-Adapters protocol, accuracy)", commonsense_table(results, tables["commonsense"]),
              "## Validation curves (step:score x 100, every run)", curves_section(results, runs)]
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group(required=True)
    for name in PROFILES:
        profile.add_argument(f"--{name}", dest="profile", action="store_const", const=name)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--plan", action="store_true", help="print the runs and the estimated time, run nothing")
    action.add_argument("--dry-run", action="store_true", help="print the recipe command of every run plannable now")
    action.add_argument("--report", action="store_true", help="rewrite the report from the stored results, run nothing")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the profile's)")
    parser.add_argument("--threads", type=int, help="torch threads per run; 0: torch's default (default: the profile's)")
    parser.add_argument("--set-glue", action="append", default=[], metavar="KEY=VALUE", help="extra override for every GLUE run")
    parser.add_argument("--set-cr", action="append", default=[], metavar="KEY=VALUE", help="extra override for every commonsense run")
    parser.add_argument("--work-dir", type=Path, help="recipe outputs (default: outputs/bench-quality/<profile>)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where quality_<profile>.md/.json and the run results quality_<profile>_runs/ go")
    return parser.parse_args(argv)


def with_extra_overrides(profile: Profile, set_glue: list[str], set_cr: list[str]) -> Profile:
    for override in set_glue + set_cr:
        if "=" not in override:
            raise SystemExit(f"--set-glue/--set-cr take KEY=VALUE, got {override!r}")
    from dataclasses import replace

    return replace(profile, glue_common={**profile.glue_common, **dict(o.split("=", 1) for o in set_glue)},
                   cr_overrides={**profile.cr_overrides, **dict(o.split("=", 1) for o in set_cr)})


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = with_extra_overrides(PROFILES[args.profile], args.set_glue, args.set_cr)
    jobs = args.jobs or profile.jobs
    threads = profile.threads if args.threads is None else args.threads
    work_dir = (args.work_dir or ROOT / "outputs" / "bench-quality" / args.profile).resolve()
    runs_dir = args.out / f"quality_{args.profile}_runs"
    results = load_results(runs_dir)
    runs, _, waiting = plan(profile, results)
    planned, estimate = full_plan_size(profile)
    remaining = [run for run in runs if not is_done(run, results)]
    print(f"{planned} runs in all, {len(runs) - len(remaining)} finished, {len(remaining)} to run now"
          + (f" and more once the lr sweep has chosen ({', '.join(waiting)})" if waiting else "")
          + f"; estimated {estimate / 3600:.1f} h of run time for all, {estimate / 3600 / jobs:.1f} h of wall time at {jobs} at a time",
          flush=True)
    if args.plan or args.dry_run:
        for run in remaining:
            line = f"accelerate launch {RECIPES[run.kind].relative_to(ROOT)} " + " ".join(run.args) if args.dry_run else \
                f"{run.id}: ~{estimate_seconds(profile, run) / 60:.0f} min"
            print(line)
        return 0
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    loads = [load_averages()]
    started = time.time()
    if not args.report:
        results = run_all(profile, runs_dir, work_dir, jobs, threads)
    loads.append(load_averages())
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = report(args.profile, profile, command, results, time.time() - started, tuple(loads), jobs, threads)
    (args.out / f"quality_{args.profile}.md").write_text(markdown)
    runs, _, _ = plan(profile, results)
    (args.out / f"quality_{args.profile}.json").write_text(json.dumps(
        {"command": command, "profile": args.profile, "runs": [results.get(r.id, {"id": r.id, "status": "not run"}) for r in runs]},
        indent=1) + "\n")
    print(markdown)
    return 1 if any(r.get("status") == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
