"""Equal-budget quality sweeps: FlexLoRA against PEFT LoRA and AdaLoRA on real data, with the paper's ablations.

    python -m bench.quality --cpu        # 2 CPU cores: 118 min measured (71 runs) -> bench/results/quality_cpu.{md,json}
    python -m bench.quality --cpu --only methods commonsense   # the Table 1 / 2 analogues alone: ~75 min
    python -m bench.quality --smoke      # a minute; what tests/test_bench_smoke.py runs
    python -m bench.quality --full       # the paper's settings (DeBERTaV3-base GLUE, LLaMA3-8B commonsense), for GPUs
    python -m bench.quality --cpu --dry-run   # print every run's recipe command instead of running it

Tables (paper layouts):
  methods     GLUE CoLA / MRPC / RTE / STS-B, FlexLoRA vs LoRA vs AdaLoRA at the same budget      (Table 1)
  importance  FlexLoRA with each importance metric                                               (Tables 4 / 15)
  mode        FlexLoRA, prune-only, expand-only                                                  (Table 5)
  init        zero-impact, small, zero, orthogonal expansion                                      (Table 6)
  lr          every method at multiples of the config's learning rate (not in the paper)
  orth        FlexLoRA and AdaLoRA with and without their orthogonality regulariser (not in the paper)
  init_std    FlexLoRA with P / Q initialised at 2.5 x the std (not in the paper)
  commonsense SmolLM2-135M (LLaMA3-8B in --full) on the eight commonsense tasks                   (Table 2)

Every cell is one recipe run (recipes/deberta_glue.py or recipes/llama3_cr.py, the same code users run) with the
profile's ``key=value`` overrides, repeated over seeds (train.seed and adapter.seed) and reported as mean +- std.
Runs execute in fresh processes (``--jobs`` at a time, ``--threads`` torch threads each), their outputs go to
``--work-dir/<run id>/``. A run that finished leaves ``result.json`` there; rerunning the sweep skips it, so an
interrupted sweep resumes where it stopped (and a run whose overrides changed is redone).

``--full`` runs each recipe in one process on one device. To spread a run over GPUs, take its command from
``--dry-run`` and start it with ``accelerate launch`` instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.common import load_averages, markdown_table, provenance
from flexlora import FlexLoRAConfig
from flexlora.training import short_module_name

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"glue": ROOT / "recipes" / "deberta_glue.py", "cr": ROOT / "recipes" / "llama3_cr.py"}
METHODS = ("flexlora", "lora", "adalora")
METHOD_NAMES = {"flexlora": "FlexLoRA", "lora": "LoRA", "adalora": "AdaLoRA"}
# The variants each ablation table compares; the first is FlexLoRA's default (shared with the methods table).
ABLATIONS = {
    "importance": ("adapter.importance", ("entropy", "nuclear", "frobenius", "sensitivity", "elem", "mat")),
    "mode": ("adapter.mode", ("flex", "prune_only", "expand_only")),
    "init": ("adapter.expand_init", ("zero_impact", "small", "zero", "orthogonal")),
}
# scale tables -> the config value they multiply, and the methods they run
SCALED = {"lr": "train.lr", "orth": "adapter.orth_reg_weight", "init_std": "adapter.init_std"}
SCALED_METHODS = {"lr": METHODS, "orth": ("flexlora", "adalora"), "init_std": ("flexlora",)}
TABLES = ("methods", *ABLATIONS, *SCALED, "commonsense")
GLUE_METRICS = {  # main metric first; the recipe's metrics.json names them "<split>/<metric>"
    "cola": ("CoLA", ["matthews_correlation"]),
    "mrpc": ("MRPC", ["accuracy", "f1"]),
    "rte": ("RTE", ["accuracy"]),
    "stsb": ("STS-B", ["pearson", "spearman"]),
}
CR_TASKS = [("boolq", "BoolQ"), ("piqa", "PIQA"), ("social_i_qa", "SIQA"), ("hellaswag", "HellaS."),
            ("winogrande", "WinoG."), ("ARC-Easy", "ARC-e"), ("ARC-Challenge", "ARC-c"), ("openbookqa", "OBQA")]


@dataclass(frozen=True)
class Profile:
    glue_config: str  # a recipe config per task ({task} is filled in)
    glue_tasks: dict[str, dict]  # task -> overrides for that task
    glue_common: dict  # overrides for every GLUE run
    seeds: tuple[int, ...]  # methods table
    ablation_tasks: tuple[str, ...]
    ablation_seeds: tuple[int, ...]
    # Multiples of a config value, on the ablation tasks: lr for every method; the orthogonality regulariser's
    # weight for the two methods that have one (0: no regulariser)
    scales: dict[str, tuple[float, ...]]
    cr_config: str
    cr_overrides: dict
    cr_seeds: tuple[int, ...]
    jobs: int
    threads: int
    note: str


def _schedule(steps: int, warmup: int, delta_t: int) -> dict:
    """Overrides for a short run with allocation between ``warmup`` and ``steps - warmup``."""
    return {"train.max_steps": steps, "adapter.t_warmup": warmup, "adapter.t_final": warmup, "adapter.delta_t": delta_t}


PROFILES = {
    # Seconds per run: a few steps of MiniLM on 32 rows; the commonsense runs use --set-cr model.path=<tiny model>
    # in the test (SmolLM2 otherwise).
    "smoke": Profile(
        glue_config="recipes/configs/glue/minilm_{task}.yaml",
        glue_tasks={"stsb": _schedule(4, 1, 1)},
        glue_common={"data.max_train_samples": 32, "data.max_eval_samples": 32, "train.batch_size": 8,
                     "train.micro_batch_size": 8, "eval.every_n_steps": 0, "logging.tensorboard": "false"},
        seeds=(0,), ablation_tasks=("stsb",), ablation_seeds=(0,),
        scales={"lr": (1.0, 4.0), "orth": (1.0, 0.0), "init_std": (1.0, 2.5)},
        cr_config="recipes/configs/quickstart.yaml",
        cr_overrides={**_schedule(3, 1, 1), "data.max_samples": 12, "train.warmup_steps": 1, "eval.limit": 1,
                      "eval.max_new_tokens": 4, "checkpoint.every_n_steps": 0, "logging.tensorboard": "false"},
        cr_seeds=(0,), jobs=1, threads=1,
        note="structure check only: a few steps, 32 rows; the numbers mean nothing",
    ),
    # 118 min measured on 2 shared cores with two runs at a time, one torch thread each (over half of it STS-B: the
    # ablations run there, the one proxy task where every method learns within a CPU-sized run). Steps per task are chosen so a
    # run takes 1-4 minutes here; learning rates are Table 8's, and the allocation schedule keeps its proportions
    # (T_warmup = T_final ~ 20 %, Delta_T ~ 5 % of the steps).
    "cpu": Profile(
        glue_config="recipes/configs/glue/minilm_{task}.yaml",
        glue_tasks={
            "cola": _schedule(150, 30, 6),
            "mrpc": _schedule(100, 20, 5),
            "rte": _schedule(60, 12, 3),
            "stsb": _schedule(80, 16, 4),
        },
        glue_common={"eval.every_n_steps": 0, "checkpoint.every_n_steps": 0},
        seeds=(0, 1, 2), ablation_tasks=("stsb",), ablation_seeds=(0, 1),
        scales={"lr": (1.0, 4.0), "orth": (1.0, 0.0), "init_std": (1.0, 2.5)},
        cr_config="recipes/configs/quickstart.yaml",
        cr_overrides={**_schedule(120, 24, 8), "data.max_samples": 240, "eval.limit": 20, "checkpoint.every_n_steps": 0},
        cr_seeds=(0,), jobs=2, threads=1,
        note="all-MiniLM-L6-v2 on GLUE subsets and SmolLM2-135M-Instruct on commonsense, 60-150 steps per run: "
             "a CPU proxy, far shorter than the paper's runs",
    ),
    # The paper's settings: Table 8 configs (DeBERTaV3-base, full epochs), Table 9 (LLaMA3-8B), 5 seeds on GLUE.
    "full": Profile(
        glue_config="recipes/configs/glue/{task}.yaml",
        glue_tasks={"cola": {}, "mrpc": {}, "rte": {}, "stsb": {}},
        glue_common={},
        seeds=(0, 1, 2, 3, 4), ablation_tasks=("cola", "mrpc", "rte", "stsb"), ablation_seeds=(0, 1, 2, 3, 4),
        scales={"lr": (0.5, 1.0, 2.0), "orth": (1.0, 0.0), "init_std": (1.0, 2.5)},
        cr_config="recipes/configs/llama3_8b_cr_r8.yaml",
        cr_overrides={},
        cr_seeds=(0,), jobs=1, threads=0,
        note="the paper's settings (Tables 8 and 9)",
    ),
}


@dataclass(frozen=True)
class Run:
    id: str
    kind: str  # glue | cr
    argv: tuple[str, ...]  # the recipe's command line after the script name
    task: str  # GLUE task, or "commonsense"
    method: str
    variant: dict = field(default_factory=dict, hash=False, compare=False)  # ablation key -> value (FlexLoRA only)
    seed: int = 0
    scale: tuple[str, float] | None = None  # (SCALED key, multiple) for the lr / orth tables


def config_value(config: str, dotted_key: str) -> float:
    """A value of a recipe config file, e.g. train.lr (what the scale tables multiply); an adapter value the file
    leaves out is FlexLoRAConfig's default."""
    section, key = dotted_key.split(".")
    values = yaml.safe_load((ROOT / config).read_text())[section]
    if key not in values and section == "adapter":
        return float(FlexLoRAConfig.__dataclass_fields__[key].default)
    return float(values[key])


def output_dir(run: "Run") -> Path:
    return Path(dict(arg.split("=", 1) for arg in run.argv if "=" in arg)["output_dir"])


def _argv(config: str, overrides: dict) -> tuple[str, ...]:
    return ("--config", config, *(f"{key}={value}" for key, value in overrides.items()))


def plan(profile: Profile, work_dir: Path, set_glue: list[str], set_cr: list[str], only: set[str]) -> tuple[list[Run], dict]:
    """Every run of the sweep (each once, though several tables may read it) and, per table, the run ids per cell."""
    runs: dict[str, Run] = {}
    tables: dict[str, dict] = {}

    def glue_run(task: str, seed: int, method: str = "flexlora", scale: tuple[str, float] | None = None, **variant) -> str:
        variant = {key: variant.get(key, values[0]) for key, (_, values) in ABLATIONS.items()} if method == "flexlora" else {}
        scale = scale if scale is not None and scale[1] != 1.0 else None  # x 1 is the default run
        run_id = (f"glue-{task}-{method}" + "".join(f"-{v}" for v in variant.values())
                  + (f"-{scale[0]}{scale[1]:g}x" if scale else "") + f"-s{seed}")
        config = profile.glue_config.format(task=task)
        overrides = {**profile.glue_common, **profile.glue_tasks[task], "method": method, "train.seed": seed,
                     "adapter.seed": seed, **{ABLATIONS[k][0]: v for k, v in variant.items()}}
        if scale:
            key = SCALED[scale[0]]
            overrides[key] = f"{scale[1] * float(overrides.get(key, config_value(config, key))):g}"
        argv = _argv(config, {**overrides, "output_dir": work_dir / run_id}) + tuple(set_glue)
        runs.setdefault(run_id, Run(run_id, "glue", argv, task, method, variant, seed, scale))
        return run_id

    if "methods" in only:
        tables["methods"] = {(task, method): [glue_run(task, seed, method) for seed in profile.seeds]
                             for task in profile.glue_tasks for method in METHODS}
    for name in SCALED:
        if name in only:
            tables[name] = {(task, method, scale): [glue_run(task, seed, method, (name, scale)) for seed in profile.ablation_seeds]
                            for task in profile.ablation_tasks for method in SCALED_METHODS[name] for scale in profile.scales[name]}
    for name, (_, values) in ABLATIONS.items():
        if name in only:
            tables[name] = {(task, value): [glue_run(task, seed, **{name: value}) for seed in profile.ablation_seeds]
                            for task in profile.ablation_tasks for value in values}
    if "commonsense" in only:
        cells = {}
        for method in METHODS:
            cells[("commonsense", method)] = []
            for seed in profile.cr_seeds:
                run_id = f"cr-{method}-s{seed}"
                overrides = {**profile.cr_overrides, "method": method, "train.seed": seed, "adapter.seed": seed,
                             "output_dir": work_dir / run_id}
                runs[run_id] = Run(run_id, "cr", _argv(profile.cr_config, overrides) + tuple(set_cr), "commonsense", method, {}, seed)
                cells[("commonsense", method)].append(run_id)
        tables["commonsense"] = cells
    return list(runs.values()), tables


# ---- running -------------------------------------------------------------------------------------------
def _load_recipe(kind: str):
    spec = importlib.util.spec_from_file_location(f"bench_quality_{kind}_recipe", RECIPES[kind])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _summary(run: Run, out: Path) -> dict:
    """The numbers the tables need, from the recipe's metrics.json (fractions, as the recipe writes them)."""
    metrics = json.loads((out / "metrics.json").read_text())
    summary = {"adapter_parameters": metrics["adapter_parameters"], "total_active_rank": metrics["total_active_rank"],
               "rank_changes": metrics["rank_changes"], "train_seconds": metrics["train_seconds_this_run"]}
    if run.kind == "glue":
        split = metrics["main_metric"].split("/")[0]
        summary["scores"] = {name: metrics["final"][f"{split}/{name}"] for name in GLUE_METRICS[run.task][1]}
    else:
        results = metrics.get("eval", {}).get("llm-adapters")
        if not results:
            raise RuntimeError(f"{out / 'metrics.json'} has no llm-adapters evaluation (eval.enabled must stay true)")
        summary["scores"] = {task: results[task]["accuracy"] for task, _ in CR_TASKS if task in results}
    return summary


def execute(run: Run, threads: int) -> dict:
    """Run one recipe in this (fresh) process, its output in <output_dir>/run.log; never raises."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = output_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    saved = os.dup(1), os.dup(2)
    with open(out / "run.log", "w") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            _load_recipe(run.kind).main(list(run.argv))
            result = {"status": "ok", **_summary(run, out)}
        except BaseException as error:  # noqa: BLE001 - the sweep records the failure and goes on
            traceback.print_exc()
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:500]}
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    result |= {"id": run.id, "argv": list(run.argv), "seconds": round(time.time() - started, 1), "log": str(out / "run.log")}
    if result["status"] == "ok":
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _execute_star(args) -> dict:
    return execute(*args)


def finished(run: Run) -> dict | None:
    """The stored result of a run that already finished with the same command line, if any."""
    path = output_dir(run) / "result.json"
    if path.exists():
        result = json.loads(path.read_text())
        if result.get("argv") == list(run.argv):
            return result
    return None


def run_all(runs: list[Run], jobs: int, threads: int) -> dict[str, dict]:
    import multiprocessing

    from tqdm.auto import tqdm

    results = {run.id: r for run in runs if (r := finished(run)) is not None}
    pending = [run for run in runs if run.id not in results]
    # Longest first (commonsense, then the GLUE tasks with the longest runs) so the last minutes are not one job.
    pending.sort(key=lambda run: (run.kind != "cr", run.task not in ("stsb", "mrpc", "rte")))
    print(f"{len(runs)} runs: {len(results)} already finished, {len(pending)} to run, {jobs} at a time", flush=True)
    if not pending:
        return results
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the fresh processes
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "accelerate", "flexlora.training"])
    with context.Pool(processes=jobs, maxtasksperchild=1) as pool, tqdm(total=len(pending), desc="quality runs") as bar:
        for result in pool.imap_unordered(_execute_star, [(run, threads) for run in pending]):
            results[result["id"]] = result
            bar.update()
            bar.write(f"{result['id']}: {result['status']} in {result['seconds']:.0f} s"
                      + (f" -- {result['error']} (log: {result['log']})" if result["status"] != "ok" else ""))
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


def scores(results: dict[str, dict], run_ids: list[str], metric: str) -> list[float]:
    return [results[i]["scores"][metric] for i in run_ids if results.get(i, {}).get("status") == "ok" and metric in results[i]["scores"]]


def field_mean(results: dict[str, dict], run_ids: list[str], key: str) -> str:
    values = [results[i][key] for i in run_ids if results.get(i, {}).get("status") == "ok"]
    return f"{statistics.fmean(values):,.0f}" if values else "-"


def methods_table(results, cells, tasks) -> str:
    header = ["method", "adapter params", "final active rank"]
    for task in tasks:
        name, metrics = GLUE_METRICS[task]
        header += [f"{name} {m}" for m in metrics]
    header.append("avg (main metrics)")
    rows = []
    for method in METHODS:
        ids = [i for task in tasks for i in cells[(task, method)]]
        row = [METHOD_NAMES[method], field_mean(results, ids, "adapter_parameters"), field_mean(results, ids, "total_active_rank")]
        means = []
        for task in tasks:
            for k, metric in enumerate(GLUE_METRICS[task][1]):
                values = scores(results, cells[(task, method)], metric)
                row.append(cell(values))
                if k == 0 and values:
                    means.append(100 * statistics.fmean(values))
        row.append(f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else "-")
        rows.append(row)
    return markdown_table(header, rows)


def ablation_table(results, cells, name: str, tasks) -> str:
    header = [name, "final active rank"] + [f"{GLUE_METRICS[t][0]} {GLUE_METRICS[t][1][0]}" for t in tasks]
    rows = []
    for value in ABLATIONS[name][1]:
        ids = [i for task in tasks for i in cells[(task, value)]]
        rows.append([value, field_mean(results, ids, "total_active_rank")]
                    + [cell(scores(results, cells[(task, value)], GLUE_METRICS[task][1][0])) for task in tasks])
    return markdown_table(header, rows)


def scale_table(results, cells, name: str) -> str:
    tasks = list(dict.fromkeys(task for task, _, _ in cells))
    methods = list(dict.fromkeys(method for _, method, _ in cells))
    scales = list(dict.fromkeys(scale for _, _, scale in cells))
    header = ["method"] + [f"{GLUE_METRICS[t][0]} {GLUE_METRICS[t][1][0]}, {name} x {scale:g}" for t in tasks for scale in scales]
    rows = [[METHOD_NAMES[method]] + [cell(scores(results, cells[(task, method, scale)], GLUE_METRICS[task][1][0]))
                                      for task in tasks for scale in scales] for method in methods]
    return markdown_table(header, rows)


def commonsense_table(results, cells) -> str:
    header = ["method", "adapter params"] + [short for _, short in CR_TASKS] + ["avg"]
    rows = []
    for method in METHODS:
        ids = cells[("commonsense", method)]
        ok = [i for i in ids if results.get(i, {}).get("status") == "ok"]
        averages = [statistics.fmean(results[i]["scores"].values()) for i in ok if results[i]["scores"]]
        rows.append([METHOD_NAMES[method], field_mean(results, ids, "adapter_parameters")]
                    + [cell(scores(results, ids, task)) for task, _ in CR_TASKS] + [cell(averages)])
    return markdown_table(header, rows)


def default_runs(runs: list[Run], results: dict[str, dict], task: str, method: str) -> list[Run]:
    """The finished runs of ``method`` on ``task`` with no ablation changed (one per seed)."""
    return [run for run in runs if run.task == task and run.method == method and results.get(run.id, {}).get("status") == "ok"
            and run.scale is None and all(run.variant.get(key, values[0]) == values[0] for key, (_, values) in ABLATIONS.items())]


def rank_distribution_table(results, runs: list[Run]) -> str:
    """Mean final rank per kind of matrix (Figure 2's letters: Q K V A I O, or Llama's Up / Down), over layers and
    seeds, for the two methods that move rank; every matrix started at r."""
    rows, labels = [], []
    for task in dict.fromkeys(run.task for run in runs):
        for method in ("flexlora", "adalora"):
            chosen = default_runs(runs, results, task, method)
            per_label: dict[str, list[int]] = {}
            for run in chosen:
                for module, rank in json.loads((output_dir(run) / "rank_pattern.json").read_text()).items():
                    label = short_module_name(module).split(".", 1)[-1]
                    per_label.setdefault(label, []).append(rank)
            if per_label:
                labels += [label for label in per_label if label not in labels]
                rows.append((GLUE_METRICS.get(task, ("commonsense",))[0], METHOD_NAMES[method], len(chosen), per_label))
    return markdown_table(["task", "method", "seeds"] + labels,
                          [[task, method, n] + [f"{statistics.fmean(ranks[label]):.2f}" if label in ranks else "-" for label in labels]
                           for task, method, n, ranks in rows])


def copy_heatmaps(results, runs: list[Run], directory: Path) -> list[Path]:
    """The rank-allocation heatmap of FlexLoRA's first-seed default run of every task, copied next to the report."""
    copied = []
    for task in dict.fromkeys(run.task for run in runs):
        candidates = default_runs(runs, results, task, "flexlora")
        if candidates and (output_dir(candidates[0]) / "rank_heatmap.png").is_file():
            directory.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copyfile(output_dir(candidates[0]) / "rank_heatmap.png", directory / f"{task}.png")))
    return copied


def sweep_span(runs: list[Run], results: dict[str, dict]) -> tuple[float, float] | None:
    """(first start, last end) of the finished runs, from their result.json times, across resumed invocations."""
    done = [run for run in runs if results.get(run.id, {}).get("status") == "ok"]
    if not done:
        return None
    ends = {run.id: (output_dir(run) / "result.json").stat().st_mtime for run in done}
    return min(ends[run.id] - results[run.id]["seconds"] for run in done), max(ends.values())


def verdict(flex: list[float], other: list[float]) -> str:
    """Whether FlexLoRA's mean is above the other's by more than the larger seed std (else: within noise)."""
    if not flex or not other:
        return "not measured"
    (f_mean, f_std), (o_mean, o_std) = mean_std(flex), mean_std(other)
    diff = 100 * (f_mean - o_mean)
    if f_std is None and o_std is None:
        return f"{'**better**' if diff > 0 else '**worse**'} ({diff:+.1f}, one seed)"
    noise = 100 * max(s for s in (f_std, o_std) if s is not None)
    if abs(diff) <= noise:
        return f"within noise ({diff:+.1f}, std {noise:.1f})"
    return f"{'**better**' if diff > 0 else '**worse**'} ({diff:+.1f}, std {noise:.1f})"


def verdict_table(results, tables) -> str:
    rows = []
    if "methods" in tables:
        tasks = sorted({task for task, _ in tables["methods"]}, key=list(GLUE_METRICS).index)
        for task in tasks:
            name, metrics = GLUE_METRICS[task]
            flex = scores(results, tables["methods"][(task, "flexlora")], metrics[0])
            rows.append([f"{name} {metrics[0]}"] + [verdict(flex, scores(results, tables["methods"][(task, m)], metrics[0]))
                                                    for m in ("lora", "adalora")])
    if "commonsense" in tables:
        def averages(method):
            return [statistics.fmean(results[i]["scores"].values()) for i in tables["commonsense"][("commonsense", method)]
                    if results.get(i, {}).get("status") == "ok" and results[i]["scores"]]
        rows.append(["commonsense avg"] + [verdict(averages("flexlora"), averages(m)) for m in ("lora", "adalora")])
    return markdown_table(["task", "FlexLoRA vs LoRA", "FlexLoRA vs AdaLoRA"], rows)


def report(profile_name: str, profile: Profile, command: str, runs: list[Run], results: dict[str, dict], tables: dict,
           wall_s: float, loads: tuple[str, str], heatmaps: list[Path], jobs: int, threads: int) -> str:
    ok = [r for r in results.values() if r.get("status") == "ok"]
    span = sweep_span(runs, results)
    span_text = (f"the runs span {time.strftime('%Y-%m-%d %H:%M', time.gmtime(span[0]))} - "
                 f"{time.strftime('%H:%M UTC', time.gmtime(span[1]))} = {(span[1] - span[0]) / 60:.0f} min of wall time"
                 if span else "no run finished")
    parts = [
        f"# Quality at equal budget: FlexLoRA vs PEFT LoRA / AdaLoRA (`--{profile_name}`)",
        f"Profile: {profile.note}. Seeds {list(profile.seeds)} for the methods table, {list(profile.ablation_seeds)} for "
        f"the ablations, {list(profile.cr_seeds)} for commonsense; every cell is mean ± sample std over seeds, x 100. "
        "Same budget: the config's r on every target matrix for all methods (LoRA rank r; FlexLoRA capacity ceil(1.5 r) "
        "with r active; AdaLoRA init_r ceil(1.5 r) -> target_r r), same steps, lr, schedule and data.",
        provenance(command, "cpu", wall_s, loads),
        f"Runs: {len(runs)} planned, {len(ok)} finished; {span_text} (the sweep, across resumed invocations; 'Wall time' "
        f"above is this invocation's), {sum(r['seconds'] for r in ok):,.0f} s summed over runs; runs {jobs} at a time, "
        f"{threads or 'the default number of'} torch thread(s) each.",
    ]
    failed = [r for r in results.values() if r.get("status") != "ok"]
    if failed:
        parts.append("**Failed runs:**\n\n" + "\n".join(f"- `{r['id']}`: {r['error']} (log {r['log']})" for r in failed))
    if "methods" in tables:
        tasks = list(dict.fromkeys(task for task, _ in tables["methods"]))
        parts += ["## GLUE: methods at equal budget (Table 1 layout)", methods_table(results, tables["methods"], tasks)]
    titles = {"importance": "Importance metric (Tables 4 / 15)", "mode": "Prune and expand (Table 5)",
              "init": "Expansion initialisation (Table 6)"}
    for name, title in titles.items():
        if name in tables:
            tasks = list(dict.fromkeys(task for task, _ in tables[name]))
            parts += [f"## GLUE ablation: {title}", ablation_table(results, tables[name], name, tasks)]
    if "lr" in tables:
        parts += ["## Learning rate (every method at multiples of the config's lr; the other tables use x 1)",
                  "FlexLoRA and AdaLoRA start every lambda at 0 and grow it by about one lr per Adam step, while LoRA's "
                  "B grows in all of its d_out x r entries at once, so short runs at one shared lr can favour LoRA.",
                  scale_table(results, tables["lr"], "lr")]
    if "orth" in tables:
        parts += ["## Orthogonality regulariser (its weight x 1 and x 0, i.e. off; LoRA has none)",
                  "FlexLoRA adds eq. 2 (squared Frobenius norms) of every matrix to the loss; PEFT's AdaLoRA adds the mean "
                  "over matrices of the plain Frobenius norms, so at the same orth_reg_weight its regulariser is much weaker.",
                  scale_table(results, tables["orth"], "orth_reg_weight")]
    if "init_std" in tables:
        parts += ["## Initial P / Q scale (FlexLoRA's init_std x 1 and x 2.5)",
                  "x 2.5 of 0.02 is ~1/sqrt(d) for d = 384: P's columns and Q's rows start near unit norm, so eq. 2 starts "
                  "near 0 instead of ~10 per matrix, and Adam's second moments of P and Q are not filled by the "
                  "regulariser's early gradient.",
                  scale_table(results, tables["init_std"], "init_std")]
    if "commonsense" in tables:
        parts += ["## Commonsense reasoning (Table 2 layout, LLM-Adapters protocol, accuracy)",
                  commonsense_table(results, tables["commonsense"])]
    if "methods" in tables or "commonsense" in tables:
        parts += ["## Did FlexLoRA win?", "Better / worse only when the difference of means exceeds the larger seed "
                  "std of the two; with one seed there is no std and any difference counts.", verdict_table(results, tables)]
    parts += ["## Where the rank went (final rank per matrix kind, mean over layers and seeds; all start at r)",
              rank_distribution_table(results, runs)]
    if heatmaps:
        parts += ["Rank allocation over training, FlexLoRA, first seed: "
                  + ", ".join(f"[{path.stem}]({path.parent.name}/{path.name})" for path in heatmaps) + "."]
    parts += ["## Runs", markdown_table(["run", "status", "wall s", "final active rank", "rank moves"],
                                        [[r.id, results.get(r.id, {}).get("status", "not run"),
                                          f"{results[r.id]['seconds']:.0f}" if r.id in results else "-",
                                          results.get(r.id, {}).get("total_active_rank", "-"),
                                          results.get(r.id, {}).get("rank_changes", "-")] for r in runs])]
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group(required=True)
    for name in PROFILES:
        profile.add_argument(f"--{name}", dest="profile", action="store_const", const=name)
    parser.add_argument("--only", nargs="+", choices=TABLES, default=list(TABLES), help="tables to produce (default: all)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the profile's)")
    parser.add_argument("--threads", type=int, help="torch threads per run; 0: torch's default (default: the profile's)")
    parser.add_argument("--set-glue", action="append", default=[], metavar="KEY=VALUE", help="extra override for every GLUE run")
    parser.add_argument("--set-cr", action="append", default=[], metavar="KEY=VALUE", help="extra override for every commonsense run")
    parser.add_argument("--work-dir", type=Path, help="recipe outputs (default: outputs/bench-quality/<profile>)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where quality_<profile>.md/.json go")
    parser.add_argument("--dry-run", action="store_true", help="print the recipe commands and stop")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    jobs = args.jobs or profile.jobs
    threads = profile.threads if args.threads is None else args.threads
    work_dir = (args.work_dir or ROOT / "outputs" / "bench-quality" / args.profile).resolve()
    for override in args.set_glue + args.set_cr:
        if "=" not in override:
            raise SystemExit(f"--set-glue/--set-cr take KEY=VALUE, got {override!r}")
    runs, tables = plan(profile, work_dir, args.set_glue, args.set_cr, set(args.only))
    if args.dry_run:
        for run in runs:
            print(f"accelerate launch {RECIPES[run.kind].relative_to(ROOT)} " + " ".join(run.argv))
        return 0
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    loads = [load_averages()]
    started = time.time()
    results = run_all(runs, jobs, threads)
    loads.append(load_averages())
    args.out.mkdir(parents=True, exist_ok=True)
    heatmaps = copy_heatmaps(results, runs, args.out / f"quality_{args.profile}_heatmaps")
    markdown = report(args.profile, profile, command, runs, results, tables, time.time() - started, tuple(loads), heatmaps,
                      jobs, threads)
    (args.out / f"quality_{args.profile}.md").write_text(markdown)
    (args.out / f"quality_{args.profile}.json").write_text(json.dumps(
        {"command": command, "profile": args.profile, "runs": [results.get(r.id, {"id": r.id, "status": "not run"}) for r in runs]},
        indent=2))
    print(markdown)
    failed = [r for r in results.values() if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
