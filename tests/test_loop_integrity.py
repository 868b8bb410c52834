"""The recipe kit's loop does nothing silently wrong: each optimizer step's gradient is the mean over the micro-batches
it accumulated (the epoch's last, short window included), skipped steps are counted, logs stay valid JSON, a
checkpoint folder without a manifest is named, and schedules that cannot work are warned about."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TARGETS, make_tiny_llama

from flexlora import FlexLoRAConfig
from flexlora.accelerate_setup import build_accelerator
from flexlora.errors import UserError
from flexlora.recipe_kit.checkpoints import Checkpointer, content_fingerprint, write_manifest
from flexlora.recipe_kit.loop import DataIdentity, EpochPermutation
from flexlora.recipe_kit.records import JsonLinesTracker, flat_config
from flexlora.recipe_kit.run_config import ConfigError
from flexlora.recipe_kit.sections import CheckpointConfig, ModelConfig, TrainConfig
from flexlora.recipe_kit.startup import refuse_another_run
from flexlora.recipe_kit.train_setup import build_training, run_metrics, schedule_warnings

ROWS, MICRO_BATCH, BATCH = 10, 2, 8  # 5 micro-batches per epoch, accumulation 4: windows of 4, then 1


@dataclass
class LoopConfig:
    """The sections build_training and the loop read (a recipe config without data and eval)."""

    method: str = "flexlora"
    model: ModelConfig = field(default_factory=ModelConfig)  # only its quantization is read
    adapter: FlexLoRAConfig = field(
        default_factory=lambda: FlexLoRAConfig(
            target_modules=TARGETS, r=2, lora_alpha=4, lora_dropout=0.0, b0=1, t_warmup=1, t_final=0, delta_t=1
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=3,
            batch_size=BATCH,
            micro_batch_size=MICRO_BATCH,
            lr=1e-2,
            warmup_steps=0,
            max_grad_norm=0.0,  # no clipping: the recorded gradient is the accumulated one
            log_every=1,
            seed=3,
        )
    )
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_n_steps=0))


def _rows() -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 64, (ROWS, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in tokens]


def _training(config: LoopConfig, out: Path):
    accelerator = build_accelerator(log_with=[JsonLinesTracker(out)])
    accelerator.init_trackers("loop_integrity")
    rows = _rows()
    data = DataIdentity("generated rows", content_fingerprint(r["input_ids"].tolist() for r in rows))
    return build_training(
        config, accelerator, make_tiny_llama(), rows, torch.utils.data.default_collate, data, "CAUSAL_LM", out
    )


def test_every_step_gradient_is_the_mean_of_the_micro_batches_it_accumulated(tmp_path):
    """Steps 1 and 3 accumulate 4 micro-batches, step 2 the epoch's last one alone; each step's gradient equals the
    mean of the micro-batches' own gradients, computed by hand from the weights the step started from."""
    config = LoopConfig()
    training = _training(config, tmp_path)
    model, optimizer = training.model, training.loop.optimizer
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # the rank masks are buffers
    recorded = []  # (gradients, every weight and rank mask) at each optimizer step
    apply_update = optimizer.step

    def recording_step(*args, **kwargs):
        gradients = {name: p.grad.clone() for name, p in trained.items()}
        recorded.append((gradients, {name: t.detach().clone() for name, t in state.items()}))
        return apply_update(*args, **kwargs)

    optimizer.step = recording_step
    training.loop.run()

    rows = _rows()
    sampler = EpochPermutation(ROWS, config.train.seed)
    windows = []  # the micro-batches of each step, as the loop's sampler orders them
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        micro_batches = [order[i : i + MICRO_BATCH] for i in range(0, ROWS, MICRO_BATCH)]
        windows += [micro_batches[:4], micro_batches[4:]]
    assert len(recorded) == 3 and [len(w) for w in windows[:3]] == [4, 1, 4]
    for step, ((gradients, weights), window) in enumerate(zip(recorded, windows), start=1):
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(weights[name])
        by_hand = {name: torch.zeros_like(p) for name, p in trained.items()}
        for indices in window:
            model.zero_grad()
            batch = torch.utils.data.default_collate([rows[i] for i in indices])
            model(**batch).loss.backward()
            for name, p in trained.items():
                by_hand[name] += p.grad / len(window)
        for name in trained:
            torch.testing.assert_close(gradients[name], by_hand[name], rtol=1e-5, atol=1e-8, msg=f"step {step} {name}")


def test_skipped_steps_reach_metrics_and_the_log_stays_valid_json(tmp_path):
    config = LoopConfig()
    config.train.on_nonfinite, config.train.max_skipped_steps = "skip_step", 1
    training = _training(config, tmp_path)
    model, calls = training.model, []
    forward = model.forward

    def diverging_forward(*args, **kwargs):  # the second step's micro-batch gives a NaN loss
        output = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            output.loss = output.loss * float("nan")
        return output

    model.forward = diverging_forward
    training.loop.run()
    assert run_metrics(training, train_seconds=1.0)["skipped_steps"] == 1

    def no_bare_constants(token: str):
        raise AssertionError(f"train_log.jsonl holds a bare {token}")

    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=no_bare_constants) for line in lines]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1  # NaN is written as null
    assert rows[0]["loss"] is not None and rows[2]["loss"] is not None


def test_a_checkpoint_folder_without_a_manifest_is_skipped_and_named(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    sealed, unsealed = root / "step_00000002", root / "step_00000004"
    for folder in (sealed, unsealed):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    write_manifest(sealed)
    with caplog.at_level(logging.WARNING):
        assert Checkpointer(root, keep_last=2, accelerator=None).latest_valid() == sealed
    assert any("step_00000004" in r.getMessage() and "no manifest.json" in r.getMessage() for r in caplog.records)


def _schedule(method="flexlora", warmup_steps=0, t_warmup=2, t_final=1, delta_t=1, b0=4):
    adapter = SimpleNamespace(t_warmup=t_warmup, t_final=t_final, delta_t=delta_t, b0=b0)
    return SimpleNamespace(method=method, adapter=adapter), warmup_steps


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, []),
        ({"warmup_steps": 6}, ["LR warm-up (6 steps"]),
        ({"warmup_steps": 5}, []),
        ({"delta_t": 3}, []),  # allocation steps 2 and 5 of steps 2 .. 6 - 1
        ({"delta_t": 4}, ["adapter.delta_t=4 allows 1 allocation step"]),  # step 2 only
        ({"delta_t": 4, "b0": 0}, []),  # allocation frozen on purpose
        ({"delta_t": 4, "method": "lora"}, []),  # nothing to allocate
    ],
)
def test_schedules_that_cannot_work_are_warned_about(settings, expected):
    config, warmup = _schedule(**settings)
    warnings = schedule_warnings(config, total_steps=6, warmup=warmup)
    assert len(warnings) == len(expected)
    for warning, start in zip(warnings, expected):
        assert start in warning


def test_a_checkpoint_older_than_data_fingerprints_is_refused_saying_so(tmp_path):
    config = LoopConfig()
    identity = {"method": "flexlora", "total_steps": 6, "examples": 12, "data_fingerprint": "ab" * 32}
    state = {key: value for key, value in identity.items() if key != "data_fingerprint"}
    state["config"] = flat_config(dataclasses.asdict(config))
    with pytest.raises(ConfigError, match="predates the training-data fingerprint.*allow_config_change=true"):
        refuse_another_run(tmp_path / "step_6", state, identity, "data.path rows.json", config)
    config.checkpoint.allow_config_change = True
    refuse_another_run(tmp_path / "step_6", state, identity, "data.path rows.json", config)


def test_a_batch_the_process_count_does_not_divide_is_a_user_error_naming_both_fields():
    with pytest.raises(UserError, match="not a multiple of micro_batch_size x processes = 2 x 3") as error:
        TrainConfig(batch_size=16, micro_batch_size=2).gradient_accumulation(3)
    assert error.value.fields == ("train.batch_size", "train.micro_batch_size")
