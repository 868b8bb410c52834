"""A recipe's start-up: the command line read once, the config, the output folder's policy (resume, refuse or
overwrite an earlier run), the accelerator with its trackers, logging, the resolved config written down, and the
identity a checkpoint must share with this run to be resumed."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

from flexlora.accelerate_setup import build_accelerator

from .methods import scheduled
from .records import build_trackers, flat_config, setup_logging
from .run_config import ConfigError, check_writable_folder, config_to_yaml, load_config, parse_cli

# What shows that output_dir holds a run: its records, which a resumed run continues. eval.json is among them: a
# multi-process run's score comes from the command it prints, which no rerun of the recipe writes again.
RUN_RECORDS = ("checkpoints", "train_log.jsonl", "eval.jsonl", "tensorboard", "eval.json")
# What a run writes once it has trained (train_setup.save_outputs and the recipes): an earlier attempt's are removed
# once this run is known to continue it (settle_output_dir), so a run that fails never leaves them beside its own
# files, and a refused resume loses nothing.
FINAL_OUTPUTS = ("adapter", "peft", "rank_pattern.json", "allocation.jsonl", "rank_heatmap.png", "metrics.json")
# the commonsense recipe's generated data set: written again by the run that uses it
GENERATED_DATA = "synthetic_data"

# Settings a resumed run may change: where and how it reports, checkpoints and scores, not what it trains.
RESUMABLE_CHANGES = (
    "output_dir",
    "logging.",
    "checkpoint.",
    "eval.",
    "train.log_every",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "data.num_workers",
    "data.packing",
)


log = logging.getLogger(__name__)


class StartedRun(NamedTuple):
    config: Any
    accelerator: Any
    out: Path
    overridden: frozenset[str]  # the keys given as key=value on the command line


def start_run(config_class: type, argv: list[str] | None, recipe_log: logging.Logger) -> StartedRun:
    """A recipe's first lines. Reads ``--config file.yaml key=value ...`` (argv, or the command line), checks the rank
    schedule against ``train.max_steps`` where that fixes the step count, builds the accelerator with the config's
    trackers, sets up logging, clears what an earlier run left that this one must not keep, and writes the resolved
    config to the folder."""
    config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv, config_class, Path(sys.argv[0]).name)
    config = load_config(config_class, config_path, overrides)
    if config.train.max_steps:  # a schedule that cannot run stops here, before output_dir is cleared or a model loads
        scheduled(config.method, config.adapter, config.train.max_steps)
    out = Path(config.output_dir)
    check_writable_folder(out, "output_dir")
    previous = [name for name in (*RUN_RECORDS, *FINAL_OUTPUTS, GENERATED_DATA) if (out / name).exists()]
    if previous and not config.checkpoint.resume and not config.checkpoint.overwrite:
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(previous)}) and checkpoint.resume=false: "
            "resume it, choose another output_dir, or pass checkpoint.overwrite=true to replace it"
        )
    accelerator = build_accelerator(log_with=build_trackers(out, config.logging))
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        # overwrite removes everything, TensorBoard's event files included, so no file mixes two runs; resume keeps
        # it all, config.yaml included, until the loop has checked that the checkpoint belongs to this run
        # (settle_output_dir)
        if previous and not config.checkpoint.resume:
            recipe_log.warning(
                "checkpoint.overwrite=true: removing the previous run's %s from %s", ", ".join(previous), out
            )
            _remove(out, previous)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "config.yaml").exists():
            (out / "config.yaml").write_text(config_to_yaml(config))
        recipe_log.info(
            "resolved config (%s + %s):\n%s", config_path, overrides or "no overrides", config_to_yaml(config)
        )
    accelerator.wait_for_everyone()  # no process writes to output_dir before the main process has cleared it
    accelerator.init_trackers(config.logging.wandb_project, config=flat_config(dataclasses.asdict(config)))
    recipe_log.info(
        "%d process(es), distributed type %s, device %s",
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.device,
    )
    overridden = frozenset(override.partition("=")[0] for override in overrides)
    return StartedRun(config, accelerator, out, overridden)


def settle_output_dir(out: Path, config, is_main: bool, resumed: bool) -> None:
    """Once the loop has found the checkpoint it continues (``resumed``, its identity checked) or none: the earlier
    attempt's final outputs go (this run writes them again at the end) and config.yaml becomes this run's. Final
    outputs with no checkpoint to continue belong to a run this one cannot resume, and are refused, not removed."""
    stale = [name for name in FINAL_OUTPUTS if (out / name).exists()]
    if stale and not resumed:
        raise ConfigError(
            f"output_dir {out} holds a run's {', '.join(stale)} but no valid checkpoint to resume it from: choose "
            "another output_dir, or pass checkpoint.resume=false checkpoint.overwrite=true to replace that run"
        )
    if is_main:
        if stale:
            log.info("removing the last attempt's %s from %s (written again at the end)", ", ".join(stale), out)
            _remove(out, stale)
        (out / "config.yaml").write_text(config_to_yaml(config))


def _remove(out: Path, names: list[str]) -> None:
    for name in names:
        (shutil.rmtree if (out / name).is_dir() else Path.unlink)(out / name)


def changed_settings(saved: dict, current: dict) -> list[str]:
    """Flat keys whose value differs between a checkpoint's config and this run's, those in RESUMABLE_CHANGES aside."""
    keys = sorted(set(saved) | set(current))
    return [key for key in keys if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)]


def refuse_another_run(checkpoint: Path, state: dict, identity: dict, data_source: str, config) -> None:
    """Raise ConfigError unless the checkpoint (its trainer state ``state``) was written by this run: the same method,
    step count and example count (``identity``, as the loop records it), and, unless
    ``checkpoint.allow_config_change``, the same settings and training data contents. ``data_source`` names the data
    in the message."""
    run = {key: value for key, value in identity.items() if key != "data_fingerprint"}
    if {key: state.get(key) for key in run} != run:
        raise ConfigError(
            f"{checkpoint} was written by a different run (method {state.get('method')}, "
            f"{state.get('total_steps')} steps, {state.get('examples')} examples); use another output_dir, or "
            "checkpoint.resume=false checkpoint.overwrite=true to replace it"
        )
    if config.checkpoint.allow_config_change:
        return
    saved, now = state.get("config", {}), flat_config(dataclasses.asdict(config))
    changed = changed_settings(saved, now)
    if changed:
        raise ConfigError(
            f"{checkpoint} was trained with other settings: "
            + "; ".join(f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in changed)
            + ". Resume with the checkpoint's settings, use another output_dir, pass "
            "checkpoint.allow_config_change=true, or checkpoint.resume=false checkpoint.overwrite=true to replace it"
        )
    if state.get("data_fingerprint") is None:
        raise ConfigError(
            f"{checkpoint} predates the training-data fingerprint, so whether {data_source} changed since is unknown: "
            "pass checkpoint.allow_config_change=true to resume it on the data as it is now"
        )
    if state.get("data_fingerprint") != identity["data_fingerprint"]:
        raise ConfigError(
            f"{checkpoint} was trained on other data: the contents of {data_source} changed since (fingerprint "
            f"{str(state.get('data_fingerprint'))[:12]} -> {identity['data_fingerprint'][:12]}); train on the data it "
            "was trained on, use another output_dir, or pass checkpoint.resume=false checkpoint.overwrite=true"
        )
