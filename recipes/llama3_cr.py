"""Commonsense-reasoning fine-tuning (paper §4.4, Table 2, App. D.2): FlexLoRA, LoRA or AdaLoRA on LLM-Adapters data.

    accelerate launch --config_file accelerate_configs/fsdp2.yaml recipes/llama3_cr.py --config recipes/configs/llama3_8b_cr_r8.yaml
    accelerate launch --config_file accelerate_configs/fsdp2.yaml recipes/llama3_cr.py --config recipes/configs/llama3_8b_cr_r32.yaml

Offline on a CPU (``make quickstart``; SmolLM2-135M, a few hundred steps, then lm-eval):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/llama3_cr.py --config recipes/configs/quickstart.yaml

Any config value can be overridden after the config file with ``key=value`` (dotted for sections), e.g.
``method=lora``, ``train.max_steps=200``, ``adapter.r=32``, ``eval.limit=50``, ``output_dir=outputs/try``.

Setup -> train loop -> save. The loop is the same for the three methods: each optimizer step is followed by the
method's rank step (FlexLoRA's ``RankAllocator.step``, PEFT AdaLoRA's ``update_and_allocate``, nothing for LoRA).
Checkpoints every ``checkpoint.every_n_steps``; a rerun with the same ``output_dir`` resumes from the newest.
Outputs in ``output_dir``: config.yaml, adapter/ (FlexLoRA native), peft/ (PEFT adapter), rank_pattern.json,
allocation.jsonl, rank_heatmap.png, train_log.jsonl, tensorboard/, metrics.json, eval.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from torch.distributed.tensor import DTensor
from transformers import DataCollatorForSeq2Seq, get_scheduler

# The scorer lives in the repo's top-level eval/ package, next to this recipes/ folder (not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.commonsense import EvalConfig, evaluate, format_table, plan_tasks, write_report  # noqa: E402
from flexlora import FlexLoRAConfig  # noqa: E402
from flexlora.data import (  # noqa: E402
    SYNTHETIC_TASKS,
    DataConfig,
    TokenizedDataset,
    load_rows,
    select_rows,
    summarize_counts,
    tokenize_rows,
    write_synthetic_dataset,
)
from flexlora.training import (  # noqa: E402
    CheckpointConfig,
    LoggingConfig,
    MetricLogger,
    ModelConfig,
    TrainConfig,
    TrainLoop,
    build_method,
    check_run_sections,
    epoch_loader,
    load_causal_lm,
    plot_rank_heatmap,
    read_jsonl,
    start_run,
    steps_per_epoch,
)

log = logging.getLogger("llama3_cr")

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass
class RecipeConfig:
    method: str = "flexlora"  # flexlora | lora | adalora
    output_dir: str = "outputs/llama3_8b_cr_{method}"  # {method} is replaced by the method name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The adapter section is a FlexLoRAConfig; LoRA and AdaLoRA take r, alpha, dropout, targets and the schedule
    # from it (see flexlora.training.build_method for the budget rule). total_steps is filled in from the data.
    adapter: FlexLoRAConfig = field(
        default_factory=lambda: FlexLoRAConfig(
            target_modules=list(PAPER_TARGETS), r=8, lora_alpha=16, lora_dropout=0.05, b0=4, t_warmup=5000, t_final=5000, delta_t=1000
        )
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_run_sections(self)


def main(argv: list[str] | None = None) -> None:
    # ---------------------------------------------------------------- setup
    config: RecipeConfig
    config, accelerator, out = start_run(RecipeConfig, argv, log)
    is_main = accelerator.is_main_process
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("this recipe runs on one process, DDP or FSDP2 (accelerate_configs/fsdp2.yaml, ddp.yaml, cpu*.yaml); "
                         "not DeepSpeed, whose engine keeps the optimizer state the recipe's checkpoints save")
    if config.method == "adalora" and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("method=adalora cannot run under FSDP: PEFT's AdaLoRA allocator reads whole, unsharded A/E/B "
                         "tensors and gradients. Use a DDP accelerate config (accelerate_configs/ddp.yaml) for the AdaLoRA baseline.")
    set_seed(config.train.seed)
    accumulation = config.train.gradient_accumulation(accelerator.num_processes)
    accelerator.gradient_accumulation_steps = accumulation

    data_path = config.data.path
    if config.data.uses_synthetic():
        data_path = str(out / "synthetic_data")
        if is_main:
            reason = "data.path=synthetic" if config.data.path == "synthetic" else f"data.path {config.data.path} does not exist (data.if_missing=synthetic)"
            log.warning("%s: training on a generated data set written to %s", reason, data_path)
            write_synthetic_dataset(data_path, config.data.synthetic_train_per_task, config.data.synthetic_dev_per_task, config.data.seed)
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
                log.warning("scoring the generated data set's dev files (tasks %s) instead of eval.tasks", ", ".join(SYNTHETIC_TASKS))
            config.eval.tasks = list(SYNTHETIC_TASKS)
        plan_tasks(config.eval, eval_data_dir)  # missing or malformed scoring files fail now, not after training

    with accelerator.main_process_first():  # the first process converts / downloads, the others read its result
        model, tokenizer = load_causal_lm(config.model, accelerator.device)
    tokenizer.padding_side = "right"
    model_name = Path(config.model.gguf_file).stem if config.model.gguf_file else Path(config.model.path.rstrip("/")).name
    examples = tokenize_rows(rows, tokenizer, config.data.cutoff_len, config.data.train_on_inputs, config.data.add_eos_token, progress=is_main)
    dataset = TokenizedDataset(examples)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    batches = len(epoch_loader(dataset, 0, config.train, collator, accelerator))
    per_epoch = steps_per_epoch(batches, accumulation)
    total_steps = config.train.max_steps or config.train.epochs * per_epoch
    log.info(
        "%d examples, %d micro-batches of %d per process per epoch, gradient accumulation %d -> %d optimizer steps per epoch, %d in total",
        len(dataset), batches, config.train.micro_batch_size, accumulation, per_epoch, total_steps,
    )

    checkpointing = config.model.gradient_checkpointing
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.activation_checkpointing:
        # FSDP's checkpoint wrapper renames every decoder layer (..._checkpoint_wrapped_module...), and PEFT's adapter
        # saving then matches none of its modules; transformers' own checkpointing recomputes the same without renaming.
        accelerator.state.fsdp_plugin.activation_checkpointing = False
        checkpointing = True
        log.info("FSDP activation checkpointing requested: using transformers' non-reentrant gradient checkpointing for it")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    method = build_method(config.method, model, config.adapter, total_steps, task_type="CAUSAL_LM")
    params = method.parameter_count()
    log.info("method %s: %s adapter parameters allocated, %d target matrices, total active rank %d",
             config.method, f"{params:,}", len(method.initial_ranks()), sum(method.ranks().values()))
    optimizer = torch.optim.AdamW([p for p in method.model.parameters() if p.requires_grad], lr=config.train.lr, weight_decay=config.train.weight_decay)
    model, optimizer = accelerator.prepare(method.model, optimizer)  # one call: FSDP2 shards model and optimizer together
    parameters = list(model.parameters())
    log.info("%d of %d parameter tensors are sharded (DTensor)", sum(isinstance(p, DTensor) for p in parameters), len(parameters))
    # Stepped once per optimizer step by hand: accelerate's prepared scheduler steps once per process.
    scheduler = get_scheduler(config.train.lr_scheduler, optimizer, num_warmup_steps=config.train.warmup_for(total_steps),
                              num_training_steps=total_steps)

    # ---------------------------------------------------------------- train loop
    metric_logger = MetricLogger(out / "tensorboard", config.logging, dataclasses.asdict(config), enabled=is_main)
    loop = TrainLoop(config, accelerator, method, model, optimizer, scheduler, dataset, collator, total_steps, out, metric_logger)
    loop.resume()
    train_seconds = loop.run()

    # ---------------------------------------------------------------- save
    rank_pattern = method.save_final(out, model, is_main)
    if is_main:
        (out / "rank_pattern.json").write_text(json.dumps(rank_pattern, indent=2))
        method.write_history(out / "allocation.jsonl")
        plot_rank_heatmap(method.initial_ranks(), read_jsonl(out / "allocation.jsonl"), total_steps, out / "rank_heatmap.png",
                          title=f"{config.method} rank allocation ({model_name}, r={config.adapter.r})")
    metrics = {
        "method": config.method,
        "adapter_parameters": params,
        "steps": loop.global_step,
        "final_loss": loop.last_loss,
        "train_seconds_this_run": round(train_seconds, 1),
        "total_active_rank": sum(method.ranks().values()),
        "rank_changes": len(method.history()),
    }

    if config.eval.enabled:
        if accelerator.num_processes > 1:
            if is_main:
                command = (f"python -m eval.commonsense --base {config.model.path} --adapter {out / 'adapter' if config.method == 'flexlora' else out / 'peft'}"
                           + (f" --gguf-file {config.model.gguf_file}" if config.model.gguf_file else "")
                           + f" --data-dir {eval_data_dir} --tasks {' '.join(config.eval.tasks)}")
                log.warning("eval.enabled: scoring runs in a single process; score the saved adapter with\n  %s", command)
        else:
            eval_model = accelerator.unwrap_model(model)
            if checkpointing:
                eval_model.activation_checkpointing_disable()
            eval_model.config.use_cache = True
            results = evaluate(eval_model, tokenizer, config.eval, eval_data_dir)
            label = {"flexlora": "FlexLoRA", "lora": "LoRA", "adalora": "AdaLoRA"}[config.method] + f" r={config.adapter.r}"
            table = format_table(results, model_name, label, params)
            print(table, flush=True)
            write_report(results, table, out / "eval.json", base=config.model.path, method=label, params=params, limit=config.eval.limit)
            metrics["eval"] = results
    if is_main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    metric_logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
