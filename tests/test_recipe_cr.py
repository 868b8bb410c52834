"""The commonsense recipe end to end on a tiny random Llama with a tokenizer built offline."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model_dir

from flexlora.recipe_kit.run_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama3_cr.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def _load_recipe():
    from recipes import llama3_cr

    return llama3_cr


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


def tiny_overrides(model_dir: Path, output_dir: Path, **extra) -> list[str]:
    """quickstart.yaml scaled down to the tiny model: 6 steps, ranks moving at steps 2-5, 2 eval items."""
    values = {
        "model.path": str(model_dir),
        "model.gguf_file": "null",
        "data.path": "synthetic",
        "data.synthetic_train_per_task": 24,
        "data.synthetic_dev_per_task": 4,
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.micro_batch_size": 2,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "adapter.r": 4,
        "adapter.t_warmup": 2,
        "adapter.t_final": 1,
        "adapter.delta_t": 1,
        "checkpoint.every_n_steps": 3,
        "checkpoint.keep_last": 5,
        "eval.tasks": "[synthetic_truefalse,synthetic_choice]",
        "eval.limit": 2,
        "eval.max_new_tokens": 3,
        "output_dir": str(output_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items() if v is not None]  # None: keep quickstart.yaml's value


def run_recipe(recipe, model_dir: Path, output_dir: Path, **extra) -> Path:
    recipe.main(
        [
            "--config",
            str(REPO / "recipes" / "configs" / "quickstart.yaml"),
            *tiny_overrides(model_dir, output_dir, **extra),
        ]
    )
    return output_dir


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_flexlora_run_writes_every_output_and_resumes_exactly(recipe, tiny_model_dir, tmp_path):
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # The generated data set, and scoring on its dev files (as the quickstart without ../shared/data).
    out = run_recipe(recipe, tiny_model_dir, tmp_path / "run", **{"data.path": "synthetic", "eval.tasks": None})
    for name in (
        "config.yaml",
        "adapter/flexlora_adapter.safetensors",
        "adapter/rank_state.json",
        "peft/adapter_config.json",
        "peft/adapter_model.safetensors",
        "rank_pattern.json",
        "allocation.jsonl",
        "rank_heatmap.png",
        "metrics.json",
        "eval.json",
        "train_log.jsonl",
    ):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert (out / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    log = _read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "orth_penalty", "active_rank_total"} <= set(log[0])
    history = _read_jsonl(out / "allocation.jsonl")
    assert history and {r["step"] for r in history} <= {2, 3, 4, 5}
    ranks = json.loads((out / "rank_pattern.json").read_text())
    assert (
        len(ranks) == 10 and sum(ranks.values()) == 10 * 4 and len(set(ranks.values())) > 1
    )  # ranks moved, total kept
    assert metrics["total_active_rank"] == 40 and metrics["rank_changes"] == len(history)
    assert set(metrics["eval"]["llm-adapters"]) == {"synthetic_truefalse", "synthetic_choice"}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "peft"))
    assert peft_model.peft_config["default"].rank_pattern

    # Simulate a run killed after step 3: keep only that checkpoint, drop everything written after it.
    first_log, first_history = log, history
    first_adapter = load_file(out / "adapter" / "flexlora_adapter.safetensors")
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    for name in ("adapter", "peft"):
        shutil.rmtree(out / name)
    for name in ("allocation.jsonl", "rank_pattern.json", "metrics.json"):
        (out / name).unlink()

    run_recipe(recipe, tiny_model_dir, out, **{"data.path": "synthetic", "eval.enabled": "false"})
    resumed_log = _read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first_log, resumed_log):
        for key in ("loss", "grad_norm", "lr", "orth_penalty", "active_rank_total"):
            assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-7), (after["step"], key)
    assert _read_jsonl(out / "allocation.jsonl") == first_history
    resumed_adapter = load_file(out / "adapter" / "flexlora_adapter.safetensors")
    for key, tensor in first_adapter.items():
        if key.endswith("rank_mask"):
            assert torch.equal(resumed_adapter[key], tensor), key
        else:
            torch.testing.assert_close(resumed_adapter[key], tensor, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_lora_and_adalora_run_through_peft(recipe, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outputs = {}
    # LoRA has no rank schedule, so one longer than its run (a short run on the 8B yaml: t_final 5000) does not stop it
    schedules = {"lora": {"adapter.t_warmup": 50, "adapter.t_final": 50}, "adalora": {"adapter.t_final": 2}}
    for method, schedule in schedules.items():
        out = run_recipe(
            recipe,
            tiny_model_dir,
            tmp_path / method,
            method=method,
            **{"train.max_steps": 8, "eval.enabled": "false", **schedule},
        )
        for name in (
            "peft/adapter_config.json",
            "rank_pattern.json",
            "allocation.jsonl",
            "rank_heatmap.png",
            "metrics.json",
        ):
            assert (out / name).is_file(), (method, name)
        assert not (out / "adapter").exists()  # the PEFT adapter is the method's own format
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "peft"))
        outputs[method] = out
    lora = json.loads((outputs["lora"] / "metrics.json").read_text())
    assert lora["total_active_rank"] == 40 and lora["rank_changes"] == 0
    adalora = json.loads((outputs["adalora"] / "metrics.json").read_text())
    saved = json.loads((outputs["adalora"] / "peft" / "adapter_config.json").read_text())
    assert (
        saved["init_r"],
        saved["target_r"],
        saved["total_step"],
        saved["tinit"],
        saved["tfinal"],
        saved["deltaT"],
    ) == (6, 4, 8, 2, 2, 1)
    # update_and_allocate ran: PEFT pruned from init_r = 6 per matrix to the target budget of 4 per matrix
    assert adalora["total_active_rank"] == 40 and adalora["rank_changes"] > 0
    assert sum(sum(mask) for mask in saved["rank_pattern"].values()) == 40
    for method, out in outputs.items():  # one rank per adapted module, by module name, as FlexLoRA writes it
        pattern = json.loads((out / "rank_pattern.json").read_text())
        assert sorted(pattern) == sorted(
            f"model.layers.{i}.{part}"
            for i in range(2)
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
        ), method
        assert sum(pattern.values()) == 40
    history = _read_jsonl(outputs["adalora"] / "allocation.jsonl")
    assert all(r["action"] == "prune" and 2 < r["step"] <= 6 for r in history)


def test_budget_rule_matches_parameter_counts(tiny_model_dir):
    import math

    from transformers import AutoModelForCausalLM

    from flexlora import FlexLoRAConfig
    from flexlora.recipe_kit.methods import build_method

    config = FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8, t_warmup=1, t_final=1, delta_t=1)
    counts = {
        m: build_method(m, AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, 10).parameter_count()
        for m in ("flexlora", "lora", "adalora")
    }
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shapes = [(m.in_features, m.out_features) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    capacity = math.ceil(1.5 * 4)
    assert counts["lora"] == sum(4 * (i + o) for i, o in shapes)
    assert counts["flexlora"] == counts["adalora"] == sum(capacity * (i + o + 1) for i, o in shapes)


def test_bad_training_row_stops_the_recipe_with_its_index(recipe, tiny_model_dir, tmp_path):
    from flexlora.recipe_kit.data.synthetic import synthetic_rows

    rows = synthetic_rows("synthetic_truefalse", 5, seed=0)
    rows[3]["output"] = ""
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"train.json: 1 malformed row\(s\) of 5:\n  row 3: empty output"):
        run_recipe(recipe, tiny_model_dir, tmp_path / "out", **{"data.path": str(path)})


def _launch_recipe(accelerate_config: str, model_dir: Path, output_dir: Path, **extra) -> str:
    """The recipe under ``accelerate launch`` with a CPU config; returns its stdout and stderr."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MASTER_PORT", None)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / accelerate_config),
        "--main_process_port",
        "0",
        "--fsdp_cpu_ram_efficient_loading",
        "true",
        str(RECIPE),
        "--config",
        str(REPO / "recipes" / "configs" / "quickstart.yaml"),
        *tiny_overrides(model_dir, output_dir, **extra),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _assert_trains_as(run: Path, single: Path) -> None:
    """Same losses and gradient norms as the one-process run, the same rank decisions (their scores agree up to the
    order of the reductions) and the same final ranks."""
    for one, two in zip(_read_jsonl(single / "train_log.jsonl"), _read_jsonl(run / "train_log.jsonl"), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4), two["step"]
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), two["step"]
    history = {name: _read_jsonl(path / "allocation.jsonl") for name, path in (("single", single), ("run", run))}
    scores = {name: [change.pop("score") for change in changes] for name, changes in history.items()}
    assert history["run"] == history["single"]
    assert scores["run"] == pytest.approx(scores["single"], abs=1e-6)
    assert json.loads((run / "rank_pattern.json").read_text()) == json.loads((single / "rank_pattern.json").read_text())


# dropout off so no process draws random masks; eval off (scoring is tested elsewhere)
SAME_AS_ONE_PROCESS = {
    "adapter.lora_dropout": 0.0,
    "eval.enabled": "false",
    "data.max_samples": 12,
    "train.batch_size": 8,
}


def test_fsdp2_on_two_cpu_processes_matches_one_process(recipe, tiny_model_dir, tmp_path):
    """Two gloo processes under FSDP2 (build_accelerator's CPU patch) with sharded loading, as the GPU configs have it
    (only the main process reads the checkpoint), train the same run as one process with gradient accumulation: same
    losses and gradient norms, same rank decisions. 12 rows in micro-batches of 2, batch 8: every epoch ends in a
    short window (2 of 4 micro-batches on one process, 1 of 2 on each of two), whose gradient is still the mean over
    the micro-batches it holds."""
    single = run_recipe(recipe, tiny_model_dir, tmp_path / "single", **SAME_AS_ONE_PROCESS)
    output = _launch_recipe("cpu_fsdp2.yaml", tiny_model_dir, tmp_path / "fsdp2", **SAME_AS_ONE_PROCESS)
    assert "2 process(es), distributed type FSDP" in output
    sharded = re.search(r"(\d+) of (\d+) parameter tensors are sharded", output)
    assert sharded and int(sharded.group(1)) == int(sharded.group(2)) > 0  # FSDP2 really shards, adapters included
    fsdp = tmp_path / "fsdp2"
    _assert_trains_as(fsdp, single)
    assert (fsdp / "peft" / "adapter_model.safetensors").is_file() and (fsdp / "checkpoints" / "step_00000006").is_dir()


def test_hsdp_2x2_recipe_checkpoints_and_resumes_as_one_process_trains(recipe, tiny_model_dir, tmp_path):
    """The recipe on a 2 x 2 HSDP mesh (4 gloo processes, sharded loading as in hsdp_multinode.yaml) trains as one
    process does, and its full checkpoint (sharded adapters, Adam moments, allocator state, data position) resumes:
    stopped after step 3 (its last checkpoint removed), the rerun continues to the same losses, decisions and PEFT
    export."""
    from safetensors.torch import load_file

    # 16 rows: every window is full (one micro-batch of 2 on each of 4 processes, 4 of them on one process)
    same = {**SAME_AS_ONE_PROCESS, "data.max_samples": 16}
    single = run_recipe(recipe, tiny_model_dir, tmp_path / "single", **same)
    hsdp = tmp_path / "hsdp"
    output = _launch_recipe("cpu_hsdp.yaml", tiny_model_dir, hsdp, **same)
    assert "4 process(es), distributed type FSDP" in output
    _assert_trains_as(hsdp, single)
    first_log = _read_jsonl(hsdp / "train_log.jsonl")
    first_export = load_file(hsdp / "peft" / "adapter_model.safetensors")

    shutil.rmtree(hsdp / "checkpoints" / "step_00000006")
    output = _launch_recipe("cpu_hsdp.yaml", tiny_model_dir, hsdp, **same)
    assert re.search(r"resumed from \S+step_00000003: step 3", output), output[-3000:]
    resumed_log = _read_jsonl(hsdp / "train_log.jsonl")
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first_log, resumed_log):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6, abs=1e-7), after["step"]
    _assert_trains_as(hsdp, single)
    for key, tensor in load_file(hsdp / "peft" / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, first_export[key], rtol=1e-5, atol=1e-6)


def test_model_loading_choices(tiny_model_dir):
    import importlib.util

    from transformers import AutoTokenizer

    from flexlora.recipe_kit.models import (
        ensure_pad_token,
        resolve_attn_implementation,
        resolve_dtype,
        resolve_model_location,
    )

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32  # no bf16 on CPU: its backward is 15-55x slower there
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_attn_implementation("auto", cpu) == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash_attn is not installed"):
            resolve_attn_implementation("flash_attention_2", cpu)
    with pytest.raises(ConfigError, match="package 'no_such_weights_pkg' is not installed"):
        resolve_model_location("package:no_such_weights_pkg")
    assert resolve_model_location("package:flexlora") == str(REPO / "flexlora")
    assert resolve_model_location("package:flexlora/layer.py") == str(REPO / "flexlora" / "layer.py")
    with pytest.raises(ConfigError, match="flexlora/no_such_folder does not exist"):
        resolve_model_location("package:flexlora/no_such_folder")

    # Llama-3.1 style: a dedicated padding token exists and is preferred to EOS.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    ensure_pad_token(plain)
    assert plain.pad_token_id == plain.eos_token_id


def test_rank_timeline_replays_the_allocation_history():
    from flexlora.recipe_kit.records import rank_timeline, short_module_name

    history = [
        {"step": 3, "module": "model.layers.0.self_attn.q_proj", "rank_after": 1},
        {"step": 3, "module": "model.layers.1.mlp.down_proj", "rank_after": 3},
        {"step": 7, "module": "model.layers.0.self_attn.q_proj", "rank_after": 0},
    ]
    initial = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 2}
    names, edges, ranks = rank_timeline(initial, history, total_steps=10)
    assert names == list(initial) and edges == [0, 3, 7, 10]
    assert ranks == [[2, 1, 0], [2, 3, 3]]
    assert [short_module_name(n) for n in names] == ["L0.Q", "L1.Down"]
    with pytest.raises(ValueError, match="names module 'x'"):
        rank_timeline(initial, [{"step": 1, "module": "x", "rank_after": 1}], 10)


def test_peft_checkpoint_round_trip_keeps_trained_heads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from flexlora import FlexLoRAConfig
    from flexlora.recipe_kit.methods import build_method

    config = FlexLoRAConfig(target_modules=["q_proj"], r=2, modules_to_save=["lm_head"])
    method = build_method("lora", AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, 10)
    trained = {n: p for n, p in method.model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save." in n for n in trained) and any(".lora_B." in n for n in trained)
    with torch.no_grad():
        for p in trained.values():
            p.normal_()
    saved = {n: p.detach().clone() for n, p in trained.items()}
    method.save_checkpoint(tmp_path, method.model, is_main=True)
    with torch.no_grad():
        for p in trained.values():
            p.zero_()
    method.load_checkpoint(tmp_path, method.model)
    for name, param in trained.items():
        assert torch.equal(param, saved[name]), name


# ---- nothing silent, nothing lost ---------------------------------------------------------------------------
def test_a_mistyped_data_path_on_the_command_line_is_an_error_not_generated_data(recipe, tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path .*no_data does not exist"):
        run_recipe(recipe, tiny_model_dir, tmp_path / "run", **{"data.path": str(tmp_path / "no_data")})
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["flexlora", "lora", "adalora"])
def test_a_diverging_run_stops_naming_the_step_and_saves_nothing_non_finite(recipe, tiny_model_dir, tmp_path, method):
    from flexlora.recipe_kit.run_config import TrainingStopped

    out = tmp_path / method
    with pytest.raises(TrainingStopped, match=r"step \d+: non-finite loss"):
        run_recipe(
            recipe,
            tiny_model_dir,
            out,
            **{
                "method": method,
                "train.lr": 1e6,
                "train.max_grad_norm": 0,
                "train.warmup_steps": 0,
                "eval.enabled": "false",
            },
        )
    assert not (out / "adapter").exists() and not (out / "peft").exists() and not (out / "metrics.json").exists()


def test_skip_step_policy_is_bounded(recipe, tiny_model_dir, tmp_path):
    from flexlora.recipe_kit.run_config import TrainingStopped

    with pytest.raises(TrainingStopped, match="3 steps skipped, more than train.max_skipped_steps=2"):
        run_recipe(
            recipe,
            tiny_model_dir,
            tmp_path / "run",
            **{
                "train.lr": 1e6,
                "train.max_grad_norm": 0,
                "train.warmup_steps": 0,
                "train.on_nonfinite": "skip_step",
                "train.max_skipped_steps": 2,
                "eval.enabled": "false",
            },
        )


def test_resume_refuses_changed_settings_and_reruns_refuse_to_mix_logs(recipe, tiny_model_dir, tmp_path):
    from flexlora.recipe_kit.run_config import ConfigError

    out = run_recipe(recipe, tiny_model_dir, tmp_path / "run", **{"eval.enabled": "false"})
    first_log = _read_jsonl(out / "train_log.jsonl")
    finished = {
        path: path.read_bytes() for path in out.rglob("*") if path.is_file() and "checkpoints" not in path.parts
    }
    assert {"adapter", "peft", "metrics.json", "rank_heatmap.png"} <= {
        path.relative_to(out).parts[0] for path in finished
    }
    with pytest.raises(ConfigError, match=r"other settings: train.lr 0.002 -> 0.5"):
        run_recipe(recipe, tiny_model_dir, out, **{"eval.enabled": "false", "train.lr": 0.5})
    with pytest.raises(ConfigError, match="already holds a run .*checkpoint.overwrite=true"):
        run_recipe(recipe, tiny_model_dir, out, **{"eval.enabled": "false", "checkpoint.resume": "false"})
    assert _read_jsonl(out / "train_log.jsonl") == first_log  # neither attempt touched the run
    for path, content in finished.items():  # nor changed the finished run's adapter, export, metrics or config.yaml
        assert path.read_bytes() == content, path
    shutil.rmtree(out / "checkpoints")  # final outputs with nothing to resume them from: refused, not removed
    with pytest.raises(ConfigError, match="holds a run's adapter, peft.* but no valid checkpoint"):
        run_recipe(recipe, tiny_model_dir, out, **{"eval.enabled": "false"})
    for path, content in finished.items():
        assert path.read_bytes() == content, path
    run_recipe(
        recipe,
        tiny_model_dir,
        out,
        **{"eval.enabled": "false", "checkpoint.resume": "false", "checkpoint.overwrite": "true"},
    )
    assert [r["step"] for r in _read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4, 5, 6]  # one run, not two


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(recipe, tiny_model_dir, tmp_path, capsys):
    from flexlora.recipe_kit.checkpoints import manifest_problem

    out = run_recipe(recipe, tiny_model_dir, tmp_path / "run", **{"eval.enabled": "false"})
    newest = out / "checkpoints" / "step_00000006"
    adapter = newest / "adapter" / "flexlora_adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    assert "flexlora_adapter.safetensors has 100 bytes" in manifest_problem(newest)
    capsys.readouterr()
    run_recipe(recipe, tiny_model_dir, out, **{"eval.enabled": "false"})
    printed = capsys.readouterr().out  # the recipe logs to stdout
    assert "skipping checkpoint" in printed and "step_00000006" in printed
    assert "resumed from" in printed and "step_00000003" in printed


KILLER = """
import os, signal, sys
from flexlora.recipe_kit import checkpoints, loop

where, step = sys.argv[1], int(sys.argv[2])
if where == "after_step":  # between optimizer steps
    logged = loop.TrainLoop._log_step
    def _log_step(self, *args, **kwargs):
        logged(self, *args, **kwargs)
        if self.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    loop.TrainLoop._log_step = _log_step
else:  # mid-checkpoint: every file of the checkpoint written, its manifest not yet
    sealed = checkpoints.write_manifest
    def write_manifest(directory):
        if directory.name.endswith(f"{step:08d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        sealed(directory)
    checkpoints.write_manifest = write_manifest
from recipes import llama3_cr
llama3_cr.main(sys.argv[3:])
"""


def test_kill_9_at_random_points_resumes_bit_for_bit(recipe, tiny_model_dir, tmp_path):
    """A real recipe process killed with SIGKILL between steps and in the middle of writing a checkpoint, then
    resumed: adapter, PEFT export, allocation history and per-step losses equal those of an uninterrupted run."""
    import random
    import subprocess
    import sys

    from safetensors.torch import load_file

    reference = run_recipe(recipe, tiny_model_dir, tmp_path / "reference", **{"eval.enabled": "false"})
    out = tmp_path / "killed"
    args = [
        "--config",
        str(REPO / "recipes" / "configs" / "quickstart.yaml"),
        *tiny_overrides(tiny_model_dir, out, **{"eval.enabled": "false"}),
    ]
    kills = [("after_step", random.Random(0).choice([4, 5])), ("mid_checkpoint", 6)]  # checkpoints at steps 3 and 6
    for where, step in kills:
        killed = subprocess.run(
            [sys.executable, "-c", KILLER, where, str(step), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert killed.returncode == -9, (where, killed.stderr[-2000:])
    assert (out / "checkpoints" / ".tmp_step_00000006").is_dir()  # the checkpoint the last kill interrupted
    recipe.main(args)  # resumes from step 3

    assert [r["loss"] for r in _read_jsonl(out / "train_log.jsonl")] == [
        r["loss"] for r in _read_jsonl(reference / "train_log.jsonl")
    ]
    assert _read_jsonl(out / "allocation.jsonl") == _read_jsonl(reference / "allocation.jsonl")
    for path in ("adapter/flexlora_adapter.safetensors", "peft/adapter_model.safetensors"):
        resumed, uninterrupted = load_file(out / path), load_file(reference / path)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), path


def test_a_missing_model_folder_is_named(recipe, tmp_path):
    from flexlora.recipe_kit.models import resolve_model_location

    with pytest.raises(ConfigError, match="model.path ./no/such/model: no such folder"):
        resolve_model_location("./no/such/model")
    assert resolve_model_location("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"  # a hub id stays one


def test_a_full_disk_names_the_checkpoint_it_could_not_write(recipe, tiny_model_dir, tmp_path, monkeypatch):
    from flexlora.recipe_kit import checkpoints

    def full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save says when the disk is full

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(
        checkpoints.CheckpointError, match=r"could not write checkpoint .*\.tmp_step_00000003 \(disk full"
    ):
        run_recipe(recipe, tiny_model_dir, tmp_path / "run", **{"eval.enabled": "false"})


def test_lambda_lr_multiplier_is_refused_for_methods_without_lambda(recipe, tiny_model_dir, tmp_path):
    from flexlora.recipe_kit.run_config import ConfigError

    with pytest.raises(
        ConfigError, match=r"train.lambda_lr_multiplier=2 applies to FlexLoRA's lambda only; method=lora"
    ):
        run_recipe(recipe, tiny_model_dir, tmp_path / "lora", method="lora", **{"train.lambda_lr_multiplier": 2})
    with pytest.raises(ValueError, match=r"train.lambda_lr_multiplier must be > 0.*got -1"):
        run_recipe(recipe, tiny_model_dir, tmp_path / "neg", **{"train.lambda_lr_multiplier": -1})


def test_resume_refuses_data_whose_contents_changed_in_one_line(recipe, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Same data.path, same row count, one answer changed: the checkpoint is not resumed onto it (exit 2, one line
    naming the data). The run's LR warm-up outlasts it and delta_t allows one allocation step: each warned once."""
    from flexlora.recipe_kit.data.synthetic import synthetic_rows
    from flexlora.recipe_kit.run_config import run_recipe as run_from_command_line

    rows = synthetic_rows("synthetic_truefalse", 24, seed=0)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    args = [
        "--config",
        str(REPO / "recipes" / "configs" / "quickstart.yaml"),
        *tiny_overrides(
            tiny_model_dir,
            tmp_path / "run",
            **{"data.path": str(data), "eval.enabled": "false", "train.warmup_steps": 6, "adapter.delta_t": 4},
        ),
    ]
    capsys.readouterr()
    recipe.main(args)
    printed = capsys.readouterr().out
    assert printed.count("the learning rate never reaches train.lr") == 1
    assert printed.count("adapter.delta_t=4 allows 1 allocation step(s)") == 1

    rows[5]["output"] = "the answer is false" if rows[5]["output"] != "the answer is false" else "the answer is true"
    data.write_text(json.dumps(rows))
    monkeypatch.setattr("sys.argv", ["llama3_cr.py", *args])
    with pytest.raises(SystemExit) as stopped:
        run_from_command_line(recipe.main)
    assert stopped.value.code == 2
    printed = capsys.readouterr().err.strip().splitlines()  # progress bars, then the error
    (error,) = [line for line in printed if line.startswith("error: ")]
    assert error == printed[-1]
    assert f"was trained on other data: the contents of data.path {data} changed" in error


def test_overwrite_removes_every_output_of_the_previous_run_even_when_the_new_run_fails(
    recipe, tiny_model_dir, tmp_path
):
    from flexlora.recipe_kit.run_config import TrainingStopped

    out = run_recipe(recipe, tiny_model_dir, tmp_path / "run")  # scored too: eval.json
    final_outputs = [
        "adapter",
        "peft",
        "rank_pattern.json",
        "allocation.jsonl",
        "rank_heatmap.png",
        "metrics.json",
        "eval.json",
    ]
    assert all((out / name).exists() for name in final_outputs)
    first_events = set((out / "tensorboard").rglob("*tfevents*"))
    assert first_events
    with pytest.raises(TrainingStopped):
        run_recipe(
            recipe,
            tiny_model_dir,
            out,
            **{
                "checkpoint.resume": "false",
                "checkpoint.overwrite": "true",
                "train.lr": 1e6,
                "train.max_grad_norm": 0,
                "train.warmup_steps": 0,
            },
        )
    assert [name for name in final_outputs if (out / name).exists()] == []
    assert not first_events & set((out / "tensorboard").rglob("*tfevents*"))  # the first run's event files are gone
    assert not (out / "checkpoints" / "step_00000006").exists()
    assert all(row["step"] <= 3 for row in _read_jsonl(out / "train_log.jsonl"))
