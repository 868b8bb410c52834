"""A recipe's start-up: the command line read once, the config, the output folder's policy (resume, refuse or
overwrite an earlier run), the accelerator with its trackers, logging, and the resolved config written down."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

from flexlora.accelerate_setup import build_accelerator

from .records import build_trackers, flat_config, setup_logging
from .run_config import ConfigError, config_to_yaml, load_config, parse_cli

RUN_FILES = ("checkpoints", "train_log.jsonl", "eval.jsonl", "metrics.json")


def start_run(config_class: type, argv: list[str] | None, recipe_log: logging.Logger):
    """A recipe's first lines: (config, accelerator, output folder). Reads ``--config file.yaml key=value ...`` (argv,
    or the command line), builds the accelerator with the config's trackers, sets up logging, writes the resolved
    config to the folder."""
    config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv, config_class, Path(sys.argv[0]).name)
    config = load_config(config_class, config_path, overrides)
    out = Path(config.output_dir)
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if previous and not config.checkpoint.resume and not config.checkpoint.overwrite:
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(previous)}) and checkpoint.resume=false: "
            "resume it, choose another output_dir, or pass checkpoint.overwrite=true to replace it"
        )
    accelerator = build_accelerator(log_with=build_trackers(out, config.logging))
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        if previous and not config.checkpoint.resume:  # overwrite: the old run's files go, so no log holds two runs
            recipe_log.warning(
                "checkpoint.overwrite=true: removing the previous run's %s from %s", ", ".join(previous), out
            )
            for name in previous:
                (shutil.rmtree if (out / name).is_dir() else Path.unlink)(out / name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(config))
        recipe_log.info(
            "resolved config (%s + %s):\n%s", config_path, overrides or "no overrides", config_to_yaml(config)
        )
    accelerator.init_trackers(config.logging.wandb_project, config=flat_config(dataclasses.asdict(config)))
    recipe_log.info(
        "%d process(es), distributed type %s, device %s",
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.device,
    )
    return config, accelerator, out
