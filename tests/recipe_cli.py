"""A recipe's command line run in this process as ``python recipes/<name>.py ...`` runs it: through ``run_recipe``,
so a user error must end as exit status 2 and one ``error:`` line on stderr (shared by the fuzz tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flexlora.recipe_kit.run_config import run_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "configs" / "quickstart.yaml"


def user_error(recipe, argv: list[str], monkeypatch, capsys) -> str:
    """The message of the user error ``recipe.main`` stops with under ``argv``; fails the test on a traceback, a
    silent run (no error at all), another exit status or a message of more than one line."""
    monkeypatch.setattr(sys, "argv", [f"{recipe.__name__.rpartition('.')[2]}.py", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        run_recipe(recipe.main)
    stderr = capsys.readouterr().err
    assert raised.value.code == 2, (raised.value.code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in stderr, stderr
    return lines[-1].removeprefix("error: ")


def tiny_cr_overrides(model_dir: Path, output_dir: Path) -> dict[str, object]:
    """quickstart.yaml scaled down to the tiny Llama (tests/tiny_models.py): 6 steps on generated data."""
    return {
        "model.path": str(model_dir),
        "model.gguf_file": "null",
        "data.path": "synthetic",
        "data.synthetic_train_per_task": 8,
        "data.synthetic_dev_per_task": 2,
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.micro_batch_size": 2,
        "train.warmup_steps": 2,
        "adapter.r": 4,
        "adapter.t_warmup": 2,
        "adapter.t_final": 1,
        "adapter.delta_t": 1,
        "checkpoint.every_n_steps": 3,
        "logging.tensorboard": "false",
        "eval.enabled": "false",
        "output_dir": str(output_dir),
    }
