"""Worker for tests/test_distributed.py: FlexLoRA on a model loaded the way recipes/llama3_cr.py loads it under FSDP2,
with sharded loading (``--fsdp_cpu_ram_efficient_loading true``: only the main process reads the checkpoint) or
without (every process reads it). Each rank writes its adapters right after ``accelerator.prepare`` and after a few
training steps with allocation, its losses, decisions and peak resident memory.

    accelerate launch --config_file accelerate_configs/cpu_fsdp2.yaml --fsdp_cpu_ram_efficient_loading true \
        tests/distributed/sharded_loading.py --model DIR --out DIR --name sharded
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

import flexlora
from flexlora.accelerate_setup import build_accelerator
from flexlora.export import adapter_state_dict
from flexlora.recipe_kit.models import allocate_trainable_parameters, load_causal_lm, main_process_loads_weights
from flexlora.recipe_kit.sections import ModelConfig

STEPS, GLOBAL_BATCH, SEQ_LEN = 3, 4, 16
# Allocation at every step from 1 on: one matrix pruned and one expanded each time.
ADAPTER = dict(
    target_modules=["q_proj", "v_proj", "down_proj"],
    r=4,
    b0=1,
    t_warmup=1,
    delta_t=1,
    t_final=0,
    total_steps=STEPS + 1,
    schedule="constant",
    seed=0,
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--name", required=True, help="prefix of this launch's files")
    args = parser.parse_args()
    accelerator = build_accelerator()
    rank = accelerator.process_index
    assert accelerator.num_processes == 2 and accelerator.distributed_type.value == "FSDP"
    before_loading = peak_rss_mib()
    # What the recipe does: with sharded loading only the main process reads the weights.
    weights = accelerator.is_main_process or not main_process_loads_weights(accelerator)
    config = ModelConfig(
        path=str(args.model), dtype="float32", attn_implementation="sdpa", gradient_checkpointing=False
    )
    model, tokenizer = load_causal_lm(config, accelerator.device, weights=weights)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    built_without_weights = all(p.is_meta for p in model.parameters())
    adapters = flexlora.inject(model, flexlora.FlexLoRAConfig(**ADAPTER))
    allocate_trainable_parameters(model, accelerator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    after_prepare = peak_rss_mib()
    torch.save(adapter_state_dict(adapters), args.out / f"{args.name}_initial_rank{rank}.pt")

    allocator = flexlora.RankAllocator(adapters)
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, len(tokenizer), (STEPS * GLOBAL_BATCH, SEQ_LEN), generator=generator)
    per_process = GLOBAL_BATCH // accelerator.num_processes
    losses = []
    model.train()
    for step in range(1, STEPS + 1):
        first = (step - 1) * GLOBAL_BATCH + rank * per_process
        batch = tokens[first : first + per_process]
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        allocator.step(step, optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    final = adapter_state_dict(adapters)  # collective
    if accelerator.is_main_process:
        torch.save(final, args.out / f"{args.name}_final.pt")
    record = {
        "main_process_loads_weights": main_process_loads_weights(accelerator),
        "built_without_weights": built_without_weights,
        "model_mib": model_bytes / 2**20,
        "rss_mib": {"before_loading": before_loading, "after_prepare": after_prepare},
        "losses": losses,
        "history": allocator.state_dict()["history"],
    }
    (args.out / f"{args.name}_rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
