"""FlexLoRA's training overhead next to PEFT LoRA and AdaLoRA (issue #6, part 1).

Same model, batch, targets (q, k, v, up, down) and schedule for every method; all methods live in one process
and are stepped in turn (A B C ... A B C ...), so load on a shared machine hits them alike. Reported:

1. train-step time (forward + backward + optimizer + the method's own per-step work) and its phases;
2. the cost of one allocation step (gather + importance + selection, then apply + optimizer surgery), absolute
   and amortised over the paper's Delta_T;
3. the forward cost of the capacity slots (model level) and each adapter's forward + backward per adapted layer shape;
4. peak memory, each measurement in a fresh process.

    python -m bench.overhead --cpu                    # SmolLM2-135M on this CPU, writes bench/results/overhead.md
    python -m bench.overhead --model llama3-8b-slice  # LLaMA3-8B's shapes, 2 layers, CPU fp32 -> overhead_llama3-8b-slice.md
    python -m bench.overhead --model llama3-8b-slice --device cuda --dtype bfloat16 --layers 8 --batch 4 --seq 1024 \
        --out bench/results/gpu
    python -m bench.overhead --smoke --out /tmp/x     # seconds, tiny random Llama (tests/test_bench_smoke.py)

``llama3-8b-slice`` is LlamaForCausalLM built from LLaMA3-8B's config (hidden 4096, MLP 14336, 32 / 8 heads, vocab
128256) with ``--layers`` decoder layers and random weights: nothing is downloaded. Its embedding and 128256-way output
layer are full size, so with 2 of 32 layers they take a larger share of a step than in the full model, which makes
the step ratios below understate a per-layer difference; the per-layer table (section 3) does not have that bias.

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
    Schedule,
    attach,
    fresh_process_pool,
    load_averages,
    load_model,
    make_optimizer,
    peak_memory,
    random_batch,
    sync,
    target_shapes,
    time_decision,
    train_step,
)

PAPER_DELTA_T = (100, 200, 1000)  # the Delta_T values of the paper's Tables 8, 9 and 11
PROFILES = {
    "smoke": dict(
        model="tiny",
        batch=1,
        seq=16,
        rounds=2,
        warmup_rounds=1,
        memory_reps=1,
        memory_steps=2,
        micro_samples=2,
        micro_sample_ms=1.0,
        threads=1,
    ),
    # One intra-op thread: on a shared 2-core machine a descheduled second thread stalls every parallel region
    # at its barrier, which adds the neighbours' load to the timings instead of this process's own work.
    "cpu": dict(
        model="smollm2",
        batch=2,
        seq=128,
        rounds=20,
        warmup_rounds=2,
        memory_reps=3,
        memory_steps=2,
        micro_samples=15,
        micro_sample_ms=20.0,
        threads=1,
    ),
    # ~9 s of CPU per train step: fewer rounds, and the four methods the issue compares (add the others with --methods)
    "llama3-8b-slice": dict(
        model="llama3-8b-slice",
        batch=1,
        seq=128,
        rounds=8,
        warmup_rounds=1,
        memory_reps=2,
        memory_steps=2,
        micro_samples=9,
        micro_sample_ms=50.0,
        threads=1,
        methods=["flexlora", "lora_r8", "lora_r12", "adalora"],
    ),
}
# (FlexLoRA / LoRA r=8 step, FlexLoRA / AdaLoRA step) bounds: issue #6 on SmolLM2, issue #13 at LLaMA3-8B's shapes
STEP_BOUNDS = {"llama3-8b-slice": (1.02, 0.95)}
DEFAULT_STEP_BOUNDS = (1.03, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--smoke", action="store_true", help="tiny random Llama, a few seconds (for tests)")
    profile.add_argument("--cpu", action="store_true", help="the CPU measurement (default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="tiny | smollm2 | llama3-8b-slice | a path or hub id")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of llama3-8b-slice")
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
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), help="what times are: process CPU time (default on CPU) or wall"
    )
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=12)
    parser.add_argument(
        "--delta-t", type=int, default=100, help="Delta_T of the schedule both FlexLoRA and AdaLoRA run"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all six (the 8B slice: four)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    profile = "smoke" if args.smoke else "llama3-8b-slice" if args.model == "llama3-8b-slice" else "cpu"
    for key, value in {"methods": list(METHODS), **PROFILES[profile]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.step_bounds = STEP_BOUNDS.get(args.model, DEFAULT_STEP_BOUNDS)
    args.report_name = f"overhead_{args.model}.md" if args.model == "llama3-8b-slice" else "overhead.md"
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
    # every copy shares the frozen base weights (a fresh memo per copy: deepcopy adds what it copied to the memo)
    frozen = {id(param): param for param in base.parameters()}
    for method in methods:
        torch.manual_seed(0)
        attached = attach(
            method, copy.deepcopy(base, dict(frozen)), r=args.r, max_rank=args.max_rank, schedule=schedule
        )
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
        print(
            f"round {round_index + 1}/{args.warmup_rounds + args.rounds} done, load {load_averages()}", file=sys.stderr
        )
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


LAYER_VARIANTS = ("flexlora", "flexlora_cap8", "lora_r8", "lora_r12", "adalora")


class _HollowLinear(torch.nn.Linear):
    """A Linear whose forward returns zeros of the right shape without touching its weight: wrapped by an adapter,
    the layer's forward and backward are the adapter's alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _layer_variant(variant: str, d_in: int, d_out: int, args, dtype) -> torch.nn.Module:
    """One adapter on a hollow Linear of the given shape, built with each library's public injection API, in
    training mode (FlexLoRA's orthogonality penalty runs in its training forward)."""
    from peft import AdaLoraConfig, LoraConfig, inject_adapter_in_model

    from flexlora import FlexLoRAConfig, inject

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = _HollowLinear(d_in, d_out, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    if variant in ("flexlora", "flexlora_cap8"):
        capacity = args.max_rank if variant == "flexlora" else args.r
        inject(holder, FlexLoRAConfig(target_modules=["proj"], r=args.r, max_rank=capacity, lora_alpha=16))
        with torch.no_grad():  # lambda starts at 0; give it values so no path can shortcut a zero
            holder.proj.lora_lambda.normal_()
    elif variant in ("lora_r8", "lora_r12"):
        inject_adapter_in_model(
            LoraConfig(r=args.r if variant == "lora_r8" else args.max_rank, lora_alpha=16, target_modules=["proj"]),
            holder,
        )
    else:
        inject_adapter_in_model(
            AdaLoraConfig(
                init_r=args.max_rank, target_r=args.r, lora_alpha=16, target_modules=["proj"], total_step=1000
            ),
            holder,
        )
    return holder.proj.to(args.device).train()


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Forward, then backward to the adapter's parameters and to the input (as inside a network)."""
    loss = (layer(x) * grad_out).sum()
    tracker = getattr(layer, "loss_scale_tracker", None)
    (tracker.mark(loss) if tracker is not None else loss).backward()
    x.grad = None
    for param in layer.parameters():
        param.grad = None


def run_layer_train(args, base, dtype) -> dict[tuple[int, int], dict[str, list[float]]]:
    """Per distinct adapted shape: seconds per forward + backward of each adapter alone (its base Linear hollow), and of
    the dense frozen Linear alone ("dense", input gradient only), at batch x seq tokens. Each sample repeats its
    variant for at least ``micro_sample_ms``, variants interleaved."""
    clock = CLOCKS[args.clock]
    results = {}
    for d_in, d_out in sorted(set(target_shapes(base).values())):
        dense = torch.nn.Linear(d_in, d_out, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
        layers = {"dense": dense, **{v: _layer_variant(v, d_in, d_out, args, dtype) for v in LAYER_VARIANTS}}
        x = torch.randn(args.batch, args.seq, d_in, device=args.device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(args.batch, args.seq, d_out, device=args.device, dtype=dtype)
        iters = {}
        for variant, layer in layers.items():  # the first call pays one-off setup; the second sizes the repeats
            _layer_step(layer, x, grad_out)
            sync(args.device)
            start = clock()
            _layer_step(layer, x, grad_out)
            sync(args.device)
            iters[variant] = max(1, int(args.micro_sample_ms / 1e3 / max(clock() - start, 1e-7)))
        samples = {v: [] for v in layers}
        for _ in range(args.micro_samples):
            for variant, layer in layers.items():
                start = clock()
                for _ in range(iters[variant]):
                    _layer_step(layer, x, grad_out)
                sync(args.device)
                samples[variant].append((clock() - start) / iters[variant])
        results[(d_in, d_out)] = samples
    return results


# ---- 4: memory -----------------------------------------------------------------------------------------
def run_memory(args, methods: list[str]) -> dict[str, list[dict]]:
    results = {m: [] for m in methods}
    with fresh_process_pool() as pool:
        for _ in range(args.memory_reps):
            for method in methods:
                job = dict(
                    model=args.model,
                    layers=args.layers,
                    device=args.device,
                    dtype=args.dtype,
                    method=method,
                    r=args.r,
                    max_rank=args.max_rank,
                    delta_t=args.delta_t,
                    batch=args.batch,
                    seq=args.seq,
                    steps=args.memory_steps,
                    threads=args.threads,
                )
                results[method].append(pool.apply(peak_memory, (job,)))
    return results


def state_bytes(attached, optimizer) -> dict[str, int]:
    """Bytes of what training keeps for the adapter, read off the live tensors after the timed steps."""
    trainable = [p for p in attached.model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in trainable)
    optim = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    extra = sum(t.numel() * t.element_size() for t in attached.extra_state())
    buffers = sum(
        b.numel() * b.element_size() for n, b in attached.model.named_buffers() if "rank_mask" in n or "ranknum" in n
    )
    # gradients are the size of the trainable parameters (they are freed by zero_grad, so not read off)
    return {
        "params": params,
        "grads": params,
        "optimizer": optim,
        "method": extra + buffers,
        "total": 2 * params + optim + extra + buffers,
    }


def main(argv=None) -> None:
    from bench.overhead_report import report  # (it imports this module)

    args = parse_args(argv)
    command = "python -m bench.overhead " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    loads_start, started = load_averages(), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = Schedule(args.delta_t)
    methods = list(args.methods)
    dtype = getattr(torch, args.dtype)

    memory = run_memory(args, methods)
    base = load_model(args.model, args.device, dtype, args.layers)
    samples, runs = run_training(args, base, methods, schedule)
    forward = run_model_forward(args, runs, methods)
    layer = run_layer_train(args, base, dtype)

    wall_s = time.perf_counter() - started
    text = report(
        args, base, schedule, samples, runs, forward, layer, memory, wall_s, (loads_start, load_averages()), command
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.report_name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
