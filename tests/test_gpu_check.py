"""bench/gpu_check.sh --smoke: the GPU check's every step on the CPU with a tiny Llama, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_bench_smoke import table_with, tables
from tiny_models import build_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_step(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "tiny_llama")
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MASTER_PORT", None)
    command = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--model-dir", str(model_dir), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = (out / "summary.md").read_text()
    steps = {row["step"]: row["exit status"] for row in table_with(summary, "step", "exit status")}
    assert steps == dict.fromkeys(["overhead", "packing", "cr-lora", "cr-adalora", "cr-flexlora", "fsdp2", "fsdp2-reload"], "0")
    assert json.loads((out / "env.json").read_text())["attn_implementation"] == "sdpa"
    assert (out / "overhead" / "overhead.md").is_file() and "## Overhead" in summary
    assert "1 passed, 1 skipped" in summary.split("## Packed = padded")[1]  # flash-attention needs a GPU

    runs = {row["method"]: row for row in table_with(summary, "method", "rank changes")}
    assert set(runs) == {"lora", "adalora", "flexlora"}
    assert runs["lora"]["rank changes"] == "0" and int(runs["flexlora"]["rank changes"]) > 0
    assert all(float(row["peak MiB"]) > 0 for row in runs.values())

    fsdp = dict(tables(summary.split("## FSDP2")[1])[0][1:])  # a two-column table: name -> value
    assert fsdp["engine"] == "FSDP, 2 process(es)"
    sharded, _, total = fsdp["parameter tensors sharded (DTensor)"].partition(" of ")
    assert int(sharded) == int(total) > 0
    # dropout off and the same global batch: the sharded run moves the same ranks as the one-process run
    assert fsdp["rank changes"] == runs["flexlora"]["rank changes"]
    assert fsdp["PEFT export"] == "present"
    reloaded = json.loads((out / "fsdp2" / "reload_eval.json").read_text())
    assert set(next(iter(reloaded["results"].values()))) >= {"synthetic_truefalse", "synthetic_choice"}

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds a check" in again.stderr
