"""Running the runs of ``python -m bench.quality``: each recipe run in a fresh process, its small result file written
as soon as it finishes (see bench/quality.py)."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification

from bench.quality_plan import (
    CR_TASKS,
    GLUE_METRICS,
    ROOT,
    Profile,
    Run,
    estimate_seconds,
    is_done,
    load_results,
    plan,
    sweep_runs,
)
from flexlora.recipe_kit.data.glue import GLUE_TASKS
from flexlora.recipe_kit.records import read_jsonl, short_module_name
from flexlora.recipe_kit.run_config import TrainingStopped
from recipes import deberta_glue, llama3_cr

RECIPE_MAINS = {"glue": deberta_glue.main, "cr": llama3_cr.main}  # bench.quality_plan.RECIPES: the same, as files


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
    return {
        "rank_moves": len(history),
        "expansions": len(expansions),
        "expansions_pruned_next": repruned,
        "final_rank_by_kind": {kind: statistics.fmean(ranks) for kind, ranks in by_kind.items()},
    }


def update_statistics(out: Path, task: str) -> dict:
    """How large and how spread the learned update is at the end of a GLUE run, read off its PEFT export with PEFT's
    own ``get_delta_weight`` (the same for every method): the mean over adapted matrices of ||Delta W||_F / ||W||_F,
    and of Delta W's effective rank, exp(entropy of its normalised singular values)."""
    base_path = json.loads((out / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=GLUE_TASKS[task].num_labels)
    model = PeftModel.from_pretrained(base, out / "peft")
    relative, effective = [], []
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
                continue
            delta = module.get_delta_weight("default").float()
            relative.append((delta.norm() / module.get_base_layer().weight.float().norm()).item())
            singular = torch.linalg.svdvals(delta)
            shares = singular / singular.sum().clamp_min(1e-30)
            effective.append(torch.exp(-(shares * torch.log(shares.clamp_min(1e-30))).sum()).item())
    if not relative:
        raise RuntimeError(f"{out / 'peft'}: no adapted matrix found in the PEFT export")
    return {"update_relative_norm": statistics.fmean(relative), "update_effective_rank": statistics.fmean(effective)}


def add_update_statistics(runs: list[Run], runs_dir: Path, work_dir: Path, results: dict[str, dict]) -> dict[str, dict]:
    """``--add-update-stats``: the statistics for finished GLUE runs recorded without them, where the run's outputs are
    still in ``work_dir``; each updated result file is rewritten."""
    for run in runs:
        stored = results.get(run.id)
        out = work_dir / run.id
        if (
            run.kind != "glue"
            or not is_done(run, results)
            or "update_relative_norm" in stored
            or not (out / "peft").is_dir()
        ):
            continue
        stored.update(update_statistics(out, run.task))
        (runs_dir / f"{run.id}.json").write_text(json.dumps(stored, indent=1) + "\n")
        print(f"{run.id}: update statistics added", flush=True)
    return results


def summarise(run: Run, out: Path) -> dict:
    """What the tables need, from the recipe's outputs (fractions, as the recipe writes them)."""
    metrics = json.loads((out / "metrics.json").read_text())
    summary = {
        "adapter_parameters": metrics["adapter_parameters"],
        "total_active_rank": metrics["total_active_rank"],
        "train_seconds": metrics["train_seconds_this_run"],
        **allocation_statistics(out),
    }
    if run.kind == "glue":
        split = metrics["main_metric"].split("/")[0]
        names = GLUE_METRICS[run.task][1] + ["majority_share"]
        summary["scores"] = {
            name: metrics["final"][f"{split}/{name}"] for name in names if f"{split}/{name}" in metrics["final"]
        }
        best = metrics.get("best") or {}  # the evaluation with the best main metric, and its step
        summary["best_scores"] = {name: best[f"{split}/{name}"] for name in names if f"{split}/{name}" in best}
        summary["best_step"] = best.get("step")
        main = metrics["main_metric"]
        summary["curve"] = [[row["step"], row[main]] for row in read_jsonl(out / "eval.jsonl")]
        summary.update(update_statistics(out, run.task))
    else:
        results = metrics.get("eval", {}).get("llm-adapters")
        if not results:
            raise RuntimeError(f"{out / 'metrics.json'} has no llm-adapters evaluation (eval.enabled must stay true)")
        summary["scores"] = {task: results[task]["accuracy"] for task, _ in CR_TASKS if task in results}
        summary["items_per_task"] = {task: results[task].get("n") for task, _ in CR_TASKS if task in results}
    return summary


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git"


RUN_ARGS_FILE = "bench_run_args.json"


def prepare_output_dir(run: Run, out: Path) -> None:
    """Keep ``out`` only if it holds this very run (same recipe arguments), so an interrupted run resumes from its
    checkpoint; otherwise empty it first. A profile change that leaves the training settings alone (e.g. a new
    evaluation interval) would otherwise resume the old finished checkpoint and store its scores as a new run."""
    if out.exists():
        args_file = out / RUN_ARGS_FILE
        if not args_file.exists() or json.loads(args_file.read_text()) != list(run.args):
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_ARGS_FILE).write_text(json.dumps(list(run.args)))


def execute(run: Run, out: Path, threads: int, locations: list[str]) -> dict:
    """Run one recipe in this (fresh) process, its output in <out>/run.log; never raises. ``locations`` (where data
    and model are on this machine) follow the run's own arguments. A run stopped on a non-finite loss is a result:
    ``diverged``."""
    if threads:
        torch.set_num_threads(threads)
    prepare_output_dir(run, out)
    started = time.time()
    saved = os.dup(1), os.dup(2)
    with open(out / "run.log", "w") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            RECIPE_MAINS[run.kind]([*run.args, *(locations if run.kind == "glue" else ()), f"output_dir={out}"])
            result = {"status": "ok", **summarise(run, out)}
        except TrainingStopped as error:
            traceback.print_exc()
            result = {"status": "diverged", "error": str(error)[:500]}
        except BaseException as error:  # noqa: BLE001 - the sweep records the failure and goes on
            traceback.print_exc()
            result = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}"[:500],
                "log": str(out / "run.log"),
            }
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return {
        "id": run.id,
        "args": list(run.args),
        **result,
        "seconds": round(time.time() - started, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def start_order(profile: Profile, tables: dict) -> dict[str, int]:
    """Run id -> its group in the start order: lr sweeps (they release the rest), then the rows the verdicts compare
    (FlexLoRA's default, LoRA, AdaLoRA), then the profile's ``early_rows``, then commonsense, then the longer schedules,
    then everything else; a session that ends early has then finished what decides the verdict. Within a group the
    longest runs go first, so the last minutes are not one job."""
    verdict_rows = {profile.rows[0].label} | {row.label for row in profile.rows if row.method in ("lora", "adalora")}
    groups = [
        [run.id for sweep in sweep_runs(profile).values() for run in sweep],
        [i for (label, _), ids in tables["methods"].items() if label in verdict_rows for i in ids],
        [i for (label, _), ids in tables["methods"].items() if label in profile.early_rows for i in ids],
        [i for ids in tables["commonsense"].values() for i in ids],
        [i for ids in tables["longer"].values() for i in ids],
    ]
    order: dict[str, int] = {}
    for group, ids in enumerate(groups):
        for run_id in ids:
            order.setdefault(run_id, group)
    return order


def run_all(
    profile: Profile,
    runs_dir: Path,
    work_dir: Path,
    jobs: int,
    threads: int,
    only: set[str] = frozenset(),
    locations: list[str] = (),
    stop_after_s: float | None = None,
    on_gpu: bool = False,
) -> dict[str, dict]:
    """Run every pending run (or those of ``only``), ``jobs`` at a time, planning again after each one (an lr sweep
    that finishes releases the runs that use its choice); each finished run's result file is written at once.
    After ``stop_after_s`` no run starts (those in flight finish)."""
    results = load_results(runs_dir)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the fresh processes
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "accelerate", "flexlora.recipe_kit.train_setup"])
    in_flight: dict[concurrent.futures.Future, Run] = {}
    failed: set[str] = set()
    # a resumed sweep's bar starts at what earlier sessions finished (tqdm leaves them out of the rate)
    bar = tqdm(desc="quality runs", unit="run", initial=sum(is_done(run, results) for run in plan(profile, results)[0]))
    started = time.time()
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        while True:
            runs, tables, _ = plan(profile, results)
            busy = {run.id for run in in_flight.values()}
            pending = [
                run
                for run in runs
                if not is_done(run, results)
                and run.id not in busy
                and run.id not in failed
                and (not only or run.id in only)
            ]
            order = start_order(profile, tables)
            pending.sort(key=lambda run: (order.get(run.id, len(order)), -estimate_seconds(profile, run, on_gpu)))
            if stop_after_s is not None and time.time() - started > stop_after_s:
                pending = []  # out of time: let the runs in flight finish
            bar.total = (
                len([run for run in runs if is_done(run, results) or run.id in failed]) + len(busy) + len(pending)
            )
            bar.refresh()
            while pending and len(in_flight) < jobs:
                run = pending.pop(0)
                in_flight[pool.submit(execute, run, work_dir / run.id, threads, list(locations))] = run
            if not in_flight:
                break
            done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                run = in_flight.pop(future)
                result = future.result()
                if result["status"] in ("ok", "diverged"):
                    results[run.id] = result
                    runs_dir.mkdir(parents=True, exist_ok=True)
                    (runs_dir / f"{run.id}.json").write_text(json.dumps(result, indent=1) + "\n")
                else:
                    failed.add(run.id)
                    results[run.id] = result
                bar.update()
                bar.write(
                    f"{run.id}: {result['status']} in {result['seconds']:.0f} s"
                    + (f" -- {result['error']}" if result["status"] != "ok" else "")
                    + (f" (log: {result['log']})" if result["status"] == "failed" else "")
                )
    bar.close()
    return results
