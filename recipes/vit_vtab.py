"""VTAB-1k fine-tuning (paper §4.5, Table 3, App. D.3 Tables 10 / 11): FlexLoRA, LoRA or AdaLoRA on ViT-B/16
(ImageNet-21k).

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/vit_vtab.py \\
        --config recipes/configs/vtab/vit_b16_in21k.yaml data.task=cifar
    for task in cifar caltech101 dtd oxford_flowers102 oxford_iiit_pet svhn sun397 patch_camelyon eurosat resisc45 \\
                diabetic_retinopathy clevr_count clevr_dist dmlab kitti dsprites_loc dsprites_ori smallnorb_azi \\
                smallnorb_ele; do
      accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/vit_vtab.py \\
        --config recipes/configs/vtab/vit_b16_in21k.yaml data.task=$task method=flexlora
    done

``data.protocol=final`` (default) trains on all 1000 images (train800val200) and scores the official test set, as
Table 3 reports; ``data.protocol=tuning`` trains on train800 and scores val200, for choosing hyper-parameters.
Data layouts (image folders, the VTAB-1k list files, or a hub dataset): see flexlora/recipe_kit/data/vtab.py. Images
are resized and normalised by the model's own image processor (for the ImageNet-21k ViT-B/16: 224 x 224,
mean = std = 0.5).

Any image classifier works through ``AutoModelForImageClassification``: set ``model.path`` and name its linear
layers in ``adapter.target_modules`` and its head in ``adapter.modules_to_save``. Overrides as in the other recipes
(``key=value``, dotted for sections). Outputs: as recipes/deberta_glue.py (the same classifier loop).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import AutoImageProcessor, AutoModelForImageClassification

from flexlora import FlexLoRAConfig
from flexlora.config import choice_problem, raise_problems
from flexlora.recipe_kit.checkpoints import content_fingerprint, file_sha256
from flexlora.recipe_kit.classifier import ClassifierRunSections, train_and_evaluate
from flexlora.recipe_kit.data import vtab
from flexlora.recipe_kit.loop import DataIdentity
from flexlora.recipe_kit.models import load_classifier, model_name, resolve_model_location
from flexlora.recipe_kit.run_config import run_recipe
from flexlora.recipe_kit.sections import DATA_SOURCES, ModelConfig, TrainConfig, minimum_problem
from flexlora.recipe_kit.startup import start_run

log = logging.getLogger("vit_vtab")


@dataclass
class VtabDataConfig:
    task: str = "cifar"  # a VTAB-1k task (flexlora.recipe_kit.data.vtab.VTAB_TASKS); another name needs num_classes
    protocol: str = "final"  # final: train800val200 -> test | tuning: train800 -> val200
    source: str = "local"  # local: image folders or list files under root | hub: hub_dataset via datasets.load_dataset
    root: str = "data/vtab-1k"  # holds <task>/<split>/<class>/<image> or <task>/<split>.txt
    hub_dataset: str | None = None
    hub_config: str | None = None  # default: the task name
    hub_train_split: str | None = None  # default: the protocol's split names (train800val200 / test ...)
    hub_eval_split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    num_classes: int | None = None  # default: Table 10's count for the task
    max_eval_samples: int | None = None  # a seeded subset of the evaluation split (quick checks); null: all
    num_workers: int = 4  # image decoding and preprocessing processes per data loader
    seed: int = 0

    def __post_init__(self) -> None:
        raise_problems(
            self,
            [
                choice_problem("protocol", self.protocol, tuple(vtab.PROTOCOLS)),
                choice_problem("source", self.source, DATA_SOURCES),
                "hub_dataset is empty: source=hub needs the hub dataset to read"
                if self.source == "hub" and not self.hub_dataset
                else None,
                f"task {self.task!r} is not a VTAB-1k task ({', '.join(vtab.VTAB_TASKS)}): give num_classes"
                if self.task not in vtab.VTAB_TASKS and self.num_classes is None
                else None,
                minimum_problem("num_classes", self.num_classes, 2, nullable=True),
                minimum_problem("max_eval_samples", self.max_eval_samples, 1, nullable=True),
                minimum_problem("num_workers", self.num_workers, 0),
            ],
        )

    def classes(self) -> int:
        return self.num_classes if self.num_classes is not None else vtab.VTAB_TASKS[self.task].num_classes


@dataclass(kw_only=True)
class RecipeConfig(ClassifierRunSections):  # + eval, checkpoint and logging sections
    """The sections with their own defaults; which values the yaml states is in flexlora.recipe_kit.sections."""

    method: str = "flexlora"  # one of flexlora.names.METHODS
    output_dir: str = "outputs/vtab/{task}-{method}"  # {task} and {method} are filled in
    model: ModelConfig  # given by the yaml: the kit's default model is a causal LM
    data: VtabDataConfig = field(default_factory=VtabDataConfig)
    # A FlexLoRAConfig, given by the yaml; LoRA and AdaLoRA take r, alpha, dropout, targets, head and schedule from it
    # (budget rule in flexlora.recipe_kit.methods.build_method). total_steps is filled in from the data and
    # train.epochs / train.max_steps.
    adapter: FlexLoRAConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.check_sections(task=self.data.task)


def load_vtab_samples(data: VtabDataConfig) -> tuple[object, object, str]:
    """(training samples, evaluation samples, evaluation split name) for the configured protocol and source."""
    train_split, eval_split = vtab.PROTOCOLS[data.protocol]
    if data.source == "local":
        train = vtab.list_split(data.root, data.task, train_split)
        evaluation = vtab.list_split(data.root, data.task, eval_split)
    else:
        name = data.hub_config or data.task
        columns = {"name": name, "image_column": data.image_column, "label_column": data.label_column}
        train = vtab.load_hub_split(data.hub_dataset, data.hub_train_split or train_split, **columns)
        evaluation = vtab.load_hub_split(data.hub_dataset, data.hub_eval_split or eval_split, **columns)
    if data.max_eval_samples is not None and data.max_eval_samples < len(evaluation):
        chosen = sorted(random.Random(data.seed).sample(range(len(evaluation)), data.max_eval_samples))
        evaluation = [evaluation[i] for i in chosen]
        log.info("data.max_eval_samples=%d: scoring a seeded subset of %s", data.max_eval_samples, eval_split)
    log.info(
        "VTAB-1k %s (%s protocol): %d training images (%s), %d evaluation images (%s)",
        data.task,
        data.protocol,
        len(train),
        train_split,
        len(evaluation),
        eval_split,
    )
    return train, evaluation, eval_split


def training_data(data: VtabDataConfig, samples) -> DataIdentity:
    """The training images' identity: each image's bytes (the file's, or the decoded pixels of a hub row) and label."""

    def image_digest(image) -> str:
        return file_sha256(image) if isinstance(image, Path) else hashlib.sha256(image.tobytes()).hexdigest()

    source = data.root if data.source == "local" else data.hub_dataset
    rows = ((image_digest(image), label) for image, label in (samples[i] for i in range(len(samples))))
    return DataIdentity(f"the VTAB-1k {data.task} training images ({source})", content_fingerprint(rows))


def main(argv: list[str] | None = None) -> dict:
    config: RecipeConfig
    config, accelerator, _, _ = start_run(RecipeConfig, argv, log)
    is_main = accelerator.is_main_process
    set_seed(config.train.seed)

    train_samples, eval_samples, eval_split = load_vtab_samples(config.data)
    with accelerator.main_process_first():  # the first process downloads, the others read its cache
        processor = AutoImageProcessor.from_pretrained(resolve_model_location(config.model.path))
        # ignore_mismatched_sizes: a checkpoint that has a head of another size (ImageNet-1k) gets a new one too
        model = load_classifier(
            AutoModelForImageClassification,
            config.model,
            accelerator.device,
            num_labels=config.data.classes(),
            ignore_mismatched_sizes=True,
        )
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    train_dataset = vtab.ImageSamples(train_samples, processor)
    eval_datasets = {eval_split: vtab.ImageSamples(eval_samples, processor)}

    def score(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": vtab.top1_accuracy(logits, labels)}

    title = (
        f"{config.method} rank allocation, VTAB-1k {config.data.task} "
        f"({model_name(config.model.path)}, r={config.adapter.r})"
    )
    describe = {"task": config.data.task, "protocol": config.data.protocol, "model": config.model.path}
    metrics = train_and_evaluate(
        config,
        accelerator,
        model,
        None,
        train_dataset,
        training_data(config.data, train_samples),
        eval_datasets,
        torch.utils.data.default_collate,
        score,
        f"{eval_split}/accuracy",
        title,
        describe,
        num_workers=config.data.num_workers,
    )
    if is_main:
        accuracy = metrics["final"][f"{eval_split}/accuracy"]
        print(f"VTAB-1k {config.data.task} {config.method}: {eval_split} accuracy {accuracy:.4f}", flush=True)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    run_recipe(main)
