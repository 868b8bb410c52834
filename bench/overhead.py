"""FlexLoRA's training overhead next to PEFT LoRA and AdaLoRA (issue #6, part 1).

Same model, batch, targets (q, k, v, up, down) and schedule for every method; all methods live in one process
and are stepped in turn (A B C ... A B C ...), so load on a shared machine hits them alike. Reported:

1. train-step time (forward + backward + optimizer + the method's own per-step work) and its phases;
2. the cost of one allocation step (gather + importance + selection, then apply + optimizer surgery), absolute
   and amortised over the paper's Delta_T;
3. the forward cost of the capacity slots (model level) and each adapter's forward + backward per adapted layer shape;
4. peak memory, each measurement in a fresh process.

    python -m bench.overhead --cpu                    # SmolLM2-135M on this CPU, writes bench/results/overhead.md
    python -m bench.overhead --model llama3-8b-slice  # LLaMA3-8B's shapes, 2 layers, CPU fp32
                                                      # -> overhead_llama3-8b-slice.md
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
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.common import CLOCKS, METHODS, Schedule, load_model
from bench.overhead_measure import run_layer_train, run_memory, run_model_forward, run_training
from bench.overhead_report import report
from bench.reporting import load_averages

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
