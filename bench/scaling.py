"""How the allocator's cost grows with the number of adapted matrices and their capacity (issue #6, part 2).

A. Decision and allocation time, measured: N synthetic FlexLoRA layers (small d, so 10,000 of them build in
   seconds) with random lambda and AdamW state, timed through the allocator's own path (gather lambda, entropy
   importance, selection, ``decide``, and the full ``step`` that also applies the change and edits the
   optimizer state). The per-matrix work depends on N and the capacity R, not on d, except the apply part,
   which writes b0 columns of P / rows of Q (d elements each).
B. Communication per allocation step for LLaMA3-8B / 70B shapes at r = 8 and 32 (capacity 1.5 r), computed
   from the shapes (models built on the meta device, no weights): the sharded lambda all-gather that
   ``flexlora.distributed.gather_lambda_matrix`` does (one float32 per slot, sized by
   ``lambda_gather_payload``), plus the 16-byte all-reduce of the agreement check, against one all-gather of
   the whole adapter and of the whole model.

    python -m bench.scaling --cpu                    # writes bench/results/scaling.md and scaling.png
    python -m bench.scaling --smoke --out /tmp/x     # seconds (tests/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import CLOCKS, TARGETS, Schedule, time_decision
from bench.reporting import load_averages, markdown_table, median, provenance
from flexlora import FlexLoRAConfig, RankAllocator, inject
from flexlora.distributed import lambda_gather_payload

PROFILES = {
    "smoke": dict(matrices=[10, 100], capacities=[12], reps=2, threads=1),
    # 160 and 400 are the q, k, v, up, down matrices of LLaMA3-8B (32 layers) and 70B (80 layers)
    # one intra-op thread, as in bench/overhead.py --cpu: the machine is shared
    "cpu": dict(matrices=[10, 30, 100, 160, 400, 1000, 3000, 10000], capacities=[12, 48, 192], reps=15, threads=1),
}
LLAMA3 = {  # published shapes of the two models the paper's commonsense experiments use
    "LLaMA3-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "LLaMA3-70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
WORLDS = (8, 64)  # one 8-GPU node, and eight of them
SYNTHETIC_D = 8  # smallest matrix side; a matrix is never smaller than its capacity R (inject refuses that)
AGREEMENT_BYTES = 16  # assert_same_decision: one all-reduce of two int64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--smoke", action="store_true", help="two small sizes, a few seconds (for tests)")
    profile.add_argument("--cpu", action="store_true", help="the full sweep (default)")
    parser.add_argument("--matrices", type=int, nargs="+", help="numbers of adapted matrices N")
    parser.add_argument("--capacities", type=int, nargs="+", help="capacities R = max_rank")
    parser.add_argument("--reps", type=int, help="timed allocation steps per (N, R)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="process CPU time (default: the machine is shared) or wall time",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    for key, value in PROFILES["smoke" if args.smoke else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---- A: measured decision / allocation cost ------------------------------------------------------------
def synthetic_allocator(n: int, capacity: int, schedule: Schedule):
    """N FlexLoRA layers of d x d, d = max(8, R), with random lambda, r = 2/3 capacity active, and live AdamW state."""

    torch.manual_seed(0)
    side = max(SYNTHETIC_D, capacity)
    holder = torch.nn.ModuleDict({f"m{i}": torch.nn.Linear(side, side, bias=False) for i in range(n)})
    config = FlexLoRAConfig(
        target_modules=r"m\d+",
        r=capacity * 2 // 3,
        max_rank=capacity,
        b0=schedule.b0,
        delta_t=schedule.delta_t,
        t_warmup=schedule.t_warmup,
        t_final=schedule.t_final,
        total_steps=schedule.total_steps,
    )
    adapters = inject(holder, config)
    params = [p for p in holder.parameters() if p.requires_grad]
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_lambda.normal_()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # one step with random gradients, so the optimizer holds state the allocator must edit
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return RankAllocator(adapters), optimizer


def time_allocation(n: int, capacity: int, reps: int, clock) -> dict[str, list[float]]:
    schedule = Schedule(delta_t=100)
    allocator, optimizer = synthetic_allocator(n, capacity, schedule)
    b0 = allocator.config.b0
    times = {k: [] for k in ("gather", "importance", "selection", "decide", "step")}
    for rep in range(reps + 1):  # the first repetition warms caches and is dropped
        sample = time_decision(allocator, schedule.alloc_step, clock)
        start = clock()
        changes = allocator.step(schedule.alloc_step, optimizer)
        sample["step"] = clock() - start
        if len(changes) != 2 * b0:
            raise RuntimeError(
                f"expected {b0} prunes and {b0} expands at N={n}, R={capacity}; got {len(changes)} changes"
            )
        if rep > 0:
            for key, value in sample.items():
                times[key].append(value)
    return times


# ---- B: communication from shapes ----------------------------------------------------------------------
def communication_rows() -> list[list]:

    rows = []
    for name, shape in LLAMA3.items():
        for r in (8, 32):
            with torch.device("meta"):
                model = LlamaForCausalLM(LlamaConfig(**shape))
            base_params = sum(p.numel() for p in model.parameters())
            config = FlexLoRAConfig(target_modules=TARGETS, r=r)
            adapters = inject(model, config)
            n = len(adapters.layers)
            adapter_params = sum(
                p.numel() for layer in adapters.layers.values() for p in layer.parameters() if p.requires_grad
            )
            adapter_bytes = adapter_params * torch.finfo(getattr(torch, config.adapter_dtype)).bits // 8
            model_bytes = base_params * 2  # bf16 weights
            for world in WORLDS:
                _, received = lambda_gather_payload(n, config.max_rank, world)
                alloc_bytes = received * 4 + AGREEMENT_BYTES
                rows.append(
                    [
                        name,
                        r,
                        config.max_rank,
                        n,
                        world,
                        n * config.max_rank * 4,
                        received * 4,
                        alloc_bytes,
                        adapter_bytes,
                        model_bytes,
                        f"{alloc_bytes / adapter_bytes:.2e}",
                        f"{alloc_bytes / model_bytes:.2e}",
                        n * config.max_rank * 8,
                    ]
                )
    return rows


# ---- report --------------------------------------------------------------------------------------------
def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares log-log slope over the three largest N: 1.0 means time grows linearly with N."""

    xs, ys = zip(*[(math.log(n), math.log(t)) for n, t in sorted(points)[-3:]])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(measured: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, capacity in enumerate(sorted({c for _, c in measured})):
        points = sorted((n, median(t["step"]) * 1e3) for (n, c), t in measured.items() if c == capacity)
        decide = sorted((n, median(t["decide"]) * 1e3) for (n, c), t in measured.items() if c == capacity)
        ax.plot(*zip(*points), marker="o", color=f"C{index}", label=f"allocator.step, R={capacity}")
        ax.plot(*zip(*decide), marker="x", linestyle="--", color=f"C{index}", label=f"allocator.decide, R={capacity}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapted matrices N")
    ax.set_ylabel("ms per allocation step (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, measured, comm, wall_s, loads, command) -> str:
    ms = 1e3
    out = ["# FlexLoRA allocator scaling", "", provenance(command, "cpu", wall_s, loads), ""]
    out += [
        "## A. Allocation cost vs number of matrices N and capacity R (measured)",
        "",
        f"Synthetic FlexLoRA layers of d x d, d = max({SYNTHETIC_D}, R), with random lambda, r = 2R/3 active, AdamW "
        f"state; one process; b0 = {Schedule(1).b0} prunes and {Schedule(1).b0} expands per step; median of "
        f"{args.reps} steps (after one dropped warm-up), timed in "
        f"{'process CPU time' if args.clock == 'cpu' else 'wall time'} with {torch.get_num_threads()} intra-op "
        "thread(s). 'gather' stacks lambda and the masks into [N, R] (no collective in one process); 'decide' is "
        "`RankAllocator.decide` (gather + importance + selection as the library calls them); 'step' is "
        "`RankAllocator.step` (decide + apply + optimizer surgery). Milliseconds:",
        "",
    ]
    rows = []
    for (n, capacity), t in sorted(measured.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        step = median(t["step"])
        rows.append(
            [n, capacity]
            + [median(t[k]) * ms for k in ("gather", "importance", "selection", "decide", "step")]
            + [step / n * 1e6]
        )
    out += [
        markdown_table(["N", "R", "gather", "importance", "selection", "decide", "step", "step us / matrix"], rows),
        "",
    ]
    slope_rows = []
    for capacity in sorted({c for _, c in measured}):
        points = [(n, median(t["step"])) for (n, c), t in measured.items() if c == capacity]
        decide = [(n, median(t["decide"])) for (n, c), t in measured.items() if c == capacity]
        if len(points) >= 2:
            slope_rows.append([capacity, f"{_slope(decide):.2f}", f"{_slope(points):.2f}"])
    out += [
        "Growth over the three largest N (least-squares log-log slope; 1 = linear in N):",
        "",
        markdown_table(["R", "decide slope", "step slope"], slope_rows),
        "",
    ]
    if (args.out / "scaling.png").exists():
        out += ["![allocation time vs N](scaling.png)", ""]

    out += [
        "## B. Communication per allocation step, LLaMA3 shapes (computed)",
        "",
        "Targets q, k, v, up, down; capacity R = max_rank = ceil(1.5 r) (the library default). Under FSDP2 / ZeRO-3 "
        "lambda is sharded and gathered once per allocation step: every process contributes ceil(R / world) float32 "
        "per module (zero-padded, so the gather exceeds the N x R x 4 bytes of lambda when world does not divide R) "
        "and receives world x that ('lambda gather', from "
        "`flexlora.distributed.lambda_gather_payload`); 'per allocation' adds the 16-byte all-reduce of the agreement "
        "check. Under DDP / ZeRO-1/2 lambda is replicated and only the 16 bytes move. Compared against one all-gather "
        "of the whole adapter (P, lambda, Q at capacity, float32) and of the whole model (bf16 weights). The last "
        "column is the extra [N, R] float64 all-reduce that only importance='sensitivity' adds on sharded engines. "
        "Allocation happens once every Delta_T steps (1000 in the paper's LLaMA3 runs); FSDP all-gathers the whole "
        "model at least once every step.",
        "",
        markdown_table(
            [
                "model",
                "r",
                "R",
                "N",
                "world",
                "N x R x 4 B",
                "lambda gather B",
                "per allocation B",
                "adapter all-gather",
                "model all-gather",
                "alloc / adapter",
                "alloc / model",
                "sensitivity all-reduce B",
            ],
            [row[:8] + [_human(row[8]), _human(row[9])] + row[10:] for row in comm],
        ),
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python -m bench.scaling " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    loads_start, started = load_averages(), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = {}
    for capacity in args.capacities:
        for n in args.matrices:
            measured[(n, capacity)] = time_allocation(n, capacity, args.reps, CLOCKS[args.clock])
            print(
                f"N={n} R={capacity}: step {median(measured[(n, capacity)]['step']) * 1e3:.2f} ms, "
                f"load {load_averages()}",
                file=sys.stderr,
            )
    comm = communication_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    plot(measured, args.out / "scaling.png")
    wall_s = time.perf_counter() - started
    text = report(args, measured, comm, wall_s, (loads_start, load_averages()), command)
    (args.out / "scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
