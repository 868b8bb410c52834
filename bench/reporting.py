"""What every bench/ report states and how it is written: the machine, library revision and load it ran with, and
markdown tables. Imports torch alone, so bench/gpu_check_report.py can describe a machine where the other libraries
do not import."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        return match.group(1).strip() if match else platform.processor() or "unknown"
    except OSError:
        return platform.processor() or "unknown"


def machine_description(device: str) -> list[tuple[str, str]]:
    # imported here: bench/gpu_check_report.py reports a machine whose transformers or peft may not import at all
    import peft
    import transformers

    rows = [
        ("CPU", f"{cpu_model()}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}"),
        ("RAM", f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"),
        ("Python", platform.python_version()),
        ("torch / transformers / peft", f"{torch.__version__} / {transformers.__version__} / {peft.__version__}"),
    ]
    if device.startswith("cuda"):
        rows.append(("GPU", f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"))
    return rows


def library_revision() -> str:
    """The commit, and a digest of flexlora/*.py as run: the library changes under the benchmarks."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "flexlora").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "flexlora"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "no git", ""
    return f"{commit}{' + uncommitted changes' if dirty else ''}; sha256(flexlora/*.py) {digest.hexdigest()[:12]}"


def load_averages() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min)"


# ---- markdown ------------------------------------------------------------------------------------------
def median(values) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(command: str, device: str, wall_s: float, loads: tuple[str, str]) -> str:
    rows = [
        ("Command", f"`{command}`"),
        ("Date", time.strftime("%Y-%m-%d %H:%M %Z")),
        ("flexlora", library_revision()),
        ("Wall time", f"{wall_s:.0f} s"),
        *machine_description(device),
        ("Load average at start", loads[0]),
        ("Load average at end", loads[1]),
    ]
    return markdown_table(["", ""], [list(r) for r in rows])
