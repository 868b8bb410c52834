"""The report of ``python -m bench.quality``: tables from the stored run results (see bench/quality.py)."""

from __future__ import annotations

import math
import statistics
from collections import Counter

from bench.quality_plan import (
    CONVERGED_POINTS,
    CR_TASKS,
    GLUE_METRICS,
    METHODS,
    ROOT,
    Profile,
    Row,
    Run,
    best_multiples,
    config_values,
    full_plan_size,
    is_done,
    plan,
    sweep_runs,
)
from bench.reporting import markdown_table, provenance
from flexlora.recipe_kit.data.commonsense import load_rows
from flexlora.recipe_kit.run_config import load_config
from flexlora.recipe_kit.scoring import local_task_file
from recipes.llama3_cr import RecipeConfig


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float], planned: int = 0) -> str:
    """x100, mean +- sample std over seeds ('-' when no run finished; "(n of N)" while fewer than the ``planned``
    seeds have)."""
    if not values:
        return "-"
    mean, std = mean_std([100 * v for v in values])
    return (
        f"{mean:.1f}"
        + (f" ± {std:.1f}" if std is not None else "")
        + (f" ({len(values)} of {planned})" if len(values) < planned else "")
    )


def ok(results: dict[str, dict], run_ids: list[str]) -> list[dict]:
    return [results[i] for i in run_ids if results.get(i, {}).get("status") == "ok"]


def scores(results: dict[str, dict], run_ids: list[str], metric: str, key: str = "scores") -> list[float]:
    """The runs' ``key`` scores: ``scores`` (after the last step) or ``best_scores`` (the best evaluation's). A NaN
    score (a collapsed run whose predictions are constant) is left out here; the sweep table lists it as diverged."""
    return [r[key][metric] for r in ok(results, run_ids) if math.isfinite(r.get(key, {}).get(metric, math.nan))]


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


DIVERGED_POINTS = 20  # a sweep run this far below its sweep's best mean counts as diverged (as a non-finite stop does)


def diverged_runs(profile: Profile, results) -> dict[str, list[Run]]:
    """Per lr sweep, its finished runs that diverged: stopped on a non-finite loss, or ended more than
    DIVERGED_POINTS below the sweep's best mean."""
    metric = GLUE_METRICS[profile.sweep_task][1][0]
    found = {}
    for key, runs in sweep_runs(profile).items():
        means = [
            100 * statistics.fmean(v)
            for m in profile.lr_multiples
            if (v := scores(results, [run.id for run in runs if run.lr_multiple == m], metric))
        ]
        top = max(means) if means else None
        found[key] = [
            run
            for run in runs
            if results.get(run.id, {}).get("status") == "diverged"
            or (
                top is not None
                and results.get(run.id, {}).get("status") == "ok"
                and not 100 * results[run.id]["scores"].get(metric, -math.inf) >= top - DIVERGED_POINTS
            )
        ]
    return found


def sweep_table(profile: Profile, results, tables) -> str:
    """Per sweep (each method's, each switch's own): the score at each lr multiple (mean over its seeds), the chosen
    multiple, the multiples within 1 point of the best, and every diverged run."""
    metric = GLUE_METRICS[profile.sweep_task][1][0]
    best = best_multiples(profile, results)
    diverged = diverged_runs(profile, results)
    base = float(config_values(profile.glue_config.format(task=profile.sweep_task))["train"]["lr"])
    header = (
        ["sweep", "seeds"]
        + [f"lr x {m:g} ({m * base:.2g})" for m in profile.lr_multiples]
        + ["chosen", "within 1 point of the best", "diverged runs"]
    )
    edges = (min(profile.lr_multiples), max(profile.lr_multiples))
    body = []
    for key, runs in sweep_runs(profile).items():
        ids = {m: tables["sweep"][(key, m)] for m in profile.lr_multiples}
        means = {m: 100 * statistics.fmean(v) for m in profile.lr_multiples if (v := scores(results, ids[m], metric))}
        top = max(means.values()) if means else None
        seeds = sorted({run.seed for run in runs})
        body.append(
            [key, ", ".join(map(str, seeds))]
            + [cell(scores(results, ids[m], metric), len(ids[m])) for m in profile.lr_multiples]
            + [
                f"x {best[key]:g}" + (" (grid edge)" if best[key] in edges and len(edges) > 1 else "")
                if key in best
                else "sweep not finished",
                ", ".join(f"x {m:g}" for m, v in means.items() if v >= top - 1.0) if means else "-",
                ", ".join(f"x {run.lr_multiple:g} seed {run.seed}" for run in diverged[key]) or "none",
            ]
        )
    return markdown_table(header, body)


def methods_table(profile: Profile, results, cells, rows: tuple[Row, ...], tasks, key: str = "scores") -> str:
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
        line = [
            row.label,
            len(row.seeds),
            f"{statistics.fmean(r['adapter_parameters'] for r in done):,.0f}" if done else "-",
        ]
        means = []
        for task in tasks:
            for k, metric in enumerate(GLUE_METRICS[task][1]):
                values = scores(results, cells[(row.label, task)], metric, key)
                line.append(cell(values, len(row.seeds)))
                if k == 0 and values:
                    means.append(100 * statistics.fmean(values))
        line.append(f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else "-")
        body.append(line)
    return markdown_table(header, body)


def seed_mean_gap(curves: list[list[list[float]]]) -> float | None:
    """Points between the last two scores of the mean curve over seeds (None without two seeds scored at the same
    steps): what the table's mean moved at the end, with less of one seed's item-to-item noise."""
    if len(curves) < 2 or any(len(c) < 2 or [s for s, _ in c[-2:]] != [s for s, _ in curves[0][-2:]] for c in curves):
        return None
    return abs(statistics.fmean(c[-1][1] for c in curves) - statistics.fmean(c[-2][1] for c in curves)) * 100


def convergence_table(profile: Profile, results, cells) -> tuple[str, dict[str, bool]]:
    """Per task: LoRA r=8's last-two-score gap per seed and of its seed mean, the largest gap of any row, and whether
    every run of every method predicted one class. Returns the table and task -> converged (the per-seed rule)."""
    lora = next(row for row in profile.rows if row.method == "lora" and not row.overrides)
    converged, body = {}, []
    for task in profile.glue_tasks:
        if (lora.label, task) not in cells:
            continue

        def gaps(ids):
            return [abs(r["curve"][-1][1] - r["curve"][-2][1]) * 100 for r in ok(results, ids) if len(r["curve"]) >= 2]

        lora_runs = ok(results, cells[(lora.label, task)])
        lora_gaps = gaps([r["id"] for r in lora_runs])
        mean_gap = seed_mean_gap([r["curve"] for r in lora_runs])
        every = [r for row in profile.rows if (row.label, task) in cells for r in ok(results, cells[(row.label, task)])]
        all_gaps = gaps([r["id"] for r in every])
        one_class = bool(every) and all(r["scores"].get("majority_share", 0.0) >= 1.0 for r in every)
        converged[task] = bool(lora_gaps) and len(lora_gaps) == len(lora.seeds) and max(lora_gaps) < CONVERGED_POINTS
        body.append(
            [
                GLUE_METRICS[task][0],
                ", ".join(f"{g:.2f}" for g in lora_gaps) or "-",
                f"{mean_gap:.2f}" if mean_gap is not None else "-",
                f"{max(all_gaps):.2f}" if all_gaps else "-",
                "yes" if converged[task] else "no",
                "**yes: ranks nothing**" if one_class else "no",
            ]
        )
    header = [
        "task",
        "LoRA r=8: last-two gap per seed (points)",
        "of its seed mean",
        "largest gap, any run",
        f"converged (< {CONVERGED_POINTS})",
        "every run predicts one class",
    ]
    return markdown_table(header, body), converged


def longer_table(profile: Profile, results, tables) -> str:
    """Per longer-schedule row and task: the final score at the standard length and at the longer one over the seeds
    finished at both lengths, and the longer runs' last-two gaps."""
    body = []
    for (label, task), ids in tables["longer"].items():
        row = next(r for r in profile.longer if r.label == label)
        base = next(r for r in profile.rows if r.label == label)
        base_ids = tables["methods"].get((label, task), [])
        metric = GLUE_METRICS[task][1][0]
        pairs = []  # (longer run, standard run) of one seed, both finished
        for seed, long_id in zip(row.seeds, ids):
            both = ok(results, [long_id, base_ids[base.seeds.index(seed)]]) if seed in base.seeds and base_ids else []
            if len(both) == 2:
                pairs.append(both)
        name = f"{GLUE_METRICS[task][0]} {metric}"
        if not pairs:
            body.append([name, label, f"0 of {len(row.seeds)}", "-", "-", "-", "-"])
            continue
        longer, standard = [p[0] for p in pairs], [p[1] for p in pairs]
        gaps = [abs(r["curve"][-1][1] - r["curve"][-2][1]) * 100 for r in longer if len(r["curve"]) >= 2]
        change = 100 * (
            statistics.fmean(r["scores"][metric] for r in longer)
            - statistics.fmean(r["scores"][metric] for r in standard)
        )
        body.append(
            [
                name,
                label,
                f"{len(pairs)} of {len(row.seeds)}",
                f"{cell([r['scores'][metric] for r in standard])} ({standard[0]['curve'][-1][0]} steps)",
                f"{cell([r['scores'][metric] for r in longer])} ({longer[0]['curve'][-1][0]} steps)",
                f"{change:+.1f}",
                ", ".join(f"{g:.2f}" for g in gaps) or "-",
            ]
        )
    return markdown_table(
        [
            "task",
            "row",
            "seeds finished at both lengths",
            "standard schedule",
            "longer schedule",
            "change (points)",
            "last-two gap of the longer run",
        ],
        body,
    )


def longest_schedule_cells(profile: Profile, tables, results) -> tuple[dict, dict[str, int]]:
    """The cells of the rows the longer schedules cover, each task at the longest schedule that FlexLoRA's default,
    LoRA r=8 and AdaLoRA all finished with every seed of the standard one (the switch rows join there, finished or
    not); returns (cells, task -> steps multiple). A task whose compared runs are still partly missing stays at the
    standard length."""
    labels = list(dict.fromkeys(row.label for row in profile.longer))
    compared = [row.label for row in profile.longer if not row.sweep_seeds]  # the switches join, never hold back
    cells, scale = {}, {}
    for task in profile.glue_tasks:
        longer = {row.label: row for row in profile.longer if (row.label, task) in tables["longer"]}
        use_longer = (
            bool(compared)
            and all(label in longer for label in compared)
            and all(
                longer[label].seeds == next(r for r in profile.rows if r.label == label).seeds
                and len(ok(results, tables["longer"][(label, task)])) == len(longer[label].seeds)
                for label in compared
            )
        )
        scale[task] = longer[labels[0]].steps_scale if use_longer else 1
        source = tables["longer"] if use_longer else tables["methods"]
        for label in labels:
            if (label, task) in source:
                cells[(label, task)] = source[(label, task)]
    return cells, scale


def seeds_note(results, *cells: list[str]) -> str:
    """The note " (1 of 3 seeds)" where a cell's runs are not all finished: a verdict on part of the seeds says so."""
    for ids in cells:
        finished = len(ok(results, ids))
        if 0 < finished < len(ids):
            return f" ({finished} of {len(ids)} seeds)"
    return ""


def verdict_table(
    profile: Profile,
    results,
    cells,
    converged: dict[str, bool],
    others: list[Row],
    steps_scale: dict[str, int] | None = None,
    key: str = "scores",
) -> str:
    """FlexLoRA's default row (the first) against each of ``others``, per task and on the GLUE average; a task run on
    a longer schedule (``steps_scale``) says so."""
    flex = profile.rows[0]
    body = []
    tasks = [task for task in profile.glue_tasks if (flex.label, task) in cells]
    for task in tasks:
        metric = GLUE_METRICS[task][1][0]
        mine = scores(results, cells[(flex.label, task)], metric, key)
        scale = (steps_scale or {}).get(task, 1)
        body.append(
            [
                f"{GLUE_METRICS[task][0]} {metric}"
                + (f" ({scale}x steps)" if scale != 1 else "")
                + ("" if converged.get(task) else " (not converged)")
            ]
            + [
                verdict(mine, scores(results, cells[(row.label, task)], metric, key))
                + seeds_note(results, cells[(flex.label, task)], cells[(row.label, task)])
                if (row.label, task) in cells
                else "not measured"
                for row in others
            ]
        )

    def averages(label):  # per seed, the mean over tasks of the main metric
        per_seed = []
        for position in range(len(flex.seeds)):
            values = []
            for task in tasks:
                ids = cells.get((label, task), [])
                done = ok(results, ids[position : position + 1])
                if done and GLUE_METRICS[task][1][0] in done[0].get(key, {}):
                    values.append(done[0][key][GLUE_METRICS[task][1][0]])
            if len(values) == len(tasks):
                per_seed.append(statistics.fmean(values))
        return per_seed

    if tasks:
        body.append(["GLUE average"] + [verdict(averages(flex.label), averages(row.label)) for row in others])
    return markdown_table(["task", *[f"{flex.label.split(',')[0]} vs {row.label}" for row in others]], body)


def switch_decision_table(profile: Profile, results, cells, steps_scale: dict[str, int]) -> str:
    """The rule that makes a switch (a row with its own lr sweep) FlexLoRA's default, criterion by criterion: better
    than the default on every task, not worse than LoRA r=8 on any, and diverging at no lr multiple where the
    default's sweep does not; each task at the schedule the verdicts use (``cells``, ``steps_scale``). A criterion
    is judged only on finished cells and sweeps (every seed); a failed one decides, one not measured yet leaves the
    decision open."""
    default, lora = profile.rows[0], next(row for row in profile.rows if row.method == "lora")
    diverged = diverged_runs(profile, results)
    sweeps_done = best_multiples(profile, results)

    def against(switch: Row, other: Row, holds) -> list[tuple[bool | None, str]]:
        """Per task: whether ``holds`` of the verdict of ``switch`` against ``other`` (None: a cell not finished)."""
        found = []
        for task in profile.glue_tasks:
            metric = GLUE_METRICS[task][1][0]
            ids = [cells.get((row.label, task), []) for row in (switch, other)]
            finished = all(cell_ids and len(ok(results, cell_ids)) == len(cell_ids) for cell_ids in ids)
            outcome = verdict(*(scores(results, cell_ids, metric) for cell_ids in ids)) if finished else "not measured"
            scale = steps_scale.get(task, 1)
            name = GLUE_METRICS[task][0] + (f" {scale}x" if scale != 1 else "")
            found.append((None if outcome == "not measured" else holds(outcome), f"{name} {outcome.split(' (')[0]}"))
        return found

    def divergence(switch: Row) -> list[tuple[bool | None, str]]:
        if not {switch.lr_method, default.lr_method} <= set(sweeps_done):
            return [(None, "sweeps not finished")]
        extra = sorted(
            {run.lr_multiple for run in diverged[switch.lr_method]}
            - {run.lr_multiple for run in diverged[default.lr_method]}
        )
        return [(False, "diverges at " + ", ".join(f"x {m:g}" for m in extra))] if extra else [(True, "none")]

    def judged(outcomes: list[tuple[bool | None, str]]) -> tuple[str, str]:
        passed = [p for p, _ in outcomes]
        state = "no" if False in passed else "not measured yet" if None in passed else "yes"
        return state, f"{state}: " + ", ".join(text for _, text in outcomes)

    body = []
    for row in (r for r in profile.rows if r.sweep_seeds):
        criteria = [
            judged(against(row, default, lambda outcome: outcome.startswith("**better**"))),
            judged(against(row, lora, lambda outcome: "**worse**" not in outcome)),
            judged(divergence(row)),
        ]
        states = {state for state, _ in criteria}
        decision = (
            "stays a switch"
            if "no" in states
            else "open: not measured yet"
            if "not measured yet" in states
            else "**becomes the default**"
        )
        body.append([row.label, *(text for _, text in criteria), decision])
    return markdown_table(
        [
            "switch",
            "better than the default on every task",
            f"not worse than {lora.label} on any task",
            "diverges at no lr where the default does not",
            "decision",
        ],
        body,
    )


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
        body.append(
            (
                GLUE_METRICS[task][0],
                label,
                len(done),
                statistics.fmean(r["rank_moves"] for r in done),
                f"{sum(r['expansions_pruned_next'] for r in done)} / {expansions}" if row.method == "flexlora" else "-",
                by_kind,
            )
        )
    header = ["task", "row", "runs", "rank moves per run", "expansions pruned at the next step"] + kinds
    return markdown_table(
        header,
        [
            [t, label, n, f"{moves:.0f}", again]
            + [f"{statistics.fmean(k[kind]):.2f}" if kind in k else "-" for kind in kinds]
            for t, label, n, moves, again, k in body
        ],
    )


def update_table(results, cells) -> str:
    """Per row and task: the learned update's size and effective rank at the end (runs that have them)."""
    body = []
    for (label, task), ids in cells.items():
        done = [r for r in ok(results, ids) if "update_relative_norm" in r]
        if done:
            body.append(
                [
                    GLUE_METRICS[task][0],
                    label,
                    len(done),
                    f"{100 * statistics.fmean(r['update_relative_norm'] for r in done):.2f}",
                    f"{statistics.fmean(r['update_effective_rank'] for r in done):.2f}",
                    cell([r["scores"][GLUE_METRICS[task][1][0]] for r in done]),
                ]
            )
    if not body:
        return "(no run has them yet)"
    return markdown_table(
        [
            "task",
            "row",
            "runs",
            "‖dW‖_F / ‖W‖_F, % (mean over matrices)",
            "effective rank of dW",
            "score of those runs",
        ],
        body,
    )


def constant_answer_shares(profile: Profile) -> dict[str, float]:
    """Per commonsense task: the accuracy of always giving its most common gold answer on the items the runs score
    (the first ``eval.limit`` of the dev split); tasks whose local dev file is not there are left out."""
    overrides = [f"{key}={value}" for key, value in profile.cr_overrides.items()]
    config = load_config(RecipeConfig, ROOT / profile.cr_config, overrides)  # the yaml leaves defaults unstated
    data_dir = ROOT / (config.eval.data_dir or config.data.path)
    limit = config.eval.limit
    shares = {}
    for task, _ in CR_TASKS:
        try:
            path = local_task_file(data_dir, task, config.eval.split)
        except FileNotFoundError:
            continue
        answers = [row["answer"] for row in load_rows(path, require_answer=True)[0][:limit]]
        shares[task] = Counter(answers).most_common(1)[0][1] / len(answers)
    return shares


def commonsense_table(profile: Profile, results, cells) -> str:
    constant = constant_answer_shares(profile)
    beats_constant = False
    header = (
        ["method", "seeds", "items per task"]
        + [short for _, short in CR_TASKS]
        + ["avg", "tasks above the constant answer"]
    )
    body = []
    for method in METHODS:
        done = ok(results, cells[method])
        items = sorted({n for r in done for n in r.get("items_per_task", {}).values() if n})
        averages = [statistics.fmean(r["scores"].values()) for r in done if r["scores"]]
        means = {
            task: statistics.fmean(values) for task, _ in CR_TASKS if (values := scores(results, cells[method], task))
        }
        above = sum(means[task] > share + 1e-9 for task, share in constant.items() if task in means)
        beats_constant |= above > 0
        body.append(
            [method, len(done), ", ".join(map(str, items)) or "-"]
            + [cell(scores(results, cells[method], task)) for task, _ in CR_TASKS]
            + [cell(averages), f"{above} of {len(constant)}" if done and constant else "-"]
        )
    body.append(
        ["always the most common gold answer", "-", "-"]
        + [cell([constant[task]]) if task in constant else "-" for task, _ in CR_TASKS]
        + [cell([statistics.fmean(constant.values())]) if len(constant) == len(CR_TASKS) else "-", "-"]
    )
    averages = {
        m: [statistics.fmean(r["scores"].values()) for r in ok(results, cells[m]) if r["scores"]] for m in METHODS
    }
    verdicts = markdown_table(
        ["", "FlexLoRA vs LoRA", "FlexLoRA vs AdaLoRA"],
        [
            [
                "commonsense avg"
                + (
                    ""
                    if beats_constant or not constant
                    else " (no method above the constant answer on any task: ranks nothing)"
                ),
                verdict(averages["flexlora"], averages["lora"]),
                verdict(averages["flexlora"], averages["adalora"]),
            ]
        ],
    )
    return markdown_table(header, body) + "\n\n" + verdicts


def curves_section(results, runs: list[Run]) -> str:
    lines = [
        f"- `{run.id}`: " + " ".join(f"{step}:{100 * value:.1f}" for step, value in results[run.id]["curve"])
        for run in runs
        if results.get(run.id, {}).get("status") == "ok" and results[run.id].get("curve")
    ]
    return "\n".join(lines) or "(none yet)"


# Table 1 of the paper (DeBERTaV3-base, GLUE dev sets, mean of 5 seeds): CoLA MCC, MRPC acc., RTE acc., STS-B corr.
PAPER_TABLE1 = {
    "LoRA r=8": ("68.5 ± 0.6", "90.7 ± 0.7", "84.8 ± 0.6", "91.2 ± 0.3"),
    "AdaLoRA": ("70.0 ± 1.8", "90.9 ± 1.5", "88.1 ± 0.9", "91.2 ± 0.3"),
    "FlexLoRA": ("71.8 ± 0.9", "90.9 ± 0.6", "88.8 ± 0.7", "91.5 ± 0.1"),
}


def paper_reference_table() -> str:
    return markdown_table(
        ["paper, DeBERTaV3-base (184M)", "CoLA matthews_correlation", "MRPC accuracy", "RTE accuracy", "STS-B corr."],
        [[row, *values] for row, values in PAPER_TABLE1.items()],
    )


def report(
    profile_name: str,
    profile: Profile,
    command: str,
    results: dict[str, dict],
    wall_s: float,
    loads: tuple[str, str],
    jobs: int,
    threads: int,
    device: str = "cpu",
) -> str:
    runs, tables, waiting = plan(profile, results)
    done = [run for run in runs if is_done(run, results)]
    planned, estimate = full_plan_size(profile)
    finished_times = sorted(results[run.id]["finished"] for run in done)
    parts = [
        f"# Quality at equal budget: FlexLoRA vs PEFT LoRA / AdaLoRA (`--{profile_name.replace('_', ' --')}`)",
        f"Profile: {profile.note}. Every cell is mean ± sample std over seeds, x 100. Same budget: r = 8 on every "
        "target matrix (LoRA rank 8; FlexLoRA capacity 12 with 8 active; AdaLoRA init_r 12 -> target_r 8), same steps, "
        "schedule and data; the lr is each method's best multiple of the task config's lr on the "
        f"{GLUE_METRICS[profile.sweep_task][0]} sweep (validation split, seed 0).",
        provenance(command, device, wall_s, loads),
        f"Runs: {len(done)} of {planned} finished ({estimate / 3600:.1f} h of run time estimated for all of them, "
        f"{estimate / 3600 / max(jobs, 1):.1f} h of wall time at {jobs} at a time); "
        f"{sum(results[run.id]['seconds'] for run in done) / 3600:.1f} h of run time summed over the finished runs"
        + (f", finished between {finished_times[0]} and {finished_times[-1]}" if finished_times else "")
        + f"; runs {jobs} at a time, {threads or 'the default number of'} torch thread(s) each"
        + "; devices of the finished runs: "
        + (
            ", ".join(
                f"{name} ({count})"
                for name, count in Counter(results[run.id].get("device", "cpu") for run in done).items()
            )
            or "none"
        )
        + "."
        + (f" Waiting for an lr sweep: {', '.join(waiting)}." if waiting else ""),
        f"## lr sweep ({GLUE_METRICS[profile.sweep_task][0]} {GLUE_METRICS[profile.sweep_task][1][0]}, "
        "validation split)",
        "Each method's sweep runs seed 0, each switch's its own seeds; the chosen multiple has the best mean. A run "
        f"counts as diverged when it stopped on a non-finite loss or ended more than {DIVERGED_POINTS} points below "
        "its sweep's best mean. Users rarely tune the lr finely: the wider the range within 1 point of the best, the "
        "better the method tolerates an untuned lr.",
        sweep_table(profile, results, tables),
    ]
    failed = [r for r in results.values() if r.get("status") == "failed"]
    if failed:
        parts.append(
            "**Failed runs:**\n\n" + "\n".join(f"- `{r['id']}`: {r['error']} (log {r['log']})" for r in failed)
        )
    tasks = [task for task in profile.glue_tasks]
    convergence, converged = convergence_table(profile, results, tables["methods"])
    parts += [
        "## GLUE: methods at equal budget (Table 1 layout)",
        "The score after the last step (final), the number a user of the trained adapter gets."
        + (" Best below: the best of the per-epoch evaluations." if profile.paper_reference else ""),
        methods_table(profile, results, tables["methods"], profile.rows, tasks),
    ]
    if profile.paper_reference:
        parts += [
            "## GLUE: the best evaluation of each run (what the paper's Table 1 reports)",
            "The paper does not say which score Table 1 holds. Its lineage (AdaLoRA's and LoRA's GLUE scripts, "
            "which evaluate every epoch and keep the best) and the field's custom report the best dev-set "
            "evaluation, so this table is the one to hold against the paper; the final one above is what a run "
            "without dev-set selection gives.",
            methods_table(profile, results, tables["methods"], profile.rows, tasks, "best_scores"),
            "The paper's own Table 1 rows, as a reference: another model (DeBERTaV3-base, 184M, against "
            "MiniLM's 22M), so only the ordering compares.",
            paper_reference_table(),
        ]
    parts += [
        "## Did the runs converge?",
        "Each run is scored every `eval.every_n_steps` and after its last step; a "
        f"task counts as converged when LoRA r=8's last two scores differ by < {CONVERGED_POINTS} point in every "
        "seed. The seed mean's gap is shown beside it: on a small dev set one seed's score moves by whole items "
        "(one MRPC item is 0.25 point), and the mean over seeds is the number the tables report.",
        convergence,
        "## Did FlexLoRA win?",
        "Better / worse only when the difference of means exceeds the larger seed std of "
        "the two; with one seed on both sides there is no std and any difference counts.",
        verdict_table(
            profile,
            results,
            tables["methods"],
            converged,
            [row for row in profile.rows[1:] if row.method in ("lora", "adalora")],
        ),
    ]
    if profile.paper_reference:
        parts += [
            "The same verdicts on the best evaluation of each run:",
            verdict_table(
                profile,
                results,
                tables["methods"],
                converged,
                [row for row in profile.rows[1:] if row.method in ("lora", "adalora")],
                key="best_scores",
            ),
        ]
    parts += [
        "## FlexLoRA's default against its variants",
        "The same rule; **better** means the default beats the variant, **worse** that the variant beats the "
        'default. Whether a switch becomes the default: see "Does a switch become the default?" below.',
        verdict_table(
            profile,
            results,
            tables["methods"],
            converged,
            [row for row in profile.rows[1:] if row.method == "flexlora"],
        ),
    ]
    # each task at the longest schedule every compared row finished (the verdicts' schedule)
    cells, scale = longest_schedule_cells(profile, tables, results) if profile.longer else (tables["methods"], {})
    if profile.longer:
        parts += [
            "## Longer schedule: do the scores still move?",
            "The same row and seed with the optimizer steps multiplied (allocation schedule scaled along, linear "
            "decay to 0 at the new end, scored at the same interval). A baseline whose final score does not change "
            "had converged at the standard length; a FlexLoRA score that rises here learns slower rather than "
            "reaching less.",
            longer_table(profile, results, tables),
        ]
        if any(s != 1 for s in scale.values()):
            verdict_rows = [row for row in profile.rows if (row.label, next(iter(profile.glue_tasks))) in cells]
            convergence, converged = convergence_table(profile, results, cells)
            parts += [
                "## Did FlexLoRA win at the longer schedule?",
                "The rows the verdicts compare, each task at the longest schedule all of them ran with every "
                "seed: " + ", ".join(f"{GLUE_METRICS[t][0]} {s}x" for t, s in scale.items()) + " the standard "
                "steps. Same convergence rule and same verdict rule as above.",
                methods_table(profile, results, cells, tuple(verdict_rows), list(profile.glue_tasks)),
                convergence,
                verdict_table(
                    profile,
                    results,
                    cells,
                    converged,
                    [row for row in verdict_rows if row.method in ("lora", "adalora")],
                    scale,
                ),
                "FlexLoRA's default against its variants at that schedule (**worse** means the variant wins):",
                verdict_table(
                    profile,
                    results,
                    cells,
                    converged,
                    [row for row in verdict_rows if row.method == "flexlora"][1:],
                    scale,
                ),
            ]
    if any(row.sweep_seeds for row in profile.rows):
        lora = next(row for row in profile.rows if row.method == "lora")
        parts += [
            "## Does a switch become the default?",
            "The rule, each task at the schedule the verdicts use, on finished cells only (every seed): better than "
            f"FlexLoRA's default on every task, not worse than {lora.label} on any, and diverging at no lr where the "
            f"default's sweep does not (a run more than {DIVERGED_POINTS} points below its sweep's best counts as "
            "diverged; a switch's sweep runs 2 seeds, the default's 1, so a switch has more chances to diverge).",
            switch_decision_table(profile, results, cells, scale),
        ]
    if profile.ablations:
        switch_cells = {**tables["methods"], **tables["ablations"]}
        parts += [
            "## FlexLoRA switches (importance metric, prune / expand, expansion init; paper Tables 4-6)",
            methods_table(
                profile, results, switch_cells, (profile.rows[0], *profile.ablations), list(profile.ablation_tasks)
            ),
        ]
        if profile.paper_reference:
            parts += [
                "The same, best evaluation of each run:",
                methods_table(
                    profile,
                    results,
                    switch_cells,
                    (profile.rows[0], *profile.ablations),
                    list(profile.ablation_tasks),
                    "best_scores",
                ),
            ]
    parts += [
        "## Allocation: rank moves, re-pruned expansions, final rank per matrix kind (mean over layers and runs; "
        "FlexLoRA starts every matrix at 8 active directions, AdaLoRA at 12)",
        allocation_table(results, {**tables["methods"], **tables["ablations"]}, (*profile.rows, *profile.ablations)),
        "## Learned update at the end of training",
        "Read off each run's PEFT export with PEFT's `get_delta_weight` (the same code for every method): how far "
        "the adapted matrices moved, and over how many directions (exp of the entropy of dW's normalised "
        "singular values; at most the rank).",
        update_table(results, {**tables["methods"], **tables["ablations"]}),
    ]
    if profile.cr_seeds:
        parts += [
            "## Commonsense reasoning (Table 2 layout, LLM-Adapters protocol, accuracy)",
            "The last line is what always giving a task's most common gold answer scores on the same items: a "
            "method at or below it on a task has learned nothing there that ranks it.",
            commonsense_table(profile, results, tables["commonsense"]),
        ]
    parts += ["## Validation curves (step:score x 100, every run)", curves_section(results, runs)]
    return "\n\n".join(parts) + "\n"
