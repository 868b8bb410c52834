"""The command line of ``python -m eval.commonsense`` (``command_line_parser``), and ``scoring_command``, which
writes such a command for a recipe to print: one parser for both, so the printed command always parses."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .scoring import PAPER_TASKS, PROTOCOLS, EvalConfig
from .sections import MODEL_DTYPES, ModelConfig

SCORING_PROGRAM = "python -m eval.commonsense"
# the setting behind each option: scoring_command writes options from these settings, and an error about a setting
# names the option the user typed (run_recipe)
OPTION_NAMES = {
    "model.path": "--base",
    "model.gguf_file": "--gguf-file",
    "model.dtype": "--dtype",
    "eval.tasks": "--tasks",
    "eval.protocol": "--protocol",
    "eval.data_dir": "--data-dir",
    "eval.split": "--split",
    "eval.limit": "--limit",
    "eval.batch_size": "--batch-size",
    "eval.max_new_tokens": "--max-new-tokens",
    "eval.baselines": "--baselines",
}


def command_line_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``python -m eval.commonsense``'s arguments; ``eval_config_from_args`` and ``scoring_command`` map them to and
    from an EvalConfig."""
    parser = argparse.ArgumentParser(prog=SCORING_PROGRAM, description=description)
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
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also score the base with the adapter off and the constant most-common answer, on the same items",
    )
    parser.add_argument("--dtype", default="auto", choices=MODEL_DTYPES)
    parser.add_argument("--output", default="eval_results.json", help="where to write the JSON report")
    return parser


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        protocol=args.protocol,
        tasks=args.tasks,
        data_dir=args.data_dir,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        baselines=args.baselines,
    )


def scoring_command(
    model: ModelConfig, adapter: str | Path, data_dir: str | Path | None, config: EvalConfig, output: str | Path
) -> str:
    """The ``python -m eval.commonsense`` command that scores ``adapter`` as ``config`` says (values equal to the
    command line's defaults are left out), quoted for a POSIX shell."""
    sections = {"model": model, "eval": config}
    values = {}
    for setting, option in OPTION_NAMES.items():
        section, _, name = setting.partition(".")
        values[option] = getattr(sections[section], name)
    # the folder the recipe resolved (eval.data_dir, or the training data folder) replaces eval.data_dir as written
    values["--data-dir"] = None if data_dir is None else str(data_dir)  # None: lm-eval's hub tasks only
    values["--adapter"] = str(adapter)
    values["--output"] = str(output)
    parser = command_line_parser()
    argv = shlex.split(SCORING_PROGRAM)
    for option, value in values.items():
        # argparse's dest of "--max-new-tokens" is max_new_tokens (no option here sets its own dest)
        if value is None or value == parser.get_default(option.removeprefix("--").replace("-", "_")):
            continue
        if isinstance(value, bool):
            argv.append(option)  # a store_true flag, on
        elif isinstance(value, list):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return shlex.join(argv)
