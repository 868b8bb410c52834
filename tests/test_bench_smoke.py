"""The bench/ scripts run end to end (--smoke, tiny random Llama) and write well-formed reports.

Timings are never asserted: they depend on the machine. Only the structure and sanity of the output are.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["flexlora", "flexlora_cap8", "flexlora_no_orth", "lora_r8", "lora_r12", "adalora"]


def run_bench(module: str, out: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
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
QUALITY_METHODS = ["FlexLoRA", "LoRA", "AdaLoRA"]


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    model = build_tiny_model_dir(out / "tiny_llama")
    args = ["--work-dir", str(out / "work"), "--set-cr", f"model.path={model}", "--set-cr", "model.gguf_file=null"]
    first = run_bench("bench.quality", out, *args)
    report = (out / "quality_smoke.md").read_text()
    again = run_bench("bench.quality", out, *args)
    return report, first, again, out


def test_quality_report_has_every_table_at_equal_budget(quality):
    report, _, _, out = quality
    check_well_formed(report)
    assert "`python -m bench.quality --smoke" in report
    methods = table_with(report, "method", "STS-B pearson")
    assert [row["method"] for row in methods] == QUALITY_METHODS
    ranks = {row["method"]: number(row["final active rank"]) for row in methods}
    assert len(set(ranks.values())) == 1, ranks  # same budget: same total active rank at the end
    params = {row["method"]: int(row["adapter params"].replace(",", "")) for row in methods}
    assert params["FlexLoRA"] == params["AdaLoRA"] > params["LoRA"]  # capacity 12 (+ lambda) vs rank 8
    assert all(-100 <= number(row["STS-B pearson"]) <= 100 for row in methods)

    assert [row["importance"] for row in table_with(report, "importance", "final active rank")] == [
        "entropy", "nuclear", "frobenius", "sensitivity", "elem", "mat"]
    assert [row["init"] for row in table_with(report, "init", "final active rank")] == ["zero_impact", "small", "zero", "orthogonal"]
    mode = {row["mode"]: number(row["final active rank"]) for row in table_with(report, "mode", "final active rank")}
    assert mode["prune_only"] < mode["flex"] < mode["expand_only"]  # only flex keeps the budget

    lr = table_with(report, "method", "STS-B pearson, lr x 4")
    assert [row["method"] for row in lr] == QUALITY_METHODS
    assert [row["STS-B pearson, lr x 1"] for row in lr] == [row["STS-B pearson"] for row in methods]  # the same runs
    orth = table_with(report, "method", "STS-B pearson, orth_reg_weight x 0")
    assert [row["method"] for row in orth] == ["FlexLoRA", "AdaLoRA"]
    assert [row["method"] for row in table_with(report, "method", "STS-B pearson, init_std x 2.5")] == ["FlexLoRA"]

    commonsense = table_with(report, "method", "BoolQ")
    assert [row["method"] for row in commonsense] == QUALITY_METHODS
    assert all(0 <= number(row[c]) <= 100 for row in commonsense for c in ("BoolQ", "OBQA", "avg"))
    verdicts = table_with(report, "task", "FlexLoRA vs LoRA")
    assert [row["task"] for row in verdicts] == ["STS-B pearson", "commonsense avg"]
    assert all(re.match(r"(\*\*better\*\*|\*\*worse\*\*|within noise) \(", row["FlexLoRA vs LoRA"]) for row in verdicts)

    where = table_with(report, "task", "seeds")
    assert [(row["task"], row["method"]) for row in where] == [
        ("STS-B", "FlexLoRA"), ("STS-B", "AdaLoRA"), ("commonsense", "FlexLoRA"), ("commonsense", "AdaLoRA")]
    assert all(1 <= number(row["Q"]) <= 12 for row in where if row["task"] == "STS-B")  # between min_rank and capacity
    for task in ("stsb", "commonsense"):
        assert (out / "quality_smoke_heatmaps" / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(quality_smoke_heatmaps/{task}.png)" in report

    results = json.loads((out / "quality_smoke.json").read_text())["runs"]
    assert all(run["status"] == "ok" for run in results), [r for r in results if r["status"] != "ok"]
    # methods, other metrics / modes / inits, lr x 4, orth x 0, init_std x 2.5, commonsense
    assert len(results) == 3 + 5 + 2 + 3 + 3 + 2 + 1 + 3


def test_quality_sweep_resumes_instead_of_rerunning(quality):
    report, first, again, _ = quality
    planned = len(table_with(report, "run", "status"))
    assert f"{planned} runs: 0 already finished, {planned} to run" in first
    assert f"{planned} runs: {planned} already finished, 0 to run" in again


def test_quality_verdicts_and_cells_by_hand():
    sys.path.insert(0, str(ROOT))
    from bench.quality import PROFILES, TABLES, cell, plan, verdict

    assert cell([]) == "-"
    assert cell([0.5]) == "50.0"
    assert cell([0.5, 0.7]) == "60.0 ± 14.1"  # sample std of 50 and 70
    assert verdict([0.80, 0.82], [0.70, 0.72]).startswith("**better** (+10.0, std 1.4)")
    assert verdict([0.70, 0.72], [0.80, 0.82]).startswith("**worse** (-10.0")
    assert verdict([0.70, 0.80], [0.74, 0.76]).startswith("within noise (+0.0")
    assert verdict([0.6], [0.5]) == "**better** (+10.0, one seed)"
    assert verdict([], [0.5]) == "not measured"

    runs, tables = plan(PROFILES["cpu"], ROOT / "unused", [], [], set(TABLES))
    ids = [run.id for run in runs]
    # ablation defaults, lr x 1 and orth x 1 reuse the methods-table runs
    assert len(ids) == len(set(ids)) == 4 * 3 * 3 + 10 * 2 + 3 * 2 + 2 * 2 + 2 + 3
    default = "glue-stsb-flexlora-entropy-flex-zero_impact-s0"
    assert default in tables["methods"][("stsb", "flexlora")] and default in tables["importance"][("stsb", "entropy")]
    sensitivity = next(run for run in runs if run.id == "glue-stsb-flexlora-sensitivity-flex-zero_impact-s1")
    assert {"adapter.importance=sensitivity", "train.seed=1", "adapter.seed=1", "method=flexlora"} <= set(sensitivity.argv)
    fast = next(run for run in runs if run.id == "glue-stsb-lora-lr4x-s0")
    assert "train.lr=0.0088" in fast.argv  # 4 x minilm_stsb.yaml's 2.2e-3
    unregularised = next(run for run in runs if run.id == "glue-stsb-adalora-orth0x-s1")
    assert "adapter.orth_reg_weight=0" in unregularised.argv
    wider = next(run for run in runs if run.id == "glue-stsb-flexlora-entropy-flex-zero_impact-init_std2.5x-s0")
    assert "adapter.init_std=0.05" in wider.argv  # minilm_stsb.yaml leaves init_std at FlexLoRAConfig's 0.02
