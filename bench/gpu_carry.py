"""Prepare the carry folder bench/gpu_check.sh needs on a bare GPU machine (no package registry, its own Python 3.12
with torch, transformers, accelerate and peft, no datasets / lm_eval / gguf / pytest), on any machine with pip and
network, from the repository root:

    python -m bench.gpu_carry                       # -> .gpucarry/ (git-ignored), 19.0 MiB
    python -m bench.gpu_carry --out DIR --data-dir ../shared/data/commonsense --rows-per-task 64

What it holds, and why:

* ``wheels/``: pure-Python wheels, pinned, fetched for the GPU machine's Python with
  ``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --dest wheels
  <WHEELS below>``. gpu_check.sh unpacks them into its work folder and puts them first on PYTHONPATH, so they win
  over the machine's own copies: transformers and peft at the versions this repo pins (the machine's transformers
  5.17 lacks ``activation_checkpointing_enable``, which the recipes call; its peft is of unknown version), and
  pytest with its dependencies for the packed = padded test (``packaging`` too: pytest needs >= 24). torch,
  accelerate (1.15, as pinned), huggingface_hub (transformers 5.24 imports with the machine's: see
  bench/results/quality_gpu_logs/imports.log), tokenizers, safetensors, and numpy and matplotlib (the recipe's
  rank heatmap) are the machine's own.
  Nothing the check runs imports datasets, lm_eval or gguf (the recipe kit imports them only for hub data sets,
  scoring and GGUF files), so none is carried.
* ``wheels/bitsandbytes-*.whl``, trimmed, for the 4-bit step: bitsandbytes' one manylinux wheel (41 MiB) holds a
  native library per CUDA and ROCm version, and picks the one matching ``torch.version.cuda`` at import. Fetched
  as above with ``--platform manylinux_2_24_x86_64``, then rewritten keeping every file except the other versions'
  libraries: the CPU one and ``libbitsandbytes_cuda130.so`` stay (the machine's torch is 2.11+cu130), 3.4 MiB
  compressed. gpu_check.sh unpacks it like the others (it is never pip-installed, so its RECORD is not rewritten).
  Its own dependencies (torch, numpy, packaging) are the machine's.
* ``data/commonsense/<task>/train.json``: the first ``--rows-per-task`` rows of each LLM-Adapters train file found
  in ``--data-dir`` (with its licence file), enough for the check's runs (30 steps x 8 rows).
* ``manifest.txt``: every file with its size and sha256, and the command that made the folder.

The tokenizer (recipes/configs/models/tiny-tokenizer) and LLaMA3-8B's config.json ship with the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The versions requirements.txt pins (transformers, peft, pytest) and pytest's dependencies as this venv resolved them.
WHEELS = (
    "transformers==5.24.0",
    "peft==0.21.2",
    "pytest==9.2.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "pygments==2.21.0",
    "packaging==26.4",
)
TARGET = ("--python-version", "3.12", "--platform", "manylinux2014_x86_64")
BITSANDBYTES = "bitsandbytes==0.50.2"  # as requirements.txt pins it
BITSANDBYTES_PLATFORM = "manylinux_2_24_x86_64"
BITSANDBYTES_KEPT_LIBRARIES = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")  # the machine's torch: cu130
LICENCE = "LLM-Adapters.DATA_LICENSE"


def pip_download(folder: Path, target: tuple[str, ...], *requirements: str) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *target]
    subprocess.run([*command, "--dest", str(folder), *requirements], check=True)


def download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True)
    pip_download(folder, TARGET, *WHEELS)
    fetched = sorted(p.name for p in folder.glob("*.whl"))
    if len(fetched) != len(WHEELS) or any(not name.endswith("-py3-none-any.whl") for name in fetched):
        raise SystemExit(f"gpu_carry: expected {len(WHEELS)} pure-Python wheels, got {fetched}")


def trim_native_libraries(wheel: Path, kept: tuple[str, ...]) -> list[str]:
    """Rewrite ``wheel`` without the ``libbitsandbytes_*.so`` files not named in ``kept``; returns the dropped ones."""
    with zipfile.ZipFile(wheel) as source:
        names = {item.filename.rsplit("/", 1)[-1] for item in source.infolist()}
        if not set(kept) <= names:
            raise SystemExit(f"gpu_carry: {wheel.name} lacks {sorted(set(kept) - names)}")
        trimmed = wheel.with_suffix(".trimming")
        dropped = []
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for item in source.infolist():
                name = item.filename.rsplit("/", 1)[-1]
                if name.startswith("libbitsandbytes_") and name.endswith(".so") and name not in kept:
                    dropped.append(name)
                    continue
                target.writestr(item, source.read(item))
    trimmed.replace(wheel)
    return dropped


def download_bitsandbytes(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as fetched:
        pip_download(Path(fetched), (*TARGET[:2], "--platform", BITSANDBYTES_PLATFORM), BITSANDBYTES)
        (wheel,) = Path(fetched).glob("bitsandbytes-*.whl")
        trim_native_libraries(wheel, BITSANDBYTES_KEPT_LIBRARIES)
        shutil.move(wheel, folder / wheel.name)


def copy_rows(data_dir: Path, target: Path, rows_per_task: int) -> int:
    """The first rows of every <task>/train.json under data_dir; returns how many tasks were copied."""
    tasks = sorted(p.parent for p in data_dir.glob("*/train.json"))
    if not tasks:
        print(f"gpu_carry: --data-dir {data_dir} holds no <task>/train.json files", file=sys.stderr)
        raise SystemExit(2)
    for task in tasks:
        rows = json.loads((task / "train.json").read_text())[:rows_per_task]
        (target / task.name).mkdir(parents=True)
        (target / task.name / "train.json").write_text(json.dumps(rows, indent=1) + "\n")
    if (data_dir / LICENCE).is_file():
        shutil.copy(data_dir / LICENCE, target / LICENCE)
    return len(tasks)


def write_manifest(out: Path, command: str) -> int:
    """manifest.txt (size and sha256 of every file); returns the folder's total bytes."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.txt")
    lines = [f"made by: {command}", ""]
    total = 0
    for path in files:
        data = path.read_bytes()
        total += len(data)
        lines.append(f"{len(data):>10}  {hashlib.sha256(data).hexdigest()}  {path.relative_to(out)}")
    lines += ["", f"{total:>10}  total bytes ({total / 2**20:.2f} MiB)"]
    (out / "manifest.txt").write_text("\n".join(lines) + "\n")
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpucarry"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/commonsense"))
    parser.add_argument("--rows-per-task", type=int, default=64)
    parser.add_argument("--no-wheels", action="store_true", help="data only (the tests: they have no network)")
    args = parser.parse_args(argv)
    command = "python -m bench.gpu_carry " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.out.exists():
        print(f"gpu_carry: --out {args.out} exists; remove it or choose another folder", file=sys.stderr)
        return 2
    if not args.data_dir.is_dir():
        print(f"gpu_carry: --data-dir {args.data_dir} is not a folder", file=sys.stderr)
        return 2
    if args.rows_per_task < 1:
        print(f"gpu_carry: --rows-per-task must be >= 1, got {args.rows_per_task}", file=sys.stderr)
        return 2
    # built next to --out and renamed at the end: an interrupted preparation leaves no half-made carry folder
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{args.out.name}.tmp", dir=args.out.parent))
    try:
        if not args.no_wheels:
            download_wheels(staging / "wheels")
            download_bitsandbytes(staging / "wheels")
        tasks = copy_rows(args.data_dir, staging / "data" / "commonsense", args.rows_per_task)
        total = write_manifest(staging, command)
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheels = "" if args.no_wheels else f", {len(WHEELS)} wheels and a trimmed bitsandbytes"
    print(
        f"{args.out}: {tasks} tasks x {args.rows_per_task} rows{wheels}, {total / 2**20:.2f} MiB (manifest.txt lists "
        "every file)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
