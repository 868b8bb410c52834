"""The bench/ scripts run end to end (--smoke, tiny random Llama) and write well-formed reports.

Timings are never asserted: they depend on the machine. Only the structure and sanity of the output are.
"""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import GLUE_DIR, TARGETS, make_tiny_llama, needs_glue_data
from tiny_models import build_tiny_model_dir

import flexlora
from bench.comm_volume import LLAMA3_8B, LLAMA3_70B, base_parameters, multinode_row
from bench.common import llama3_8b_slice, target_shapes, time_decision
from bench.quality_plan import GLUE_METRICS, PROFILES, Run, best_multiples, load_results, plan, sweep_runs
from bench.quality_report import (
    cell,
    constant_answer_shares,
    longest_schedule_cells,
    seed_mean_gap,
    switch_decision_table,
    verdict,
)
from bench.quality_runner import allocation_statistics, prepare_output_dir, start_order
from flexlora.distributed import lambda_gather_payload

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["flexlora", "flexlora_cap8", "flexlora_no_orth", "lora_r8", "lora_r12", "adalora"]


def run_bench(module: str, out: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, separator dropped)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            found.append([row for row in current if not all(re.fullmatch(r"-+", c) for c in row)])
            current = []
    return found


def table_with(markdown: str, first_header: str, column: str) -> list[dict[str, str]]:
    for table in tables(markdown):
        if table[0][0] == first_header and column in table[0]:
            return [dict(zip(table[0], row)) for row in table[1:]]
    raise AssertionError(f"no table with columns {first_header!r} and {column!r}")


def number(cell: str) -> float:
    value = float(cell.split()[0].rstrip("%"))
    assert math.isfinite(value), cell
    return value


def check_well_formed(markdown: str) -> None:
    for table in tables(markdown):
        assert len(table) >= 2, table
        assert all(len(row) == len(table[0]) for row in table), table
    for heading in ("Command", "Date", "flexlora", "CPU", "torch / transformers / peft", "Load average at start"):
        assert re.search(rf"^\| {re.escape(heading)} \| \S", markdown, re.MULTILINE), heading


@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    run_bench("bench.overhead", out)
    return (out / "overhead.md").read_text()


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    run_bench("bench.scaling", out)
    return out


def test_overhead_report(overhead):
    check_well_formed(overhead)
    assert "`python -m bench.overhead --smoke" in overhead
    steps = table_with(overhead, "method", "step ms")
    assert [row["method"] for row in steps] == METHODS
    assert all(number(row["step ms"]) > 0 for row in steps)
    ratios = table_with(overhead, "method", "/ lora_r8")
    assert number(next(r for r in ratios if r["method"] == "lora_r8")["/ lora_r8"]) == 1.0
    parts = {row["part"]: number(row["ms"]) for row in table_with(overhead, "part", "% of a step")}
    assert parts["**`allocator.step` at an allocation step**"] > 0
    memory = table_with(overhead, "method", "peak MiB")
    assert [row["method"] for row in memory] == METHODS
    assert all(number(row["peak MiB"]) >= number(row["base MiB"]) > 0 for row in memory)
    layer = table_with(overhead, "d_in -> d_out", "lora_r8 us")
    assert {row["d_in -> d_out"] for row in layer} == {"32 -> 32", "32 -> 16", "32 -> 64", "64 -> 32"}
    targets = table_with(overhead, "target", "verdict")
    assert len(targets) == 6
    # (a noisy ratio adds "(bound inside the 25-75 % range: not resolved)")
    assert all(row["verdict"].split(" (")[0] in ("met", "**missed**", "-") for row in targets), targets


def test_scaling_report(scaling):
    markdown = (scaling / "scaling.md").read_text()
    check_well_formed(markdown)
    measured = table_with(markdown, "N", "decide")
    assert [(row["N"], row["R"]) for row in measured] == [("10", "12"), ("100", "12")]
    assert all(number(row["step"]) > 0 and number(row["decide"]) > 0 for row in measured)
    comm = table_with(markdown, "model", "lambda gather B")
    assert {(row["model"], row["r"], row["world"]) for row in comm} == {
        (m, r, w) for m in ("LLaMA3-8B", "LLaMA3-70B") for r in ("8", "32") for w in ("8", "64")
    }
    for row in comm:
        layers = 32 if row["model"] == "LLaMA3-8B" else 80
        assert int(row["N"]) == 5 * layers  # q, k, v, up, down in every decoder layer
        assert int(row["N x R x 4 B"]) == int(row["N"]) * int(row["R"]) * 4
        assert int(row["lambda gather B"]) >= int(row["N x R x 4 B"])  # one float32 per slot; padding only adds
        assert int(row["per allocation B"]) == int(row["lambda gather B"]) + 16
    assert (scaling / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bench/quality.py: the sweep on MiniLM + a tiny random Llama, a few steps per run --------------------
ROWS = [
    "FlexLoRA r=8 (cap 12), mean_norm",
    "FlexLoRA r=8 (cap 12), eq2_sum",
    "LoRA r=8",
    "AdaLoRA 12->8",
    "LoRA r=12 (equal capacity)",
    "FlexLoRA, allocation frozen",
]


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    model = build_tiny_model_dir(out / "tiny_llama")
    args = ["--work-dir", str(out / "work"), "--set-cr", f"model.path={model}", "--set-cr", "model.gguf_file=null"]
    args += ["--data-dir", str(GLUE_DIR)]
    first = run_bench("bench.quality", out, *args)
    report = (out / "quality_smoke.md").read_text()
    again = run_bench("bench.quality", out, *args)
    return report, first, again, out


@needs_glue_data
def test_quality_report_has_every_table_at_equal_budget(quality):
    report, _, _, out = quality
    check_well_formed(report)
    assert "`python -m bench.quality --smoke" in report
    sweep = table_with(report, "sweep", "chosen")
    assert [row["sweep"] for row in sweep] == ["lora", "adalora", "flexlora"]
    assert all(row["seeds"] == "0" and row["diverged runs"] == "none" for row in sweep)
    assert all(re.fullmatch(r"x [12](\.0)?( \(grid edge\))?", row["chosen"]) for row in sweep)

    methods = table_with(report, "row", "STS-B pearson")
    assert [row["row"] for row in methods][:6] == ROWS
    params = {row["row"]: int(row["adapter params"].replace(",", "")) for row in methods}
    assert params[ROWS[0]] == params["AdaLoRA 12->8"] > params["LoRA r=8"]  # capacity 12 (+ lambda) vs rank 8
    assert abs(params["LoRA r=12 (equal capacity)"] - params[ROWS[0]]) < 0.01 * params[ROWS[0]]
    assert all(-100 <= number(row["STS-B pearson"]) <= 100 for row in methods)
    switches = report.split("## FlexLoRA switches")[1].split("##")[0]
    assert f"| {ROWS[0]} | 1 |" in switches and "| importance=nuclear | 1 |" in switches

    convergence = table_with(report, "task", "LoRA r=8: last-two gap per seed (points)")
    assert [row["task"] for row in convergence] == ["STS-B"] and convergence[0]["converged (< 0.5)"] in ("yes", "no")
    assert convergence[0]["of its seed mean"] == "-"  # one seed: no mean curve
    verdicts = table_with(report, "task", "FlexLoRA r=8 (cap 12) vs LoRA r=8")
    assert [row["task"].split(" (")[0] for row in verdicts] == ["STS-B pearson", "GLUE average"]
    assert all(
        re.match(r"(\*\*better\*\*|\*\*worse\*\*|within noise|equal) \(", row["FlexLoRA r=8 (cap 12) vs LoRA r=8"])
        for row in verdicts
    )

    allocation = {row["row"]: row for row in table_with(report, "task", "expansions pruned at the next step")}
    moved = allocation[ROWS[0]]
    assert int(moved["rank moves per run"]) > 0 and re.fullmatch(
        r"\d+ / \d+", moved["expansions pruned at the next step"]
    )
    assert allocation["FlexLoRA, allocation frozen"]["rank moves per run"] == "0"
    assert all(1 <= number(moved[kind]) <= 12 for kind in "QKVAIO")

    variants = table_with(report, "task", "FlexLoRA r=8 (cap 12) vs FlexLoRA, lambda lr x 10")
    assert [row["task"].split()[0] for row in variants] == ["STS-B", "GLUE"]

    updates = {row["row"]: row for row in table_with(report, "task", "effective rank of dW")}
    assert set(updates) >= {ROWS[0], "LoRA r=8", "AdaLoRA 12->8"}
    assert all(
        number(row["‖dW‖_F / ‖W‖_F, % (mean over matrices)"]) > 0 and 1 <= number(row["effective rank of dW"]) <= 12
        for row in updates.values()
    )

    longer = table_with(report, "task", "longer schedule")
    assert [(row["task"], row["row"]) for row in longer] == [
        ("STS-B pearson", label) for label in (ROWS[0], "LoRA r=8", "AdaLoRA 12->8")
    ]
    assert all(row["seeds finished at both lengths"] == "1 of 1" for row in longer)
    assert longer[0]["standard schedule"].endswith("(4 steps)") and longer[0]["longer schedule"].endswith("(8 steps)")
    assert re.fullmatch(r"[+-]\d+\.\d", longer[0]["change (points)"])
    # the verdicts again, every task at the longest schedule all verdict rows ran: here STS-B at 2x
    at_longer = report.split("## Did FlexLoRA win at the longer schedule?")[1].split("\n## ")[0]
    assert [row["row"] for row in table_with(at_longer, "row", "STS-B pearson")] == [
        ROWS[0],
        "LoRA r=8",
        "AdaLoRA 12->8",
    ]
    verdicts = table_with(at_longer, "task", "FlexLoRA r=8 (cap 12) vs AdaLoRA 12->8")
    assert [row["task"].split(" (not")[0] for row in verdicts] == ["STS-B pearson (2x steps)", "GLUE average"]

    commonsense = table_with(report, "method", "BoolQ")
    assert [row["method"] for row in commonsense] == [
        "lora",
        "adalora",
        "flexlora",
        "always the most common gold answer",
    ]
    assert all(0 <= number(row[c]) <= 100 for row in commonsense for c in ("BoolQ", "OBQA", "avg"))
    assert all(re.fullmatch(r"[0-8] of 8", row["tasks above the constant answer"]) for row in commonsense[:3])
    assert re.search(r"- `glue-stsb-lora-lr1x-s0`: 2:-?\d+\.\d 4:-?\d+\.\d", report)  # the curve of every run

    stored = sorted(p.name for p in (out / "quality_smoke_runs").iterdir())
    results = json.loads((out / "quality_smoke.json").read_text())["runs"]
    assert all(run["status"] == "ok" for run in results), [r for r in results if r["status"] != "ok"]
    # lr sweep 3 methods x 2; 7 methods-table rows at their chosen lr, 3 of them the sweep's runs; 1 switch;
    # 3 longer schedules; commonsense 3
    assert len(results) == len(stored) == 6 + 4 + 1 + 3 + 3
    assert all(run["commit"] and run["args"] and "output_dir" not in " ".join(run["args"]) for run in results)


@needs_glue_data
def test_paper_schedule_smoke_scores_every_epoch_and_reports_final_and_best(tmp_path):
    """--paper --smoke: Table 8's structure (epochs, per-epoch scoring, final and best, the paper's own rows)."""
    run_bench(
        "bench.quality",
        tmp_path,
        "--paper",
        "--work-dir",
        str(tmp_path / "work"),
        "--data-dir",
        str(GLUE_DIR),
    )
    report = (tmp_path / "quality_paper_smoke.md").read_text()
    check_well_formed(report)
    final = table_with(report, "row", "RTE accuracy")
    assert [row["row"] for row in final][:3] == ["FlexLoRA r=8 (cap 12), mean_norm", "LoRA r=8", "AdaLoRA 12->8"]
    best = report.split("## GLUE: the best evaluation of each run")[1].split("## ")[0]
    assert "| LoRA r=8 | 1 |" in best and "| FlexLoRA | 71.8 ± 0.9 | 90.9 ± 0.6 | 88.8 ± 0.7 | 91.5 ± 0.1 |" in best
    assert "| FlexLoRA, orthonormal start + lambda lr auto | 1 |" in report.split("## FlexLoRA switches")[1]
    results = {r["id"]: r for r in json.loads((tmp_path / "quality_paper_smoke.json").read_text())["runs"]}
    assert len(results) == 3 * 2 + 1 and all(r["status"] == "ok" for r in results.values()), results
    for run in results.values():  # 2 epochs of 4 steps, scored after each; the best is one of those evaluations
        assert [step for step, _ in run["curve"]] == [4, 8] and run["best_step"] in (4, 8)
        main = next(iter(run["best_scores"]))
        assert run["best_scores"][main] == max(score for _, score in run["curve"])
        assert {"train.epochs=2", "eval.every_n_steps=4", "train.warmup_ratio=0.1"} <= set(run["args"])
    # the full schedule is sized for a GPU: on a CPU it states its estimate and refuses without --force
    if torch.cuda.is_available():
        return
    refused = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--paper", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and re.search(
        r"its 72 runs would take about \d+ h .* or add --force", refused.stderr
    )


@needs_glue_data
def test_quality_sweep_resumes_instead_of_rerunning(quality):
    _, first, again, _ = quality
    assert "17 runs in all, 0 finished, 9 to run now and more once the lr sweep has chosen" in first
    assert re.search(r"the 9 to run now: estimated \d+\.\d h of wall time at 1 at a time", first)
    assert "17 runs in all, 17 finished, 0 to run now" in again
    assert "to run now: estimated" not in again


def test_quality_run_output_dir_is_reused_only_by_the_same_run(tmp_path):
    out = tmp_path / "glue-cola-lora-lr1x-s0"
    old = Run(out.name, "glue", "cola", "lora", 0, 1.0, ("--config", "c.yaml", "train.max_steps=540"))
    prepare_output_dir(old, out)
    (out / "checkpoint-540").mkdir()
    prepare_output_dir(old, out)  # the same run, interrupted: its checkpoint stays for the resume
    assert (out / "checkpoint-540").is_dir()
    longer = Run(out.name, "glue", "cola", "lora", 0, 1.0, ("--config", "c.yaml", "train.max_steps=1068"))
    prepare_output_dir(longer, out)  # same id, other settings: starts from an empty directory
    assert sorted(path.name for path in out.iterdir()) == ["bench_run_args.json"]
    (tmp_path / "unlabelled" / "checkpoint-9").mkdir(parents=True)  # written before runs were labelled
    prepare_output_dir(Run("unlabelled", "glue", "cola", "lora", 0, 1.0, ()), tmp_path / "unlabelled")
    assert not (tmp_path / "unlabelled" / "checkpoint-9").exists()


def test_quality_verdicts_cells_and_the_plan_by_hand(tmp_path):
    assert cell([]) == "-"
    assert cell([0.5]) == "50.0"
    assert cell([0.5, 0.7]) == "60.0 ± 14.1"  # sample std of 50 and 70
    assert cell([0.5, 0.7], planned=3) == "60.0 ± 14.1 (2 of 3)" and cell([0.5, 0.7], planned=2) == "60.0 ± 14.1"
    assert verdict([0.80, 0.82], [0.70, 0.72]).startswith("**better** (+10.0, std 1.4)")
    assert verdict([0.70, 0.72], [0.80, 0.82]).startswith("**worse** (-10.0")
    assert verdict([0.70, 0.80], [0.74, 0.76]).startswith("within noise (+0.0")
    assert verdict([0.6], [0.5]) == "**better** (+10.0, one seed)"
    assert verdict([0.5], [0.5]) == "equal (+0.0, one seed)"
    assert verdict([], [0.5]) == "not measured"
    # seeds that move in opposite directions (2 points up, 1 down): their mean moves 0.5
    assert seed_mean_gap([[[10, 0.70], [20, 0.72]], [[10, 0.73], [20, 0.72]]]) == pytest.approx(0.5)
    assert seed_mean_gap([[[10, 0.70], [20, 0.72]]]) is None  # one seed
    assert seed_mean_gap([[[10, 0.70], [20, 0.72]], [[10, 0.73], [30, 0.72]]]) is None  # scored at other steps

    profile = PROFILES["cpu"]
    runs, tables, waiting = plan(profile, {})
    # the sweeps (3 methods x 4 lrs, 3 switches x 4 lrs x 2 seeds) and commonsense; the rest (7 rows, 3 switches) waits
    assert len(runs) == 3 * 4 + 3 * 4 * 2 + 3 * 2 and len(waiting) == 7 + 3
    # the sweep picks x 2 for FlexLoRA (its seed-0 STS-B run is reused), x 0.5 for LoRA and AdaLoRA; each switch by
    # the mean of its two seeds: x 4 wins for "lambda lr auto" (0.75, 0.75) over x 1 (0.9 and a divergence)
    picked = {
        "lora": 0.5,
        "adalora": 0.5,
        "flexlora": 2.0,
        "FlexLoRA, orthonormal start": 1.0,
        "FlexLoRA, lambda lr auto": 4.0,
        "FlexLoRA, orthonormal start + lambda lr auto": 0.5,
    }
    results = {
        run.id: {
            "status": "ok",
            "args": list(run.args),
            "scores": {"pearson": 0.8 if run.lr_multiple == picked[key] else 0.7},
        }
        for key, sweep in sweep_runs(profile).items()
        for run in sweep
    }
    auto = {run.lr_multiple: run for run in sweep_runs(profile)["FlexLoRA, lambda lr auto"] if run.seed == 1}
    results[auto[1.0].id] = {"status": "diverged", "args": list(auto[1.0].args)}
    results[auto[1.0].id.replace("-s1", "-s0")]["scores"]["pearson"] = 0.9
    assert best_multiples(profile, results) == picked
    assert not best_multiples(profile, {k: v for k, v in results.items() if k != auto[4.0].id}).get(
        "FlexLoRA, lambda lr auto"
    )
    runs, tables, waiting = plan(profile, results)
    assert not waiting and len(runs) == len({run.id for run in runs})
    flex = tables["methods"][("FlexLoRA r=8 (cap 12), mean_norm", "stsb")]
    assert flex[0] == "glue-stsb-flexlora-lr2x-s0" and len(flex) == 3  # seed 0 is the sweep's run
    eq2 = next(run for run in runs if run.id == "glue-cola-flexlora-orth_regeq2_sum-lr2x-s1")
    assert {"adapter.orth_reg=eq2_sum", "train.seed=1", "adapter.seed=1", "train.lr=0.0016"} <= set(
        eq2.args
    )  # 2 x 8e-4
    lora12 = next(run for run in runs if run.id == "glue-mrpc-lora-r12-lr0.5x-s0")
    assert {"adapter.r=12", "train.lr=0.0005", "train.batch_size=32", "train.max_steps=348"} <= set(lora12.args)
    # twice the steps, the allocation schedule along, scored as often: 24 scores instead of 12
    longer = next(run for run in runs if run.id == "glue-mrpc-lora-steps2x-lr0.5x-s0")
    assert {
        "train.max_steps=696",
        "eval.every_n_steps=29",
        "adapter.t_warmup=139",
        "adapter.t_final=139",
        "adapter.delta_t=28",
        "train.seed=0",
    } <= set(longer.args)
    # 12 + 24 sweep + 6 commonsense + 3 tasks x (5 rows x 3 seeds + 2 single) - 3 sweep runs reused
    # + 3 switches x 3 tasks x 3 seeds - 3 x 2 sweep runs reused (STS-B, seeds 0 and 1 at the chosen lr)
    # + (3 verdict rows + 3 switches) x 3 tasks x 3 seeds at twice the steps
    assert len(runs) == 12 + 24 + 6 + 3 * 17 - 3 + 27 - 6 + 54
    switch = next(
        run for run in runs if run.id == "glue-cola-flexlora-factor_initorthonormal-lambda_lr_multiplierauto-lr0.5x-s2"
    )
    assert {"adapter.factor_init=orthonormal", "train.lambda_lr_multiplier=auto", "train.lr=0.0004"} <= set(switch.args)
    # start order: lr sweeps, the rows the verdicts compare, the early switch, commonsense, then the other switches
    order = start_order(profile, tables)
    assert order["glue-stsb-lora-lr0.5x-s0"] == 0 and order["glue-mrpc-flexlora-lr2x-s2"] == 1
    assert (
        order["glue-cola-lora-r12-lr0.5x-s0"] == 1 and order["glue-cola-flexlora-lambda_lr_multiplier10-lr2x-s1"] == 2
    )
    assert order["cr-flexlora-s1"] == 3 and order["glue-cola-flexlora-steps2x-lr2x-s0"] == 4
    assert "glue-cola-flexlora-orth_regeq2_sum-lr2x-s0" not in order  # last: after every group

    # the constant-answer line of the commonsense table: the most common gold answer over the first eval.limit items
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    rows = [
        {"instruction": "q", "input": "", "output": f"the correct answer is {a}", "answer": a}
        for a in ("true", "false", "false", "true", "true")
    ]
    (tmp_path / "data" / "boolq" / "dev.json").write_text(json.dumps(rows))
    shares = constant_answer_shares(
        replace(profile, cr_overrides={"eval.data_dir": str(tmp_path / "data"), "eval.limit": 3})
    )
    assert shares == {"boolq": pytest.approx(2 / 3)}  # false, false of true, false, false; no other task's file there

    history = [  # expand at 10, pruned again at the next allocation step (20); the other expansion survives
        {"step": 10, "module": "a.q_proj", "action": "expand"},
        {"step": 10, "module": "a.v_proj", "action": "prune"},
        {"step": 10, "module": "b.q_proj", "action": "expand"},
        {"step": 10, "module": "b.v_proj", "action": "prune"},
        {"step": 20, "module": "a.q_proj", "action": "prune"},
        {"step": 20, "module": "b.v_proj", "action": "expand"},
    ]
    out = tmp_path
    (out / "allocation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    (out / "rank_pattern.json").write_text(json.dumps({"a.q_proj": 8, "b.q_proj": 9, "a.v_proj": 7, "b.v_proj": 8}))
    stats = allocation_statistics(out)
    assert stats["rank_moves"] == 6 and stats["expansions"] == 3 and stats["expansions_pruned_next"] == 1


def test_verdicts_move_to_a_longer_schedule_only_once_every_compared_seed_finished():
    """On the committed --cpu results: CoLA's 2x runs are all in, so its verdicts use them; with one LoRA seed
    missing they go back to the standard length. STS-B, with every compared 2x run present, moves too; the switch
    rows never hold a task back."""
    profile = PROFILES["cpu"]
    results = load_results(ROOT / "bench" / "results" / "quality_cpu_runs")
    _, tables, _ = plan(profile, results)
    compared = [row.label for row in profile.longer if not row.sweep_seeds]
    assert compared == ["FlexLoRA r=8 (cap 12), mean_norm", "LoRA r=8", "AdaLoRA 12->8"]
    stsb_done = {run_id: {"status": "ok"} for label in compared for run_id in tables["longer"][(label, "stsb")]}
    everything = {**results, **stsb_done}
    cells, scale = longest_schedule_cells(profile, tables, everything)
    assert scale == {"stsb": 2, "cola": 2, "mrpc": 2}
    assert cells[("LoRA r=8", "cola")] == tables["longer"][("LoRA r=8", "cola")]
    missing = tables["longer"][("LoRA r=8", "cola")][1]
    cells, scale = longest_schedule_cells(profile, tables, {k: v for k, v in everything.items() if k != missing})
    assert scale == {"stsb": 2, "cola": 1, "mrpc": 2}
    assert cells[("LoRA r=8", "cola")] == tables["methods"][("LoRA r=8", "cola")]


def test_the_switch_decision_applies_every_criterion_of_the_rule():
    """On the committed --cpu results at the standard length, and on copies with some scores replaced: each criterion
    of the rule can keep a switch a switch on its own, an unfinished cell leaves the decision open, and a switch that
    passes all three becomes the default."""
    profile = PROFILES["cpu"]
    results = load_results(ROOT / "bench" / "results" / "quality_cpu_runs")
    _, tables, _ = plan(profile, results)
    cells = tables["methods"]
    orthonormal, lora = "FlexLoRA, orthonormal start", "LoRA r=8"

    def decision(results, switch=orthonormal) -> dict[str, str]:
        rows = table_with(switch_decision_table(profile, results, cells, {}), "switch", "decision")
        return next(row for row in rows if row["switch"] == switch)

    def with_scores(results, run_ids, value) -> dict:
        changed = dict(results)
        for position, run_id in enumerate(run_ids):  # seeds 0.1 point apart: a seed std, as real runs have
            metric = GLUE_METRICS[run_id.split("-")[1]][1][0]
            changed[run_id] = {**results[run_id], "scores": {metric: value + position % 3 / 1000}}
        return changed

    auto = decision(results, "FlexLoRA, lambda lr auto")  # (c): diverges at x 2 and x 4, the default nowhere
    assert (auto["diverges at no lr where the default does not"], auto["decision"]) == (
        "no: diverges at x 2, x 4",
        "stays a switch",
    )
    # the orthonormal start alone at the standard length, every run of it (its lr sweep included) raised to ~95
    raised_ids = [run_id for run_id in results if "-flexlora-factor_initorthonormal-lr" in run_id]
    assert len(raised_ids) == 8 + 1 + 2 * 3  # the sweep (4 multiples x 2 seeds; STS-B's cell reuses 2) + 1, 3, 3 seeds
    raised = with_scores(results, raised_ids, 0.95)
    assert decision(raised)["decision"] == "**becomes the default**"
    # (b): LoRA r=8 ahead on STS-B
    lora_ahead = decision(with_scores(raised, cells[(lora, "stsb")], 0.99))
    assert lora_ahead["better than the default on every task"].startswith("yes: ")
    assert (lora_ahead[f"not worse than {lora} on any task"].split(",")[0], lora_ahead["decision"]) == (
        "no: STS-B **worse**",
        "stays a switch",
    )
    # (a): within noise of the default on MRPC
    default_mrpc = [results[run_id]["scores"] for run_id in cells[("FlexLoRA r=8 (cap 12), mean_norm", "mrpc")]]
    tied = dict(raised)
    for run_id, scored in zip(cells[(orthonormal, "mrpc")], default_mrpc):
        tied[run_id] = {**raised[run_id], "scores": scored}
    assert decision(tied)["better than the default on every task"] == (
        "no: STS-B **better**, CoLA **better**, MRPC within noise"
    )
    assert decision(tied)["decision"] == "stays a switch"
    # a cell with a seed missing is not judged, so the decision waits for it
    partial = {k: v for k, v in raised.items() if k != cells[(orthonormal, "mrpc")][2]}
    waiting = decision(partial)
    assert (
        waiting["better than the default on every task"]
        == "not measured yet: STS-B **better**, CoLA **better**, MRPC not measured"
    )
    assert waiting["decision"] == "open: not measured yet"


def test_llama3_8b_slice_has_llama3_8b_shapes():
    """bench/overhead.py --model llama3-8b-slice: LLaMA3-8B's exact shapes at a chosen depth (built on meta: no
    memory)."""
    model = llama3_8b_slice(3, "meta")
    assert len(model.model.layers) == 3
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == 218_112_000  # one LLaMA3-8B decoder layer
    assert (
        tuple(model.lm_head.weight.shape) == (128256, 4096)
        and model.lm_head.weight is not model.model.embed_tokens.weight
    )
    assert set(target_shapes(model).values()) == {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}
    assert model.config.rope_parameters["rope_theta"] == 500000.0 and model.config.num_key_value_heads == 8


def test_comm_volume_multinode_rows_keep_the_hsdp_gather_within_a_node():
    """bench/comm_volume.py's HSDP rows: the lambda all-gather spans one node's GPUs and receives nothing from other
    nodes; plain FSDP2 spans every GPU. The model sizes behind the per-step column are LLaMA3's."""
    assert round(base_parameters(LLAMA3_8B) / 1e9, 2) == 8.03 and round(base_parameters(LLAMA3_70B) / 1e9, 1) == 70.6
    for nodes in (2, 8):
        hsdp, fsdp2 = (multinode_row(LLAMA3_8B, 8, nodes, 8, layout) for layout in ("HSDP", "FSDP2"))
        assert (hsdp["group"], hsdp["across"], fsdp2["group"]) == (8, 0, nodes * 8)
        sent, received = lambda_gather_payload(160, 12, nodes * 8)
        assert fsdp2["sent"] == sent * 4 and fsdp2["within"] + fsdp2["across"] + fsdp2["sent"] == received * 4
        assert fsdp2["step_across"] > 1000 * hsdp["step_across"]  # base weights over the network vs adapter gradients


def test_time_decision_times_the_allocators_own_decision_parts(tokens):
    """bench.common.time_decision calls the parts ``RankAllocator.decide`` is made of, as decide calls them: every
    importance metric is timed as the library computes it (sensitivity with its slot scores), and nothing changes."""
    model = make_tiny_llama()
    config = flexlora.FlexLoRAConfig(
        target_modules=TARGETS,
        r=4,
        lora_alpha=8,
        b0=2,
        t_warmup=10,
        t_final=0,
        delta_t=5,
        total_steps=100,
        importance="sensitivity",
    )
    allocator = flexlora.RankAllocator(flexlora.inject(model, config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    allocator.step(1, optimizer)  # before the first allocation step: records the gradient statistics only
    masks = [layer.rank_mask.clone() for layer in allocator.layers]
    ticks = iter(range(100))  # a clock that moves one unit per reading
    times = time_decision(allocator, 10, lambda: float(next(ticks)))
    assert times == {"gather": 1.0, "importance": 1.0, "selection": 1.0, "decide": 1.0}
    assert allocator.history == [] and all(torch.equal(m, layer.rank_mask) for m, layer in zip(masks, allocator.layers))
    assert len(allocator.step(10, optimizer)) == 4  # the step it timed allocates: 2 prunes and 2 expansions
