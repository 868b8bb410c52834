"""bench/gpu_check.sh --smoke: the GPU check's every step on the CPU, from a carry folder as bench/gpu_carry.py makes
it (a carried wheel first on the path, the data rows) and with model.init=random at reduced depth and width, so the
script cannot rot before it meets a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_bench_smoke import table_with, tables
from test_random_init import small_llama3_dir

from bench import gpu_carry
from flexlora.recipe_kit.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS = [
    "env",
    "overhead",
    "cr8b-flexlora",
    "cr8b-flexlora-resume",
    "cr8b-lora",
    "cr8b-lora-resume",
    "packing",
    "fsdp2",
]


def pack_installed_wheel(package: str, folder: Path) -> Path:
    """An installed pure-Python package zipped as a wheel: what the carry folder holds, without a registry."""
    import importlib.metadata

    distribution = importlib.metadata.distribution(package)
    wheel = folder / f"{package}-{distribution.version}-py3-none-any.whl"
    root = Path(distribution.locate_file(""))
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in distribution.files:
            if "__pycache__" not in file.parts and (root / file).is_file():
                archive.write(root / file, str(file))
    return wheel


def test_gpu_check_smoke_runs_every_step_from_a_carry_folder(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", 24, 4)
    carry = tmp_path / "carry"
    assert gpu_carry.main(["--out", str(carry), "--data-dir", str(data), "--rows-per-task", "16", "--no-wheels"]) == 0
    rows = json.loads((carry / "data" / "commonsense" / "synthetic_choice" / "train.json").read_text())
    assert len(rows) == 16 and "total bytes" in (carry / "manifest.txt").read_text()
    (carry / "wheels").mkdir()
    pack_installed_wheel("peft", carry / "wheels")

    out, work = tmp_path / "check", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    model_config = small_llama3_dir(tmp_path / "small")
    command = [
        "bash",
        str(REPO / "bench" / "gpu_check.sh"),
        "--smoke",
        "--model-config",
        str(model_config),
        "--carry",
        str(carry),
        "--out",
        str(out),
        "--work",
        str(work),
        "--budget",  # within the timeout below, so a slow machine ends in skipped steps, not a killed check
        "840",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert {p.name for p in out.iterdir()} == {"summary.md", "summary.json", "logs.tar.gz", "progress.tsv"}
    summary = (out / "summary.md").read_text()
    steps = {row["step"]: row["status"] for row in table_with(summary, "step", "peak GPU MiB")}
    environment = json.loads((work / "env.json").read_text())
    if environment["bitsandbytes_usable"]:  # (c) runs wherever bitsandbytes imports, here too
        assert steps == dict.fromkeys(
            STEPS + ["nf4-flexlora", "nf4-lora", "nf4-flexlora-resume", "nf4-lora-resume"], "ok"
        )
    else:
        assert steps == {**dict.fromkeys(STEPS, "ok"), "nf4": "skipped: bitsandbytes does not import"}
        assert "skipped: bitsandbytes does not import" in summary.split("## (c)")[1]
    assert environment["libraries"]["peft"].endswith("(carried)")  # the carried wheel won over the installed copy
    assert "## (a) Overhead" in summary
    assert "1 passed, 2 skipped" in summary.split("## (d)")[1]  # sdpa fp32 here; sdpa and flash-attn bf16 need a GPU

    for part, prefix in (("## (b)", "cr8b"), ("## (c)", "nf4"))[: 2 if environment["bitsandbytes_usable"] else 1]:
        runs = {row["run"]: row for row in table_with(summary.split(part)[1], "run", "tokens/s")}
        assert set(runs) == {f"{prefix}-flexlora", f"{prefix}-lora"}
        assert runs[f"{prefix}-flexlora"]["rank changes"].endswith("(step 3)")
        assert runs[f"{prefix}-lora"]["rank changes"] == "0"
        for row in runs.values():
            assert row["steps"] == "6" and float(row["tokens/s"]) > 0 and float(row["step vs LoRA"]) > 0
            assert row["resume"] == "step 3 -> 6" and float(row["max abs loss diff after resume"]) <= 1e-6
            assert row["PEFT export"] == "present" and float(row["peak MiB (torch)"]) > 0

    fsdp = dict(tables(summary.split("## (e)")[1])[0][1:])  # a two-column table: name -> value
    assert fsdp["engine"] == "FSDP, 2 process(es)"
    sharded, _, total = fsdp["parameter tensors sharded (DTensor)"].partition(" of ")
    assert int(sharded) == int(total) > 0
    # dropout off and the same global batch: the sharded run moves the same ranks as the one-process run
    assert fsdp["same rank moves as cr8b-flexlora"] == "yes" and fsdp["PEFT export"] == "present"

    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {
        "logs/cr8b-flexlora-resume.log",
        "env.json",
        "runs/cr8b-flexlora/metrics.first.json",
        "runs/fsdp2/allocation.jsonl",
    } <= names
    assert not any(name.endswith(".safetensors") for name in names)

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds a check" in again.stderr


def test_carried_bitsandbytes_keeps_only_the_cpu_and_cuda_13_libraries(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libraries = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64"]
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("bitsandbytes/__init__.py", "")
        for library in libraries:
            archive.writestr(f"bitsandbytes/libbitsandbytes_{library}.so", library)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "")
    dropped = gpu_carry.trim_native_libraries(wheel, gpu_carry.BITSANDBYTES_KEPT_LIBRARIES)
    assert sorted(dropped) == [f"libbitsandbytes_{name}.so" for name in ("cuda118", "cuda128", "cuda132", "rocm64")]
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(archive.namelist()) == [
            "bitsandbytes-0.50.2.dist-info/RECORD",
            "bitsandbytes/__init__.py",
            "bitsandbytes/libbitsandbytes_cpu.so",
            "bitsandbytes/libbitsandbytes_cuda130.so",
        ]
        assert archive.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"cuda130"
    (tmp_path / "other.whl").write_bytes(wheel.read_bytes())
    with pytest.raises(SystemExit, match="lacks"):
        gpu_carry.trim_native_libraries(tmp_path / "other.whl", ("libbitsandbytes_cuda999.so",))
