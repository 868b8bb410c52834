"""The two Python steps of bench/gpu_check.sh: ``env`` (what the machine offers, which attention implementation the
check uses) and ``summary`` (one markdown page from everything the check wrote under its folder).

    python -m bench.gpu_check_report env OUT --device cuda
    python -m bench.gpu_check_report summary OUT --seconds 312 --command "bash bench/gpu_check.sh"
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from bench.common import machine_description, markdown_table

TIME_BUDGET_S = 480  # the check's promise on one GPU
METHODS = ("lora", "adalora", "flexlora")


def write_env(out: Path, device: str) -> int:
    """env.json; exit status 1 when a CUDA check finds no CUDA device (every later step would fail)."""
    import torch

    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is visible to torch; run with --smoke on a CPU machine", file=sys.stderr)
            (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
            return 1
        env["gpu"] = torch.cuda.get_device_name(0)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        import flash_attn

        env["flash_attn"] = flash_attn.__version__
    except Exception as error:  # noqa: BLE001 - an installed but broken build is reported, then sdpa is used
        env["flash_attn"] = f"not usable: {type(error).__name__}: {error}"[:300]
    usable = not env["flash_attn"].startswith("not usable")
    env["attn_implementation"] = "flash_attention_2" if usable and device == "cuda" else "sdpa"
    env["machine"] = dict(machine_description(device))
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1))
    return 0


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _section(markdown: str, heading: str) -> str:
    """The text of one '## heading' section of a report (empty when absent)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else ""


def _accuracies(results: dict | None) -> dict[str, float]:
    """task -> accuracy from a scoring result ({protocol: {task: {"accuracy": ...}}})."""
    if not results:
        return {}
    by_task = next(iter(results.values()))
    return {task: values["accuracy"] for task, values in by_task.items() if isinstance(values, dict) and "accuracy" in values}


def _mean(values) -> str:
    values = list(values)
    return f"{100 * statistics.fmean(values):.1f}" if values else "-"


def write_summary(out: Path, seconds: int, command: str) -> int:
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line.strip()]
    env = _read_json(out / "env.json") or {}
    failed = [name for name, status, _ in steps if status != "0"]
    parts = ["# GPU check", "", markdown_table(["", ""], [
        ["Command", f"`{command}`"], ["Date", time.strftime("%Y-%m-%d %H:%M %Z")],
        ["Device", env.get("gpu", env.get("device", "?"))], ["torch / CUDA", f"{env.get('torch')} / {env.get('cuda')}"],
        ["flash_attn", env.get("flash_attn", "?")], ["attention used", env.get("attn_implementation", "?")],
        ["Wall time", f"{seconds} s" + ("" if env.get("device") != "cuda" or seconds <= TIME_BUDGET_S
                                        else f" (**over the {TIME_BUDGET_S} s budget**)")],
        ["Steps failed", ", ".join(failed) or "none"],
    ]), "", "## Steps", "", markdown_table(["step", "exit status", "seconds"], steps), ""]

    overhead = next(iter(sorted((out / "overhead").glob("overhead*.md"))), None)
    if overhead is not None:
        text = overhead.read_text()
        parts += [f"## Overhead ({overhead.relative_to(out)})", "", _section(text, "Setup"), "",
                  _section(text, "1. Train step (normal steps)"), "", "Targets:", "", _section(text, "Targets"), ""]

    packing_log = out / "logs" / "packing.log"
    if packing_log.is_file():
        lines = [line for line in packing_log.read_text().splitlines() if line.strip()]
        parts += ["## Packed = padded micro-batches (tests/test_packing.py)", "", "```", *lines[-4:], "```", ""]

    rows = []
    for method in METHODS:
        metrics = _read_json(out / f"cr-{method}" / "metrics.json")
        if metrics is None:
            rows.append([method, "no metrics.json", "", "", "", "", ""])
            continue
        scores = _accuracies(metrics.get("eval"))
        rows.append([method, f"{metrics['final_loss']:.4f}", metrics["rank_changes"], metrics["total_active_rank"],
                     _mean(scores.values()), metrics["train_seconds_this_run"], metrics["peak_memory"]["mib"]])
    parts += ["## Commonsense, one allocation step", "", markdown_table(
        ["method", "final loss", "rank changes", "active rank", "mean accuracy %", "train s", "peak MiB"], rows), ""]

    fsdp = _read_json(out / "fsdp2" / "metrics.json")
    reload = _read_json(out / "fsdp2" / "reload_eval.json")
    log = (out / "logs" / "fsdp2.log").read_text() if (out / "logs" / "fsdp2.log").is_file() else ""
    sharded = re.search(r"(\d+) of (\d+) parameter tensors are sharded", log)
    engine = re.search(r"(\d+) process\(es\), distributed type (\w+)", log)
    in_process, reloaded = _accuracies((fsdp or {}).get("eval")), _accuracies((reload or {}).get("results"))
    common = sorted(set(in_process) & set(reloaded))
    rows = [
        ["engine", f"{engine.group(2)}, {engine.group(1)} process(es)" if engine else "not found in the log"],
        ["parameter tensors sharded (DTensor)", f"{sharded.group(1)} of {sharded.group(2)}" if sharded else "not found in the log"],
        ["rank changes", fsdp["rank_changes"] if fsdp else "-"],
        ["peak MiB", fsdp["peak_memory"]["mib"] if fsdp else "-"],
        ["PEFT export", "present" if (out / "fsdp2" / "peft" / "adapter_config.json").is_file() else "missing"],
        ["mean accuracy % after training (in process)", _mean(in_process.values()) if in_process else "not scored"],
        ["mean accuracy % of the reloaded PEFT export", _mean(reloaded.values()) if reloaded else "not scored"],
        ["tasks with equal accuracy in both", f"{sum(in_process[t] == reloaded[t] for t in common)} of {len(common)}" if common else "-"],
    ]
    parts += ["## FSDP2: allocation, save, PEFT export, reload", "", markdown_table(["", ""], rows), ""]
    markdown = "\n".join(parts)
    (out / "summary.md").write_text(markdown)
    (out / "summary.json").write_text(json.dumps({"seconds": seconds, "command": command, "failed": failed,
                                                  "steps": steps, "env": env}, indent=1) + "\n")
    print(markdown)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env")
    env.add_argument("out", type=Path)
    env.add_argument("--device", choices=["cpu", "cuda"], required=True)
    summary = commands.add_parser("summary")
    summary.add_argument("out", type=Path)
    summary.add_argument("--seconds", type=int, required=True)
    summary.add_argument("--command", required=True)
    args = parser.parse_args(argv)
    if args.command == "env":
        return write_env(args.out, args.device)
    return write_summary(args.out, args.seconds, args.command)


if __name__ == "__main__":
    sys.exit(main())
