"""The measurements of ``python -m bench.overhead`` (see bench/overhead.py): interleaved train steps and allocation
decisions, model and per-layer forward cost, peak memory in fresh processes, and the state each method keeps."""

from __future__ import annotations

import copy
import sys

import torch
from peft import AdaLoraConfig, LoraConfig, inject_adapter_in_model

from bench.common import (
    CLOCKS,
    Schedule,
    attach,
    fresh_process_pool,
    make_optimizer,
    peak_memory,
    random_batch,
    sync,
    target_shapes,
    time_decision,
    train_step,
)
from bench.reporting import load_averages
from flexlora import FlexLoRAConfig, inject


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
