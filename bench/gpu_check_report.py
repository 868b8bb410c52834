"""The two Python steps of bench/gpu_check.sh: ``env`` (what the machine offers) and ``summary`` (summary.md,
summary.json and logs.tar.gz in the output folder, from everything the check wrote to its work folder).

    python -m bench.gpu_check_report env WORK --device cuda [--site WORK/site]
    python -m bench.gpu_check_report summary WORK --out OUT --seconds 312 --budget 420 --command "bash ..."
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import sys
import tarfile
import time
from pathlib import Path

import torch

from bench.reporting import library_revision, markdown_table

LIBRARIES = ("torch", "transformers", "huggingface_hub", "peft", "accelerate", "tokenizers", "safetensors", "pytest")
REQUIRED = ("transformers", "peft", "accelerate")  # torch is imported above them
PARTS = {"env": "", "overhead": "(a)", "packing": "(d)", "fsdp2": "(e)"}  # and cr8b-* (b), nf4* (c)
# what logs.tar.gz keeps of each run: its small outputs (adapters, exports and checkpoints are tens of MiB at 8B)
RUN_FILES = (
    "config.yaml",
    "metrics.json",
    "metrics.first.json",
    "train_log.jsonl",
    "train_log.first.jsonl",
    "allocation.jsonl",
    "rank_pattern.json",
    "peft/adapter_config.json",
)


def _import_status(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - an installed but broken build counts as absent, with its reason
        return f"not usable: {type(error).__name__}: {error}"[:300]
    return getattr(module, "__version__", "?")


def write_env(work: Path, device: str, site: Path | None) -> int:
    """env.json; exit status 1 (every later step would fail) when transformers, peft or accelerate does not import,
    or a CUDA check finds no CUDA device."""

    env = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "flexlora": library_revision(),
        "libraries": {},
    }
    for name in LIBRARIES:
        version = _import_status(name)
        module = sys.modules.get(name)
        carried = bool(site and module is not None and Path(module.__file__).resolve().is_relative_to(site.resolve()))
        env["libraries"][name] = version + (" (carried)" if carried else "")
    env["flash_attn"] = _import_status("flash_attn")
    env["bitsandbytes"] = _import_status("bitsandbytes")
    env["bitsandbytes_usable"] = not env["bitsandbytes"].startswith("not usable")
    missing = [name for name in REQUIRED if env["libraries"][name].startswith("not usable")]
    if missing:  # every later step needs them
        (work / "env.json").write_text(json.dumps(env, indent=1) + "\n")
        print(
            f"gpu_check: {', '.join(missing)} do not import: " + "; ".join(env["libraries"][m] for m in missing),
            file=sys.stderr,
        )
        return 1
    if device == "cuda":
        if not torch.cuda.is_available():
            (work / "env.json").write_text(json.dumps(env, indent=1) + "\n")
            print("gpu_check: no CUDA device is visible to torch; run with --smoke on a CPU machine", file=sys.stderr)
            return 1
        memory = torch.cuda.get_device_properties(0).total_memory
        env["gpu"] = f"{torch.cuda.get_device_name(0)}, {memory / 2**30:.0f} GiB"
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    (work / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1))
    return 0


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _log(work: Path, step: str) -> str:
    path = work / "logs" / f"{step}.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def _section(markdown: str, heading: str) -> str:
    """The text of one '## heading' section of a report (empty when absent)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else ""


def _part(step: str) -> str:
    if step.startswith("cr8b-"):
        return "(b)"
    return "(c)" if step.startswith("nf4") else PARTS.get(step, "")


def run_row(work: Path, name: str, lora_step_seconds: float | None) -> list:
    """One method's train + resume: what the uninterrupted run measured, and how the resumed run compares."""
    run = work / "runs" / name
    first = _read_json(run / "metrics.first.json")
    if first is None:
        return [name, "did not finish"] + [""] * 9
    history = _read_jsonl(run / "allocation.jsonl")
    steps = ", ".join(str(step) for step in sorted({record["step"] for record in history}))
    changes = f"{len(history)} (step {steps})" if history else "0"
    step_s = first["median_step_seconds_this_run"]
    relative = f"{step_s / lora_step_seconds:.3f}" if lora_step_seconds else "-"
    resumed = _read_json(run / "metrics.json")
    resume_log = _log(work, f"{name}-resume")
    resumed_at = re.search(r"resumed from \S+: step (\d+)", resume_log)
    if not resume_log:
        resume, difference = "not run", "-"
    elif resumed is None or resumed_at is None:
        resume, difference = "failed", "-"
    else:
        start = int(resumed_at.group(1))
        before = {r["step"]: r["loss"] for r in _read_jsonl(run / "train_log.first.jsonl") if r["step"] > start}
        after = {r["step"]: r["loss"] for r in _read_jsonl(run / "train_log.jsonl") if r["step"] > start}
        common = sorted(before.keys() & after.keys())
        resume = f"step {start} -> {resumed['steps']}"
        difference = f"{max(abs(before[s] - after[s]) for s in common):.2e}" if common else "no steps logged"
    export = "present" if (run / "peft" / "adapter_config.json").is_file() else "missing"
    return [
        name,
        first["steps"],
        f"{first['final_loss']:.4f}",
        changes,
        f"{first['tokens_per_second_this_run']:.0f}",
        f"{step_s:.3f}",
        relative,
        first["peak_memory"]["mib"],
        resume,
        difference,
        export,
    ]


def run_table(work: Path, prefix: str) -> str:
    lora = _read_json(work / "runs" / f"{prefix}-lora" / "metrics.first.json")
    lora_step = lora["median_step_seconds_this_run"] if lora else None
    rows = [run_row(work, f"{prefix}-{method}", lora_step) for method in ("flexlora", "lora")]
    return markdown_table(
        [
            "run",
            "steps",
            "final loss",
            "rank changes",
            "tokens/s",
            "median step s",
            "step vs LoRA",
            "peak MiB (torch)",
            "resume",
            "max abs loss diff after resume",
            "PEFT export",
        ],
        rows,
    )


def fsdp_rows(work: Path) -> list[list]:
    run = work / "runs" / "fsdp2"
    metrics = _read_json(run / "metrics.json")
    log = _log(work, "fsdp2")
    engine = re.search(r"(\d+) process\(es\), distributed type (\w+)", log)
    sharded = re.search(r"(\d+) of (\d+) parameter tensors are sharded", log)
    single = _read_jsonl(work / "runs" / "cr8b-flexlora" / "allocation.jsonl")
    sharded_history = _read_jsonl(run / "allocation.jsonl")
    return [
        ["engine", f"{engine.group(2)}, {engine.group(1)} process(es)" if engine else "not found in the log"],
        [
            "parameter tensors sharded (DTensor)",
            f"{sharded.group(1)} of {sharded.group(2)}" if sharded else "not found in the log",
        ],
        ["steps", metrics["steps"] if metrics else "-"],
        ["rank changes", metrics["rank_changes"] if metrics else "-"],
        [
            "same rank moves as cr8b-flexlora",
            "-"
            if not (metrics and single)
            else "yes"
            if [(r["step"], r["module"], r["action"]) for r in sharded_history]
            == [(r["step"], r["module"], r["action"]) for r in single]
            else "no",
        ],
        ["tokens/s", f"{metrics['tokens_per_second_this_run']:.0f}" if metrics else "-"],
        ["peak MiB (torch)", metrics["peak_memory"]["mib"] if metrics else "-"],
        ["PEFT export", "present" if (run / "peft" / "adapter_config.json").is_file() else "missing"],
    ]


def pack_logs(work: Path, target: Path) -> None:
    """logs.tar.gz: every log, env.json, steps.tsv, the overhead report and each run's small outputs."""
    with tarfile.open(target, "w:gz") as tar:
        for path in [
            *sorted((work / "logs").glob("*")),
            work / "env.json",
            work / "steps.tsv",
            *sorted((work / "overhead").glob("*.md")),
        ]:
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(work)))
        for run in sorted((work / "runs").glob("*")):
            for name in RUN_FILES:
                if (run / name).is_file():
                    tar.add(run / name, arcname=str((run / name).relative_to(work)))


def write_summary(work: Path, out: Path, seconds: int, budget: int, command: str) -> int:
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines() if line.strip()]
    env = _read_json(work / "env.json") or {}
    failed = [name for name, status, _, _ in steps if not (status == "ok" or status.startswith("skipped"))]
    libraries = env.get("libraries", {})
    parts = [
        "# GPU check",
        "",
        markdown_table(
            ["", ""],
            [
                ["Command", f"`{command}`"],
                ["Date", time.strftime("%Y-%m-%d %H:%M %Z")],
                ["Device", env.get("gpu", env.get("device", "?"))],
                ["Python / torch / CUDA", f"{env.get('python')} / {env.get('torch')} / {env.get('cuda')}"],
                ["Libraries", ", ".join(f"{name} {version}" for name, version in libraries.items())],
                ["flash_attn / bitsandbytes", f"{env.get('flash_attn', '?')} / {env.get('bitsandbytes', '?')}"],
                ["flexlora", env.get("flexlora", "?")],
                ["Wall time", f"{seconds} s (budget {budget} s)"],
                ["Steps failed", ", ".join(failed) or "none"],
            ],
        ),
        "",
        "## Steps",
        "",
        "Peak GPU MiB: the device's memory in use (nvidia-smi, every 250 ms), CUDA context and allocator cache "
        "included.",
        "",
        markdown_table(
            ["step", "part", "status", "seconds", "peak GPU MiB"],
            [[name, _part(name), status, secs, peak] for name, status, secs, peak in steps],
        ),
        "",
    ]

    overhead = next(iter(sorted((work / "overhead").glob("overhead*.md"))), None)
    if overhead is not None:
        text = overhead.read_text()
        parts += [
            "## (a) Overhead at LLaMA3-8B's shapes",
            "",
            _section(text, "Setup"),
            "",
            _section(text, "1. Train step (normal steps)"),
            "",
            "Targets:",
            "",
            _section(text, "Targets"),
            "",
        ]

    parts += [
        "## (b) LLaMA3-8B, full depth, random weights (model.init=random)",
        "",
        "tokens/s: tokens trained on (padding excluded) per second of the uninterrupted run; median step s: its "
        "median optimizer step; resume: the same command after the last checkpoint was removed.",
        "",
        run_table(work, "cr8b"),
        "",
    ]
    if any(name.startswith("nf4-") for name, *_ in steps):
        parts += ["## (c) The same on a 4-bit (nf4) base", "", run_table(work, "nf4"), ""]
    else:
        parts += ["## (c) 4-bit (nf4) base", "", next((s for n, s, *_ in steps if n == "nf4"), "not run"), ""]

    packing = [line for line in _log(work, "packing").splitlines() if line.strip()]
    if packing:
        parts += ["## (d) Packed = padded micro-batches (tests/test_packing.py)", "", "```", *packing[-6:], "```", ""]
    parts += ["## (e) FlexLoRA under FSDP2", "", markdown_table(["", ""], fsdp_rows(work)), ""]

    markdown = "\n".join(parts)
    (out / "summary.md").write_text(markdown)
    (out / "summary.json").write_text(
        json.dumps(
            {"seconds": seconds, "budget": budget, "command": command, "failed": failed, "steps": steps, "env": env},
            indent=1,
        )
        + "\n"
    )
    pack_logs(work, out / "logs.tar.gz")
    print(markdown)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env")
    env.add_argument("work", type=Path)
    env.add_argument("--device", choices=["cpu", "cuda"], required=True)
    env.add_argument("--site", type=Path, help="the folder the carried wheels were unpacked into")
    summary = commands.add_parser("summary")
    summary.add_argument("work", type=Path)
    summary.add_argument("--out", type=Path, required=True)
    summary.add_argument("--seconds", type=int, required=True)
    summary.add_argument("--budget", type=int, required=True)
    summary.add_argument("--command", required=True)
    args = parser.parse_args(argv)
    if args.command == "env":
        return write_env(args.work, args.device, args.site)
    return write_summary(args.work, args.out, args.seconds, args.budget, args.command)


if __name__ == "__main__":
    sys.exit(main())
