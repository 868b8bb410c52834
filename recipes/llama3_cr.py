"""Commonsense-reasoning fine-tuning (paper §4.4, Table 2, App. D.2): FlexLoRA, LoRA or AdaLoRA on LLM-Adapters data.

    accelerate launch --config_file accelerate_configs/fsdp2.yaml recipes/llama3_cr.py \
        --config recipes/configs/llama3_8b_cr_r8.yaml
    accelerate launch --config_file accelerate_configs/fsdp2.yaml recipes/llama3_cr.py \
        --config recipes/configs/llama3_8b_cr_r32.yaml

Offline on a CPU (``make quickstart``; SmolLM2-135M, a few hundred steps, then lm-eval):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/llama3_cr.py \
        --config recipes/configs/quickstart.yaml

Any config value can be overridden after the config file with ``key=value`` (dotted for sections), e.g.
``method=lora``, ``train.max_steps=200``, ``adapter.r=32``, ``eval.limit=50``, ``output_dir=outputs/try``.

Setup -> train loop -> save. The loop is the same for the three methods: each optimizer step is followed by the
method's rank step (FlexLoRA's ``RankAllocator.step``, PEFT AdaLoRA's ``update_and_allocate``, nothing for LoRA).
Checkpoints every ``checkpoint.every_n_steps``; a rerun with the same ``output_dir`` resumes from the newest.
Outputs in ``output_dir``: config.yaml, adapter/ (FlexLoRA native), peft/ (PEFT adapter), rank_pattern.json,
allocation.jsonl, rank_heatmap.png, train_log.jsonl, tensorboard/, metrics.json, eval.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import DistributedType, set_seed
from torch.distributed.tensor import DTensor
from transformers import DataCollatorForSeq2Seq

from flexlora import FlexLoRAConfig
from flexlora.names import METHOD_LABELS
from flexlora.recipe_kit.checkpoints import content_fingerprint
from flexlora.recipe_kit.data.commonsense import (
    DataConfig,
    TokenizedDataset,
    load_rows,
    select_rows,
    summarize_counts,
    tokenize_rows,
)
from flexlora.recipe_kit.data.packing import packed_collator_for
from flexlora.recipe_kit.data.synthetic import SYNTHETIC_TASKS, write_synthetic_dataset
from flexlora.recipe_kit.loop import DataIdentity
from flexlora.recipe_kit.models import load_causal_lm, main_process_loads_weights
from flexlora.recipe_kit.run_config import ConfigError, run_recipe
from flexlora.recipe_kit.scoring import EvalConfig, format_table, plan_tasks, score, write_report
from flexlora.recipe_kit.scoring_cli import scoring_command
from flexlora.recipe_kit.sections import CheckpointConfig, LoggingConfig, ModelConfig, TrainConfig, check_run_sections
from flexlora.recipe_kit.startup import start_run
from flexlora.recipe_kit.train_setup import build_training, refuse_unsupported_engine, run_metrics, save_outputs

log = logging.getLogger("llama3_cr")


@dataclass(kw_only=True)
class RecipeConfig:
    """The sections with their own defaults; which values the yaml states is in flexlora.recipe_kit.sections."""

    method: str = "flexlora"  # one of flexlora.names.METHODS
    output_dir: str = "outputs/llama3_8b_cr_{method}"  # {method} is replaced by the method name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # A FlexLoRAConfig, given by the yaml (there is no default target); LoRA and AdaLoRA take r, alpha, dropout, targets
    # and the schedule from it (budget rule in flexlora.recipe_kit.methods.build_method). total_steps is filled in
    # from the data.
    adapter: FlexLoRAConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_run_sections(self)


def main(argv: list[str] | None = None) -> None:
    # ---------------------------------------------------------------- setup
    config: RecipeConfig
    config, accelerator, out, overridden = start_run(RecipeConfig, argv, log)
    is_main = accelerator.is_main_process
    refuse_unsupported_engine(config, accelerator)  # before loading an 8B model, not after
    set_seed(config.train.seed)

    data_path = config.data.path
    if config.data.uses_synthetic() and config.data.path != "synthetic" and "data.path" in overridden:
        # data.if_missing applies to the path written in the config; a path typed on the command line must exist
        raise FileNotFoundError(
            f"data.path {config.data.path} does not exist (given on the command line, so no generated data instead)"
        )
    if config.data.uses_synthetic():
        data_path = str(out / "synthetic_data")
        if is_main:
            reason = (
                "data.path=synthetic"
                if config.data.path == "synthetic"
                else f"data.path {config.data.path} does not exist (data.if_missing=synthetic)"
            )
            log.warning("%s: training on a generated data set written to %s", reason, data_path)
            write_synthetic_dataset(
                data_path, config.data.synthetic_train_per_task, config.data.synthetic_dev_per_task, config.data.seed
            )
        accelerator.wait_for_everyone()
    rows, counts = load_rows(data_path, config.data.split)
    log.info("data %s: %d rows (%s)", data_path, len(rows), summarize_counts(counts))
    rows = select_rows(rows, config.data.max_samples, config.data.seed)
    if config.data.max_samples is not None:
        log.info("data.max_samples=%d: training on a seeded subset of %d rows", config.data.max_samples, len(rows))

    eval_data_dir = config.eval.data_dir or (data_path if Path(data_path).is_dir() else None)
    if config.eval.enabled:
        if config.data.uses_synthetic() and config.eval.data_dir is None:
            if is_main:
                log.warning(
                    "scoring the generated data set's dev files (tasks %s) instead of eval.tasks",
                    ", ".join(SYNTHETIC_TASKS),
                )
            config.eval.tasks = list(SYNTHETIC_TASKS)
        plan_tasks(config.eval, eval_data_dir)  # missing or malformed scoring files fail now, not after training

    with accelerator.main_process_first():  # the first process converts / downloads, the others read its result
        # FSDP2 sharded loading: only the main process reads the weights; prepare() broadcasts them into every shard
        weights = is_main or not main_process_loads_weights(accelerator)
        model, tokenizer = load_causal_lm(config.model, accelerator.device, weights=weights)
    tokenizer.padding_side = "right"
    model_name = (
        Path(config.model.gguf_file).stem if config.model.gguf_file else Path(config.model.path.rstrip("/")).name
    )
    examples = tokenize_rows(
        rows,
        tokenizer,
        config.data.cutoff_len,
        config.data.train_on_inputs,
        config.data.add_eos_token,
        progress=is_main,
        source=data_path,
    )
    dataset = TokenizedDataset(examples)
    # one padding-free sequence per micro-batch where rows stay apart (data.packing=auto|true), else padded batches
    attn_implementation = model.config._attn_implementation
    collator = packed_collator_for(config.data.packing, attn_implementation)  # true under eager etc.: a clear error
    if collator is not None:
        log.info(
            "data.packing=%s: each micro-batch is one padding-free sequence (attn_implementation=%s)",
            str(config.data.packing).lower(),
            attn_implementation,
        )
    else:
        if config.data.packing == "auto":
            log.info(
                "data.packing=auto: padded micro-batches, since attn_implementation=%s cannot keep packed rows apart",
                attn_implementation,
            )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, return_tensors="pt")

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.activation_checkpointing:
        # FSDP's checkpoint wrapper renames every decoder layer (..._checkpoint_wrapped_module...), and PEFT's adapter
        # saving then matches none of its modules; transformers' own checkpointing recomputes the same without renaming.
        raise ConfigError(
            "fsdp_activation_checkpointing is on in the accelerate config: set it to false there and use "
            "model.gradient_checkpointing=true (transformers' non-reentrant checkpointing) instead"
        )
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    data = DataIdentity(f"data.path {data_path}", content_fingerprint(rows))
    training = build_training(config, accelerator, model, dataset, collator, data, "CAUSAL_LM", out)
    parameters = list(training.model.parameters())
    log.info(
        "%d of %d parameter tensors are sharded (DTensor)",
        sum(isinstance(p, DTensor) for p in parameters),
        len(parameters),
    )

    # ---------------------------------------------------------------- train loop
    training.loop.resume()
    train_seconds = training.loop.run()

    # ---------------------------------------------------------------- save
    save_outputs(training, out, is_main, title=f"{config.method} rank allocation ({model_name}, r={config.adapter.r})")
    metrics = run_metrics(training, train_seconds)
    params = training.adapter_parameters

    if config.eval.enabled:
        if accelerator.num_processes > 1:
            if is_main:
                adapter_dir = out / ("adapter" if config.method == "flexlora" else "peft")
                command = scoring_command(config.model, adapter_dir, eval_data_dir, config.eval, out / "eval.json")
                log.warning(
                    "eval.enabled: scoring runs in a single process; score the saved adapter with\n  %s", command
                )
        else:
            eval_model = accelerator.unwrap_model(training.model)
            if config.model.gradient_checkpointing:
                eval_model.activation_checkpointing_disable()
            eval_model.config.use_cache = True
            label = f"{METHOD_LABELS[config.method]} r={config.adapter.r}"
            rows = score(eval_model, tokenizer, config.eval, eval_data_dir, label, params)
            table = format_table(rows, model_name)
            print(table, flush=True)
            write_report(
                rows,
                table,
                out / "eval.json",
                base=config.model.path,
                method=label,
                params=params,
                limit=config.eval.limit,
            )
            metrics["eval"] = rows[0].results
    if is_main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_recipe(main)
