"""Communication of one FlexLoRA allocation step: collectives and bytes, measured and computed from shapes.

Under a sharded engine (FSDP2, ZeRO-3) every process contributes its rows of every module's lambda to ONE
all-gather of one flat float32 buffer (``ceil(R / world)`` elements per module), and all processes check that
they took the same decision with one all-reduce of two int64. Replicated engines (DDP, ZeRO-1/2) need only
the check. P, Q and base weights never move. Under HSDP (sharded within a node, replicated across nodes) the
lambda all-gather runs within the node only; the check spans every process.

    python -m bench.comm_volume                       # the tables computed from shapes only
    accelerate launch --config_file accelerate_configs/cpu_fsdp2.yaml bench/comm_volume.py --measure
        # also measures one allocation step of SmolLM2-135M-shaped adapters (random weights) on 2 processes
        # (accelerate_configs/cpu_hsdp.yaml: on 4 processes, a 2 x 2 HSDP mesh)

The measurement counts every collective dispatched during ``RankAllocator.step`` (c10d and functional ops),
with the bytes this process sends and the processes in its group.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flexlora
from flexlora.accelerate_setup import build_accelerator
from flexlora.collective_recorder import CollectiveRecorder
from flexlora.distributed import lambda_gather_payload

DECISION_CHECK_BYTES = 16  # two int64: the all-reduce comparing decision digests
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def target_dims(self) -> list[tuple[int, int]]:
        """(d_out, d_in) of q, k, v, up, down in every layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = [
            (q, self.hidden),
            (kv, self.hidden),
            (kv, self.hidden),
            (self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
        ]
        return per_layer * self.layers


SMOLLM2_135M = Shape("SmolLM2-135M", 30, 576, 1536, 9, 3, 64, 49152)
LLAMA3_8B = Shape("LLaMA3-8B", 32, 4096, 14336, 32, 8, 128, 128256)
LLAMA3_70B = Shape("LLaMA3-70B", 80, 8192, 28672, 64, 8, 128, 128256)
CLUSTERS = ((2, 8), (8, 8))  # nodes x GPUs per node
BF16_BYTES = 2  # the GPU configs' compute and gradient-reduction dtype (mixed_precision: bf16)


def computed_row(shape: Shape, r: int, world: int, sharded: bool) -> dict:
    capacity = math.ceil(1.5 * r)
    dims = shape.target_dims()
    n = len(dims)
    sent, received = lambda_gather_payload(n, capacity, world) if sharded else (0, 0)
    p_q_bytes = sum((d_out + d_in) * capacity for d_out, d_in in dims) * 4
    return {
        "model": shape.name,
        "r": r,
        "R": capacity,
        "modules": n,
        "world": world,
        "engine": "FSDP2 / ZeRO-3" if sharded else "DDP / ZeRO-1/2",
        "collectives": 2 if sharded else 1,
        "sent": sent * 4 + DECISION_CHECK_BYTES,
        "received": received * 4 + DECISION_CHECK_BYTES,
        "p_q_fp32": p_q_bytes,
    }


def base_parameters(shape: Shape) -> int:
    """Parameters of the Llama model: untied embedding and output head, attention, MLP, norms."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = shape.hidden * (2 * q + 2 * kv) + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
    return shape.layers * per_layer + 2 * shape.vocab * shape.hidden + shape.hidden


def multinode_row(shape: Shape, r: int, nodes: int, gpus: int, layout: str) -> dict:
    """Per process and allocation step, the lambda all-gather under a multi-node layout: plain FSDP2 gathers over
    every process, HSDP over the node's GPUs (its shard group). Received bytes are split into those from the same
    node and from other nodes; the 16-byte decision check spans every process under both. For scale, the bytes a
    process receives from other nodes in one optimizer step: FSDP2 all-gathers the bf16 base weights in the forward
    and again in the backward (reshard_after_forward) and reduce-scatters the bf16 adapter gradients, both over
    every process, (world - gpus) / world of it from other nodes; HSDP gathers and reduce-scatters within the node
    and all-reduces its 1/gpus shard of the adapter gradients with the replicas (ring: 2 (nodes - 1) / nodes of
    the shard received)."""
    capacity = math.ceil(1.5 * r)
    dims = shape.target_dims()
    n = len(dims)
    group = gpus if layout == "HSDP" else nodes * gpus
    sent, _ = lambda_gather_payload(n, capacity, group)
    world = nodes * gpus
    gradients = sum((d_out + d_in + 1) * capacity for d_out, d_in in dims) * BF16_BYTES
    if layout == "HSDP":
        step_across = 2 * (nodes - 1) * (gradients // gpus) // nodes
    else:
        step_across = (2 * base_parameters(shape) * BF16_BYTES + gradients) * (world - gpus) // world
    return {
        "model": shape.name,
        "r": r,
        "R": capacity,
        "modules": n,
        "cluster": f"{nodes} x {gpus}",
        "layout": layout,
        "group": group,
        "sent": sent * 4,
        "within": (gpus - 1) * sent * 4,
        "across": (group - gpus) * sent * 4,
        "step_across": step_across,
    }


def print_multinode() -> None:
    print("## Computed from shapes: multi-node layouts (per allocation step, per process)\n")
    print(
        "Plain FSDP2 shards over every GPU of every node; HSDP (accelerate_configs/hsdp_multinode.yaml) shards "
        "within a node and replicates across nodes, so its lambda gather (group = the node's GPUs) never leaves "
        "the node. Bytes received exclude the process's own part; both layouts add the 16-byte decision check "
        "over all processes. The last column, for scale, is what each process receives from other nodes in one "
        "optimizer step anyway: under FSDP2 the bf16 base weights it all-gathers in the forward and again in the "
        "backward plus its part of the adapter gradients' reduce-scatter, under HSDP its ring all-reduce of "
        "1/GPUs of the bf16 adapter gradients with the other nodes (from shapes; activations and the optimizer "
        "never cross nodes).\n"
    )
    print(
        "| model | r | R | modules | nodes x GPUs | layout | gather group | bytes sent | received within node | "
        "received across nodes | check | one training step, received across nodes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in (LLAMA3_8B, LLAMA3_70B):
        for r in (8, 32):
            for nodes, gpus in CLUSTERS:
                for layout in ("FSDP2", "HSDP"):
                    row = multinode_row(shape, r, nodes, gpus, layout)
                    print(
                        f"| {row['model']} | {row['r']} | {row['R']} | {row['modules']} | {row['cluster']} | "
                        f"{row['layout']} | {row['group']} | {row['sent']:,} | {row['within']:,} | "
                        f"{row['across']:,} | {DECISION_CHECK_BYTES} | {_size(row['step_across'])} |"
                    )
    print()


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:,.1f} MiB"


def print_computed() -> None:
    print("## Computed from shapes (fp32 lambda buffer, per allocation step, per process)\n")
    print(
        "| model | r | R | modules | processes | engine | collectives | bytes sent | bytes received "
        "| P+Q of all adapters (fp32), for scale |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [computed_row(SMOLLM2_135M, 8, 2, True), computed_row(SMOLLM2_135M, 8, 2, False)]
    for r in (8, 32):
        for world in (8, 16, 64):
            rows.append(computed_row(LLAMA3_8B, r, world, True))
        rows.append(computed_row(LLAMA3_8B, r, 8, False))
    for row in rows:
        print(
            f"| {row['model']} | {row['r']} | {row['R']} | {row['modules']} | {row['world']} | {row['engine']} | "
            f"{row['collectives']} | {row['sent']:,} | {row['received']:,} | {row['p_q_fp32'] / 2**20:,.1f} MiB |"
        )
    print()


def measure() -> None:

    accelerator = build_accelerator()
    s = SMOLLM2_135M
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Allocation at step 1 (t_warmup = 1), b0 = 4 matrices pruned and 4 expanded.
    flex = flexlora.FlexLoRAConfig(
        target_modules=TARGETS, r=8, b0=4, t_warmup=1, delta_t=1, total_steps=10, schedule="constant"
    )
    adapters = flexlora.inject(model, flex)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, s.vocab, (2 * accelerator.num_processes, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(tokens, batch_size=2)  # DeepSpeed sizes its batch from a prepared loader
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    allocator = flexlora.RankAllocator(adapters)
    batch = next(iter(loader))
    accelerator.backward(model(input_ids=batch, labels=batch).loss)
    optimizer.step()
    start = time.perf_counter()
    with CollectiveRecorder() as recorder:
        changes = allocator.step(1, optimizer)
    elapsed = time.perf_counter() - start
    optimizer.zero_grad()
    if accelerator.is_main_process:
        print(
            f"## Measured: {s.name}-shaped adapters, {len(adapters.layers)} modules, R = {flex.max_rank}, "
            f"{accelerator.num_processes} processes, {accelerator.distributed_type.value} "
            f"({accelerator.device.type}, "
            f"{torch.distributed.get_backend() if torch.distributed.is_initialized() else 'no process group'})\n"
        )
        mesh = getattr(adapters.layers[adapters.names[0]].lora_lambda, "device_mesh", None)
        if mesh is not None:
            shape = dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh.mesh_dim_names else tuple(mesh.shape)
            print(f"- lambda's device mesh: {shape}")
        print(
            f"- changes applied: {len(changes)} ({sum(c.action == 'prune' for c in changes)} prune, "
            f"{sum(c.action == 'expand' for c in changes)} expand)"
        )
        print(
            f"- collectives during allocator.step: {len(recorder.calls)} (allocator.collectives_last_step = "
            f"{allocator.collectives_last_step})"
        )
        for name, sent, group in recorder.calls:
            print(
                f"  - {name}: {sent:,} bytes sent by this process, over a group of {group} of "
                f"{accelerator.num_processes} processes"
            )
        print(f"- total sent by this process: {sum(call[1] for call in recorder.calls):,} bytes")
        print(f"- wall time of allocator.step: {elapsed * 1e3:.1f} ms (gather, decision, in-place edits)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--measure", action="store_true", help="also measure one allocation step (launch with accelerate)"
    )
    args = parser.parse_args()
    if args.measure:
        measure()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print_computed()
        print_multinode()


if __name__ == "__main__":
    main()
