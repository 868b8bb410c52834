"""The bench/ scripts run end to end (--smoke, tiny random Llama) and write well-formed reports.

Timings are never asserted: they depend on the machine. Only the structure and sanity of the output are.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["flexlora", "flexlora_cap8", "flexlora_no_orth", "lora_r8", "lora_r12", "adalora"]


def run_bench(module: str, out: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
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
    assert all(row["verdict"] in ("met", "**missed**", "-") for row in targets)


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
