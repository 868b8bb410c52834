"""Worker for tests/test_distributed.py: trains a tiny random Llama with FlexLoRA under one engine.

One launch runs every scenario for its engine (each process launch costs seconds of imports) and writes, per
scenario, the final adapter (rank 0) and each rank's masks, allocation history and collectives per allocation
step. The test compares them across ranks and against the single-process run of the same scenarios.

    accelerate launch --config_file accelerate_configs/cpu_fsdp2.yaml tests/distributed/worker.py --engine fsdp2 \
        --out DIR
    accelerate launch --config_file accelerate_configs/cpu_hsdp.yaml tests/distributed/worker.py --engine hsdp --out DIR
    python tests/distributed/worker.py --engine single --out DIR [--resume-from DIR_OF_THE_FSDP2_RUN]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.tensor import Replicate, Shard
from transformers import LlamaConfig, LlamaForCausalLM

import flexlora
from flexlora import distributed as fl_dist
from flexlora.accelerate_setup import build_accelerator
from flexlora.collective_recorder import CollectiveRecorder
from flexlora.errors import UserError
from flexlora.export import adapter_state_dict, export_peft, load_adapters, save_adapters

EXPECTED_TYPE = {
    "single": DistributedType.NO,
    "ddp": DistributedType.MULTI_CPU,
    "fsdp2": DistributedType.FSDP,
    "hsdp": DistributedType.FSDP,
    "zero2": DistributedType.DEEPSPEED,
    "zero3": DistributedType.DEEPSPEED,
}
SHARDED_LAMBDA = {"fsdp2", "hsdp", "zero3"}  # engines under which each process holds only part of lambda
WORLD = {"single": 1, "hsdp": 4}  # processes per engine; 2 for the others
HSDP_MESH = {"dp_replicate": 2, "dp_shard_cp": 2}  # accelerate_configs/cpu_hsdp.yaml (FSDP2 shards over dp_shard_cp)
PEFT_EXPORTED = {"single", "fsdp2", "hsdp"}  # engines whose step-SAVE_AT save is also exported to PEFT
GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 16, 96
TOTAL_STEPS, SAVE_AT = 10, 5
# DeepSpeed clips inside its step (accelerate cannot pass it 0 = off; DeepSpeed's default is 1.0): all engines clip.
MAX_GRAD_NORM = 1.0
# Allocation at steps 3, 5, 7 (t_warmup=3, delta_t=2, up to T - t_final = 8), two matrices each: prune and expand.
# max_rank=7 splits lambda 4 + 3 over two processes, so the uneven-shard path is exercised.
BASE_CONFIG = dict(
    target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    r=4,
    max_rank=7,
    min_rank=1,
    b0=2,
    t_warmup=3,
    delta_t=2,
    t_final=2,
    total_steps=TOTAL_STEPS,
    schedule="constant",
    orth_reg_weight=0.1,
    seed=0,
)
SCENARIOS = {
    "entropy": dict(importance="entropy", expand_init="zero_impact"),
    "sensitivity": dict(importance="sensitivity", expand_init="zero_impact"),
    # New directions orthonormal to the active ones, with a small lambda. The orthogonality penalty's gradient on
    # such a vector is a sum of terms that cancel exactly, i.e. rounding noise, which Adam's first step after
    # the moment reset (g / (|g| + eps)) scales up towards +-lr: no two reduction orders agree on that, so this
    # scenario runs without the penalty (the others have it). expand_init="orthogonal" differs only in lambda = 0,
    # which leaves the new vectors no gradient but that noise.
    "small": dict(importance="entropy", expand_init="small", orth_reg_weight=0.0),
}
# FSDP2 only: the entropy scenario once more with bf16 compute. Not comparable with fp32 runs; checks that it
# trains and that the ranks still agree.
BF16_SCENARIO = "entropy_bf16"
# What each engine must refuse at start-up: scenario (or extra config) -> (config overrides, phrase of the error).
SHARDED_REFUSAL = "orthogonalises a new direction"
DEEPSPEED_REFUSAL = "needs each adapter parameter's gradient"
ORTHOGONAL = ({"expand_init": "orthogonal"}, SHARDED_REFUSAL)
REFUSED = {
    "fsdp2": {"small": (SCENARIOS["small"], SHARDED_REFUSAL), "orthogonal": ORTHOGONAL},
    "hsdp": {"small": (SCENARIOS["small"], SHARDED_REFUSAL), "orthogonal": ORTHOGONAL},
    "zero3": {
        "small": (SCENARIOS["small"], SHARDED_REFUSAL),
        "orthogonal": ORTHOGONAL,
        "sensitivity": (SCENARIOS["sensitivity"], DEEPSPEED_REFUSAL),
    },
    "zero2": {"sensitivity": (SCENARIOS["sensitivity"], DEEPSPEED_REFUSAL)},
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def dataset(first_step: int) -> list[dict[str, torch.Tensor]]:
    """Samples for optimizer steps first_step + 1 .. TOTAL_STEPS; step t always sees the same GLOBAL_BATCH samples."""
    tokens = torch.randint(
        0, VOCAB, (TOTAL_STEPS * GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1234)
    )
    return [{"input_ids": row} for row in tokens[first_step * GLOBAL_BATCH :]]


def eval_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(99))


def train(
    accelerator, engine: str, name: str, config: flexlora.FlexLoRAConfig, out: Path, first_step=0, load_from=None
):
    """Train steps first_step + 1 .. TOTAL_STEPS and write the results of scenario ``name``."""
    model = tiny_llama()
    if load_from is None:
        adapters = flexlora.inject(model, config)
        history = None
    else:
        adapters, history = load_adapters(model, load_from)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(dataset(first_step), batch_size=GLOBAL_BATCH // accelerator.num_processes)
    if name == BF16_SCENARIO:
        # FSDP2's mixed precision (the GPU configs' bf16): parameters cast to bf16 for compute, fp32 shards kept.
        from torch.distributed.fsdp import MixedPrecisionPolicy

        fp32_policy = accelerator.state.fsdp_plugin.mixed_precision_policy
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    if engine == "zero3":
        # Below this many elements ZeRO-3 keeps a parameter gathered on every rank between steps (default 1e5,
        # which would cover this whole tiny model). 200 makes lambda and the k/v P persistent while the other
        # P, every Q and the base weights are partitioned: both kinds of ZeRO-3 parameter are exercised.
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"][
            "stage3_param_persistence_threshold"
        ] = 200
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if name == BF16_SCENARIO:
        accelerator.state.fsdp_plugin.mixed_precision_policy = fp32_policy
    if engine == "zero3":
        persistent = {p.ds_persist for layer in adapters.layers.values() for p in layer.parameters() if p.requires_grad}
        assert persistent == {True, False}, "expected both persistent and partitioned ZeRO-3 adapter parameters"
    allocator = flexlora.RankAllocator(adapters)
    if history is not None:
        allocator.load_state_dict(history)
    world = accelerator.num_processes
    first_lambda = adapters.layers[adapters.names[0]].lora_lambda
    if engine in SHARDED_LAMBDA:
        assert fl_dist.is_sharded(first_lambda), f"{engine}: lambda is not sharded"
    if engine == "hsdp":
        mesh = first_lambda.device_mesh
        assert dict(zip(mesh.mesh_dim_names, mesh.shape)) == HSDP_MESH, mesh
        assert tuple(first_lambda.placements) == (Replicate(), Shard(0)), first_lambda.placements
    comm, losses = {}, []
    model.train()
    for step, batch in enumerate(loader, start=first_step + 1):
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # a no-op call under DeepSpeed
        optimizer.step()
        with CollectiveRecorder() as recorder:
            changes = allocator.step(step, optimizer)
        if changes:
            comm[step] = {"calls": recorder.calls, "counted": allocator.collectives_last_step}
        else:
            assert recorder.calls == [] and allocator.collectives_last_step == 0, f"step {step}: {recorder.calls}"
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == SAVE_AT and load_from is None:
            save_adapters(adapters, out / f"{name}_step{SAVE_AT}", allocator.state_dict())
            if engine in PEFT_EXPORTED:
                export_peft(adapters, out / f"{name}_step{SAVE_AT}_peft")
            if engine == "fsdp2":
                model.eval()
                with torch.no_grad():
                    logits = model(input_ids=eval_batch()).logits
                model.train()
                if accelerator.is_main_process:
                    torch.save(logits, out / f"{name}_step{SAVE_AT}_logits.pt")
    assert {c.action for c in allocator.history if c.step > first_step} == {"prune", "expand"}, allocator.history

    state = adapter_state_dict(adapters)  # collective: gathers adapter tensors only
    rank = accelerator.process_index
    record = {
        "world": world,
        "distributed_type": accelerator.distributed_type.value,
        "masks": {n: layer.rank_mask.tolist() for n, layer in adapters.layers.items()},
        "history": allocator.state_dict()["history"],
        "comm": comm,
        "losses": losses,
        "num_modules": len(adapters.layers),
        "capacity": config.max_rank,
    }
    if engine == "hsdp":
        # Which launched machine ("node") each process of this one's shard group runs on: the lambda gather
        # should stay within a node.
        shard_group = first_lambda.device_mesh.get_group(fl_dist.shard_mesh_dim(first_lambda))
        nodes = [None] * dist.get_world_size(shard_group)
        dist.all_gather_object(nodes, int(os.environ["GROUP_RANK"]), group=shard_group)
        record["shard_group_nodes"] = nodes
    (out / f"{name}_rank{rank}.json").write_text(json.dumps(record))
    if accelerator.is_main_process:
        torch.save(state, out / f"{name}_adapter.pt")
    # An Accelerator drives one DeepSpeed engine at a time: drop this scenario's before the next prepare().
    accelerator.free_memory()
    return adapters


def check_refusals(engine: str, adapters) -> None:
    for scenario, (overrides, phrase) in REFUSED.get(engine, {}).items():
        config = adapters.config.replace(**overrides)
        try:
            flexlora.RankAllocator(adapters, config)
        except UserError as error:
            assert phrase in str(error), f"{engine}/{scenario}: unexpected error {error}"
        else:
            raise AssertionError(f"{engine} accepted {scenario}, which it cannot compute correctly")


def check_disagreement_is_caught(accelerator, adapters) -> None:
    """Give rank 1 a different lambda before an allocation step: every rank must raise, naming the problem."""
    allocator = flexlora.RankAllocator(adapters)
    step = BASE_CONFIG["t_warmup"]
    _, decision = allocator.decide(step)  # replicated lambda (DDP): decided locally, no collective
    if accelerator.process_index == 1:
        # Spread the first matrix to prune evenly over its active directions: its entropy becomes the largest.
        layer = adapters.layers[adapters.names[decision[0][1]]]
        with torch.no_grad():
            layer.lora_lambda.copy_(layer.rank_mask)
        assert allocator.decide(step)[1] != decision, "the perturbation did not change rank 1's decision"
    try:
        allocator.step(step)
    except RuntimeError as error:
        assert "allocation decision differs across processes" in str(error), error
    else:
        raise AssertionError("diverged lambdas were not detected")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=sorted(EXPECTED_TYPE))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume-from", type=Path, help="directory of a sharded run whose step-SAVE_AT save to resume")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine in ("zero2", "zero3"):
        # DeepSpeed JIT-compiles a shared-memory all-reduce kernel for CPU (~55 s on first use) that only its
        # inference all-reduce uses; ZeRO training goes through torch.distributed, so skip building it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    accelerator = build_accelerator()
    expected_world = WORLD.get(args.engine, 2)
    # A launch that silently fell back to one process or to DDP would still "pass" a comparison with the
    # single-process run: check what actually runs.
    assert accelerator.num_processes == expected_world, (args.engine, accelerator.num_processes)
    assert accelerator.distributed_type == EXPECTED_TYPE[args.engine], (args.engine, accelerator.distributed_type)
    if expected_world > 1:
        assert dist.get_world_size() == expected_world and dist.get_backend() == "gloo"

    last = None
    scenarios = dict(SCENARIOS)
    if args.engine == "fsdp2":
        scenarios[BF16_SCENARIO] = SCENARIOS["entropy"]
    for name, overrides in scenarios.items():
        if name in REFUSED.get(args.engine, {}):
            continue
        last = train(accelerator, args.engine, name, flexlora.FlexLoRAConfig(**{**BASE_CONFIG, **overrides}), args.out)
    check_refusals(args.engine, last)
    if args.engine == "ddp":
        check_disagreement_is_caught(accelerator, last)
    if args.engine == "hsdp":
        # Resume this run's own step-SAVE_AT save on the 2-D mesh (fresh optimizer), as one process does below.
        config = flexlora.FlexLoRAConfig(**{**BASE_CONFIG, **SCENARIOS["entropy"]})
        train(accelerator, "hsdp", "resume_self", config, args.out, SAVE_AT, args.out / f"entropy_step{SAVE_AT}")
    if args.engine == "single":
        # Resume from the step-SAVE_AT save with one process (fresh optimizer): from this run's own save and,
        # when given, from a save written by a sharded run with more processes. Both must continue identically.
        config = flexlora.FlexLoRAConfig(**{**BASE_CONFIG, **SCENARIOS["entropy"]})
        train(accelerator, "single", "resume_self", config, args.out, SAVE_AT, args.out / f"entropy_step{SAVE_AT}")
        if args.resume_from is not None:
            saved = args.resume_from / f"entropy_step{SAVE_AT}"
            model = tiny_llama()
            adapters, _ = load_adapters(model, saved)
            model.eval()
            with torch.no_grad():
                torch.save(model(input_ids=eval_batch()).logits, args.out / "resumed_logits.pt")
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(
                tiny_llama(), str(args.resume_from / f"entropy_step{SAVE_AT}_peft")
            ).eval()
            with torch.no_grad():
                torch.save(peft_model(input_ids=eval_batch()).logits, args.out / "peft_logits.pt")
            train(accelerator, "single", "resume_sharded", config, args.out, SAVE_AT, saved)
    accelerator.wait_for_everyone()
    (args.out / f"done_rank{accelerator.process_index}").write_text(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main()
