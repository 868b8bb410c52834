"""FlexLoRA's training overhead next to PEFT LoRA and AdaLoRA (issue #6, part 1).

Same model, batch, targets (q, k, v, up, down) and schedule for every method; all methods live in one process
and are stepped in turn (A B C ... A B C ...), so load on a shared machine hits them alike. Reported:

1. train-step time (forward + backward + optimizer + the method's own per-step work) and its phases;
2. the cost of one allocation step (gather + importance + selection, then apply + optimizer surgery), absolute
   and amortised over the paper's Delta_T;
3. the forward cost of the capacity slots, model-level and per adapted layer shape;
4. peak memory, each measurement in a fresh process.

    python -m bench.overhead --cpu                    # SmolLM2-135M on this CPU, writes bench/results/overhead.md
    python -m bench.overhead --smoke --out /tmp/x     # seconds, tiny random Llama (tests/test_bench_smoke.py)
    python -m bench.overhead --device cuda --model meta-llama/Meta-Llama-3-8B --dtype bfloat16 --batch 4 --seq 1024 \
        --out bench/results/gpu

Methods: ``flexlora`` (r=8 active, max_rank=12 capacity), ``flexlora_cap8`` (r=8, max_rank=8: the same code
without spare slots) and ``flexlora_no_orth`` (flexlora without the orthogonality penalty), which separate the
cost of the slots and of the penalty from the rest of the implementation; ``lora_r8`` (same active rank),
``lora_r12`` (same capacity), ``adalora`` (init_r=12, target_r=8).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.common import (
    CLOCKS,
    METHODS,
    PHASES,
    Schedule,
    attach,
    fresh_process_pool,
    load_averages,
    load_model,
    make_optimizer,
    markdown_table,
    median,
    peak_memory,
    provenance,
    random_batch,
    sync,
    target_shapes,
    time_decision,
    train_step,
)

PAPER_DELTA_T = (100, 200, 1000)  # the Delta_T values of the paper's Tables 8, 9 and 11
PROFILES = {
    "smoke": dict(model="tiny", batch=1, seq=16, rounds=2, warmup_rounds=1, memory_reps=1, memory_steps=2,
                  micro_samples=2, micro_sample_ms=1.0, threads=1),
    # One intra-op thread: on a shared 2-core machine a descheduled second thread stalls every parallel region
    # at its barrier, which adds the neighbours' load to the timings instead of this process's own work.
    "cpu": dict(model="smollm2", batch=2, seq=128, rounds=20, warmup_rounds=2, memory_reps=3, memory_steps=2,
                micro_samples=15, micro_sample_ms=20.0, threads=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--smoke", action="store_true", help="tiny random Llama, a few seconds (for tests)")
    profile.add_argument("--cpu", action="store_true", help="the CPU measurement (default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="tiny | smollm2 | a path or hub id")
    parser.add_argument("--dtype", default="float32", help="base-model dtype (adapters stay float32 in every method)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--rounds", type=int, help="timed rounds; each steps every method once")
    parser.add_argument("--warmup-rounds", type=int)
    parser.add_argument("--memory-reps", type=int, help="fresh processes per method for peak memory")
    parser.add_argument("--memory-steps", type=int, help="training steps per memory process (the last allocates)")
    parser.add_argument("--micro-samples", type=int, help="samples per variant in the layer-level forward benchmark")
    parser.add_argument("--micro-sample-ms", type=float, help="each layer-level sample repeats the forward this long")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="what times are: process CPU time (default on CPU) or wall")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=12)
    parser.add_argument("--delta-t", type=int, default=100, help="Delta_T of the schedule both FlexLoRA and AdaLoRA run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    for key, value in PROFILES["smoke" if args.smoke else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device != "cpu" and args.threads == PROFILES["cpu"]["threads"]:
        args.threads = None  # the one-thread setting is for the shared CPU machine, not for a GPU host
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" else "wall"
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures host CPU time, which misses GPU work: use --clock wall with --device cuda")
    return args


# ---- 1 + 2: interleaved train steps, normal and allocation ---------------------------------------------
def run_training(args, base, methods: list[str], schedule: Schedule) -> tuple[dict, dict]:
    """Returns (samples, runs): samples[method][kind] is a list of per-round dicts, runs[method] the live objects."""
    runs = {}
    for method in methods:
        torch.manual_seed(0)
        attached = attach(method, copy.deepcopy(base), r=args.r, max_rank=args.max_rank, schedule=schedule)
        runs[method] = (attached, make_optimizer(attached))
    batch = random_batch(base.config.vocab_size, args.batch, args.seq, args.device)
    allocating = [m for m in methods if m in ("flexlora", "adalora")]
    samples = {m: {"normal": [], "alloc": [], "decision": []} for m in methods}
    for round_index in range(args.warmup_rounds + args.rounds):
        record = round_index >= args.warmup_rounds
        for method in methods:
            attached, optimizer = runs[method]
            times = train_step(attached, optimizer, batch, schedule.normal_step, args.device)
            if record:
                samples[method]["normal"].append({**times[args.clock], "wall_total": times["wall"]["total"]})
        for method in allocating:
            attached, optimizer = runs[method]
            if method == "flexlora":
                decision = time_decision(attached.allocator, schedule.alloc_step, CLOCKS[args.clock])
                if record:
                    samples[method]["decision"].append(decision)
            times = train_step(attached, optimizer, batch, schedule.alloc_step, args.device)
            if record:
                samples[method]["alloc"].append({**times[args.clock], "wall_total": times["wall"]["total"]})
        print(f"round {round_index + 1}/{args.warmup_rounds + args.rounds} done, load {load_averages()}", file=sys.stderr)
    return samples, runs


# ---- 3: forward cost of the capacity slots -------------------------------------------------------------
@torch.no_grad()
def run_model_forward(args, runs: dict, methods: list[str]) -> dict[str, list[float]]:
    batch = random_batch(next(iter(runs.values()))[0].model.config.vocab_size, args.batch, args.seq, args.device)
    for attached, _ in runs.values():
        attached.model.eval()
    clock = CLOCKS[args.clock]
    times = {m: [] for m in methods}
    for round_index in range(args.warmup_rounds + args.rounds):
        for method in methods:
            model = runs[method][0].model
            start = clock()
            model(input_ids=batch)
            sync(args.device)
            if round_index >= args.warmup_rounds:
                times[method].append(clock() - start)
    return times


LAYER_VARIANTS = ("plain", "flexlora", "flexlora_cap8", "lora_r8", "lora_r12")


def _layer_variant(variant: str, d_in: int, d_out: int, args, dtype) -> torch.nn.Module:
    """One adapted Linear of the given shape, built with each library's public injection API."""
    from flexlora import FlexLoRAConfig, inject
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(d_in, d_out, bias=False).to(device=args.device, dtype=dtype)
    if variant in ("flexlora", "flexlora_cap8"):
        capacity = args.max_rank if variant == "flexlora" else args.r
        inject(holder, FlexLoRAConfig(target_modules=["proj"], r=args.r, max_rank=capacity, lora_alpha=16))
        with torch.no_grad():  # lambda starts at 0; give it values so no path can shortcut a zero
            holder.proj.lora_lambda.normal_()
    elif variant in ("lora_r8", "lora_r12"):
        inject_adapter_in_model(LoraConfig(r=args.r if variant == "lora_r8" else args.max_rank, lora_alpha=16, target_modules=["proj"]), holder)
    return holder.proj.to(args.device).eval()


@torch.no_grad()
def run_layer_forward(args, base, dtype) -> dict[tuple[int, int], dict[str, list[float]]]:
    """Per distinct adapted shape: seconds per forward of base + adapter at batch x seq tokens."""
    clock = CLOCKS[args.clock]
    results = {}
    for d_in, d_out in sorted(set(target_shapes(base).values())):
        layers = {v: _layer_variant(v, d_in, d_out, args, dtype) for v in LAYER_VARIANTS}
        x = torch.randn(args.batch, args.seq, d_in, device=args.device, dtype=dtype)
        for layer in layers.values():  # the first call pays one-off setup
            layer(x)
        slowest = 0.0
        for layer in layers.values():
            sync(args.device)
            start = clock()
            layer(x)
            sync(args.device)
            slowest = max(slowest, clock() - start)
        iters = max(1, int(args.micro_sample_ms / 1e3 / max(slowest, 1e-7)))  # long enough to sit above timer noise
        samples = {v: [] for v in LAYER_VARIANTS}
        for _ in range(args.micro_samples):
            for variant, layer in layers.items():
                start = clock()
                for _ in range(iters):
                    layer(x)
                sync(args.device)
                samples[variant].append((clock() - start) / iters)
        results[(d_in, d_out)] = samples
    return results


# ---- 4: memory -----------------------------------------------------------------------------------------
def run_memory(args, methods: list[str]) -> dict[str, list[dict]]:
    results = {m: [] for m in methods}
    with fresh_process_pool() as pool:
        for _ in range(args.memory_reps):
            for method in methods:
                job = dict(model=args.model, device=args.device, dtype=args.dtype, method=method, r=args.r, max_rank=args.max_rank,
                           delta_t=args.delta_t, batch=args.batch, seq=args.seq, steps=args.memory_steps, threads=args.threads)
                results[method].append(pool.apply(peak_memory, (job,)))
    return results


def state_bytes(attached, optimizer) -> dict[str, int]:
    """Bytes of what training keeps for the adapter, read off the live tensors after the timed steps."""
    trainable = [p for p in attached.model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in trainable)
    optim = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    extra = sum(t.numel() * t.element_size() for t in attached.extra_state())
    buffers = sum(b.numel() * b.element_size() for n, b in attached.model.named_buffers() if "rank_mask" in n or "ranknum" in n)
    # gradients are the size of the trainable parameters (they are freed by zero_grad, so not read off)
    return {"params": params, "grads": params, "optimizer": optim, "method": extra + buffers,
            "total": 2 * params + optim + extra + buffers}


# ---- report --------------------------------------------------------------------------------------------
def _q(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def _averaged_step(samples: dict, method: str, delta_t: int) -> list[float]:
    """Per round: the normal step plus this round's extra allocation work spread over Delta_T steps."""
    normal = samples[method]["normal"]
    alloc = samples[method]["alloc"]
    if not alloc:
        return [s["total"] for s in normal]
    return [n["total"] + (a["method"] - n["method"]) / delta_t for n, a in zip(normal, alloc)]


def _verdict(value: float, bound: float, spread: tuple[float, float] | None = None) -> str:
    """met / missed on the median; says so when the bound lies inside the spread of the measurement."""
    text = "met" if value <= bound else "**missed**"
    if spread is not None and spread[0] <= bound < spread[1]:
        text += " (bound inside the 25-75 % range: not resolved)"
    return text


CLOCK_TEXT = {
    "cpu": "Clock: **process CPU time** (`time.process_time`) with {threads} intra-op thread(s), for every time below "
           "except the 'wall ms' column. The machine is shared, so wall time also counts the time this process waited "
           "for a core; CPU time counts the work. It still carries cache and memory-bandwidth interference from the "
           "neighbours, which is what the 25-75 % ranges show.",
    "wall": "Clock: **wall time** (`time.perf_counter`, after a device synchronise) for every time below.",
}


def report(args, base, schedule, samples, runs, forward, layer, memory, wall_s, loads, command) -> str:
    methods = list(runs)
    ms = 1e3
    out = ["# FlexLoRA overhead vs PEFT LoRA and AdaLoRA", "", provenance(command, args.device, wall_s, loads), ""]
    n_matrices = len(target_shapes(base))
    out += [
        "## Setup", "",
        f"Model `{args.model}` ({base.config.num_hidden_layers} layers, hidden {base.config.hidden_size}, "
        f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params, {args.dtype}) on `{args.device}`; "
        f"batch {args.batch} x {args.seq} tokens of random ids (labels = inputs); targets q, k, v, up, down "
        f"({n_matrices} matrices); AdamW lr 3e-4 over the adapter; no dropout; alpha 16.",
        f"FlexLoRA r={args.r}, max_rank={args.max_rank}, b0={schedule.b0}; AdaLoRA init_r={args.max_rank}, "
        f"target_r={args.r}; both with Delta_T={schedule.delta_t}, warm-up {schedule.t_warmup}, final "
        f"{schedule.t_final}, total {schedule.total_steps} steps. 'Normal' steps run at step {schedule.normal_step} "
        f"(inside the allocation window, off the Delta_T grid); allocation steps at step {schedule.alloc_step} "
        f"(FlexLoRA moves b(t)={schedule.b0} ranks, AdaLoRA re-masks). {args.rounds} timed rounds after "
        f"{args.warmup_rounds} warm-up rounds; every round steps each method once (normal), then FlexLoRA and "
        "AdaLoRA once more at an allocation step. Times are medians over rounds; ratios are medians of per-round "
        "ratios (both methods stepped seconds apart), with the 25-75 % range of those ratios.",
        "",
        CLOCK_TEXT[args.clock].format(threads=torch.get_num_threads()),
        "",
    ]

    # 1. train step
    out += ["## 1. Train step (normal steps)", ""]
    rows = []
    for m in methods:
        normal = samples[m]["normal"]
        rows.append([m] + [median([s[p] for s in normal]) * ms for p in ("total", "wall_total") + PHASES])
    out += [markdown_table(["method", "step ms", "wall ms", *[f"{p} ms" for p in PHASES]], rows), ""]
    rows = []
    for m in methods:
        row = [m]
        for ref in ("lora_r8", "lora_r12", "adalora"):
            if ref not in samples:
                row.append("-")
                continue
            ratios = _paired([s["total"] for s in samples[m]["normal"]], [s["total"] for s in samples[ref]["normal"]])
            row.append(f"{median(ratios):.3f} [{_q(ratios, 0.25):.3f}, {_q(ratios, 0.75):.3f}]")
        rows.append(row)
    out += ["Step-time ratios (normal steps):", "", markdown_table(["method", "/ lora_r8", "/ lora_r12", "/ adalora"], rows), ""]

    # 2. allocation
    out += ["## 2. Allocation step", ""]
    targets_rows = []
    if "flexlora" in samples:
        flex = samples["flexlora"]
        step_ms = median([s["total"] for s in flex["normal"]]) * ms
        hook_alloc = median([s["method"] for s in flex["alloc"]]) * ms
        hook_normal = median([s["method"] for s in flex["normal"]]) * ms
        decision = {k: median([d[k] for d in flex["decision"]]) * ms for k in ("gather", "importance", "selection", "decide")}
        apply_ms = hook_alloc - decision["decide"]
        rows = [
            ["gather lambda + masks", decision["gather"]],
            ["importance (entropy)", decision["importance"]],
            ["selection (matrices + slots)", decision["selection"]],
            ["`allocator.decide` (the three above, as called)", decision["decide"]],
            ["apply + optimizer surgery (step - decide)", apply_ms],
            ["**`allocator.step` at an allocation step**", hook_alloc],
            ["`allocator.step` at a normal step", hook_normal],
        ]
        rows = [[name, value, f"{100 * value / step_ms:.3f} %"] for name, value in rows]
        out += [f"FlexLoRA, {n_matrices} matrices, {schedule.b0} ranks moved per allocation; % of the median FlexLoRA "
                f"normal step ({step_ms:.1f} ms):", "", markdown_table(["part", "ms", "% of a step"], rows), ""]
        amort = [[d, f"{100 * (hook_alloc - hook_normal) / d / step_ms:.4f} %"] for d in PAPER_DELTA_T]
        out += ["Allocation cost averaged over Delta_T (extra work of the allocation step / Delta_T / step):", "",
                markdown_table(["Delta_T", "% of a train step"], amort), ""]
        amortised = (hook_alloc - hook_normal) / PAPER_DELTA_T[0] / step_ms
        targets_rows.append([f"allocation < 1 % of a step averaged over Delta_T={PAPER_DELTA_T[0]}",
                             f"{100 * amortised:.4f} %", _verdict(amortised, 0.01)])
        targets_rows.append(["(for information: one allocation step, not averaged)", f"{100 * hook_alloc / step_ms:.3f} %", "-"])
    if "adalora" in samples:
        ada = samples["adalora"]
        step_ms = median([s["total"] for s in ada["normal"]]) * ms
        every = median([s["method"] for s in ada["normal"]]) * ms
        at_alloc = median([s["method"] for s in ada["alloc"]]) * ms
        rows = [["`update_and_allocate` at a normal step (sensitivity EMA update)", every, f"{100 * every / step_ms:.3f} %"],
                ["`update_and_allocate` at an allocation step (+ re-mask)", at_alloc, f"{100 * at_alloc / step_ms:.3f} %"]]
        out += [f"AdaLoRA for comparison; % of its median normal step ({step_ms:.1f} ms):", "",
                markdown_table(["part", "ms", "% of a step"], rows), ""]

    # step ratios averaged over Delta_T
    rows = []
    for d in PAPER_DELTA_T:
        row = [d]
        for ref in ("lora_r8", "lora_r12", "adalora"):
            if "flexlora" in samples and ref in samples:
                ratios = _paired(_averaged_step(samples, "flexlora", d), _averaged_step(samples, ref, d))
                row.append(f"{median(ratios):.3f} [{_q(ratios, 0.25):.3f}, {_q(ratios, 0.75):.3f}]")
            else:
                row.append("-")
        rows.append(row)
    out += ["FlexLoRA step averaged over Delta_T (normal step + allocation extra / Delta_T; AdaLoRA likewise), as a "
            "ratio to:", "", markdown_table(["Delta_T", "lora_r8", "lora_r12", "adalora"], rows), ""]
    if "flexlora" in samples:
        d = PAPER_DELTA_T[0]
        step_targets = []
        for ref, bound, label in (("lora_r8", 1.03, "<= 1.03 x LoRA (same active rank)"), ("adalora", 1.0, "<= AdaLoRA")):
            if ref in samples:
                ratios = _paired(_averaged_step(samples, "flexlora", d), _averaged_step(samples, ref, d))
                spread = (_q(ratios, 0.25), _q(ratios, 0.75))
                step_targets.append([f"FlexLoRA step {label}, Delta_T={d}",
                                     f"{median(ratios):.3f} [{spread[0]:.3f}, {spread[1]:.3f}]", _verdict(median(ratios), bound, spread)])
        targets_rows = step_targets + targets_rows

    # 3. forward
    out += ["## 3. Forward cost of the capacity slots", ""]
    rows = []
    for m in methods:
        row = [m, median(forward[m]) * ms]
        for ref in ("lora_r8", "flexlora_cap8"):
            row.append(f"{median(_paired(forward[m], forward[ref])):.3f}" if ref in forward else "-")
        rows.append(row)
    out += ["Whole model, eval mode, no grad (no orthogonality penalty in any method):", "",
            markdown_table(["method", "forward ms", "/ lora_r8", "/ flexlora_cap8"], rows), ""]
    rows = []
    for (d_in, d_out), by_variant in layer.items():
        plain = median(by_variant["plain"])
        adapter = {v: median(by_variant[v]) - plain for v in LAYER_VARIANTS[1:]}

        def adapter_ratio(a: str, b: str) -> str:
            return f"{adapter[a] / adapter[b]:.2f}" if adapter[b] > 0 else "-"

        rows.append([f"{d_in} -> {d_out}", plain * 1e6] + [median(by_variant[v]) * 1e6 for v in LAYER_VARIANTS[1:]]
                    + [adapter_ratio("flexlora", "lora_r8"), adapter_ratio("flexlora", "flexlora_cap8"),
                       adapter_ratio("lora_r12", "lora_r8"), f"{median(_paired(by_variant['flexlora'], by_variant['lora_r8'])):.3f}"])
    out += [f"One adapted Linear, {args.batch * args.seq} tokens, eval, no grad; microseconds per forward (median of "
            f"{args.micro_samples} interleaved samples). 'adapter' = variant minus the plain Linear; the spare slots "
            f"make the adapter path's FLOPs max_rank / r = {args.max_rank / args.r:.2f} x those of rank r:", "",
            markdown_table(["d_in -> d_out", "plain us", "flexlora us", "flexlora_cap8 us", "lora_r8 us", "lora_r12 us",
                            "adapter flexlora / lora_r8", "adapter flexlora / cap8", "adapter lora_r12 / lora_r8",
                            "layer flexlora / lora_r8"], rows), ""]

    # 4. memory
    what = ("peak `torch.cuda.max_memory_allocated` over the steps" if args.device.startswith("cuda") else
            "peak resident set size (VmHWM, high-water mark reset after model load and adapter setup) over the steps")
    out += ["## 4. Memory", "",
            f"Each measurement is a fresh process (forked from a server that has only imported the libraries) running "
            f"{args.memory_steps} training steps, the last at an allocation step; {what}; median of {args.memory_reps} "
            "processes per method. 'base' is the memory right before the steps (weights, adapters, data).", ""]
    rows = []
    peak = {m: median([r["peak_mib"] for r in memory[m]]) for m in memory}
    for m in memory:
        rows.append([m, median([r["baseline_mib"] for r in memory[m]]), peak[m],
                     f"{min(r['peak_mib'] for r in memory[m]):.0f}-{max(r['peak_mib'] for r in memory[m]):.0f}",
                     f"{peak[m] / peak['lora_r8']:.4f}" if "lora_r8" in peak else "-",
                     f"{peak[m] / peak['lora_r12']:.4f}" if "lora_r12" in peak else "-"])
    out += [markdown_table(["method", "base MiB", "peak MiB", "peak range", "/ lora_r8", "/ lora_r12"], rows), ""]
    rows = []
    for m in methods:
        sb = state_bytes(*runs[m])
        rows.append([m] + [sb[k] / 2**20 for k in ("params", "grads", "optimizer", "method", "total")])
    out += ["Adapter training state, read off the live tensors (MiB; 'method' = AdaLoRA's sensitivity EMAs and "
            "FlexLoRA's rank masks / AdaLoRA's ranknum buffers):", "",
            markdown_table(["method", "params", "grads", "AdamW state", "method", "total"], rows), ""]
    if "flexlora" in peak and "lora_r12" in peak:
        ratio = peak["flexlora"] / peak["lora_r12"]
        targets_rows.append(["memory <= 1.02 x LoRA at equal capacity (lora_r12), peak", f"{ratio:.4f}", _verdict(ratio, 1.02)])
        state = state_bytes(*runs["flexlora"])["total"] / state_bytes(*runs["lora_r12"])["total"]
        targets_rows.append(["(same, adapter training state read off the tensors)", f"{state:.4f}", _verdict(state, 1.02)])

    out += ["## Targets", "", markdown_table(["target", "measured", "verdict"], targets_rows), ""]
    out += [
        "How to read a miss: section 1's phases say where time goes. flexlora / flexlora_cap8 is the price of the "
        "spare slots (adapter FLOPs at max_rank instead of r); flexlora / flexlora_no_orth the price of the "
        "orthogonality penalty FlexLoRA computes inside every training forward (PEFT LoRA has none; AdaLoRA "
        "computes its own once per forward, after the model); flexlora_no_orth / lora_r12 what is left of the "
        "implementation at equal capacity (rank mask and lambda gains). The 25-75 % ranges show how much the "
        "machine's load moves a ratio.",
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python -m bench.overhead " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    loads_start, started = load_averages(), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = Schedule(args.delta_t)
    methods = list(args.methods)
    dtype = getattr(torch, args.dtype)

    memory = run_memory(args, methods)
    base = load_model(args.model, args.device, dtype)
    samples, runs = run_training(args, base, methods, schedule)
    forward = run_model_forward(args, runs, methods)
    layer = run_layer_forward(args, base, dtype)

    wall_s = time.perf_counter() - started
    text = report(args, base, schedule, samples, runs, forward, layer, memory, wall_s, (loads_start, load_averages()), command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
