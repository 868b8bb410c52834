"""VTAB-1k: the 19 image-classification tasks of the paper's vision experiments (§4.5, Table 10).

Each task has 1000 training images: 800 for training and 200 for validation while tuning hyper-parameters
(``train800`` / ``val200``), all 1000 (``train800val200``) for the final run, scored on the official test set
(``test``). Three sources give the same list of (image, label) samples:

* image folders: ``<root>/<task>/<split>/<class>/<image>`` (any PIL-readable file). A class folder named by
  an integer is that class id; otherwise class ids number the sorted union of the class-folder names found
  in all splits of the task, so every split numbers the classes alike even when a split lacks some classes.
* list files, the layout of the widely shared VTAB-1k release (NOAH et al.): ``<root>/<task>/<split>.txt``
  with one ``<relative image path> <class id>`` per line, paths relative to ``<root>/<task>``.
* a hub dataset (``datasets.load_dataset(path, name, split=...)``) with an image and a label column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import DataError, load_hub_dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass(frozen=True)
class VtabTask:
    name: str  # folder name in the VTAB-1k release
    group: str  # natural, specialized or structured
    num_classes: int
    test_size: int  # rows of the official test set (Table 10)


VTAB_TASKS: dict[str, VtabTask] = {
    task.name: task
    for task in (
        VtabTask("cifar", "natural", 100, 10000),
        VtabTask("caltech101", "natural", 102, 6084),
        VtabTask("dtd", "natural", 47, 1880),
        VtabTask("oxford_flowers102", "natural", 102, 6149),
        VtabTask("oxford_iiit_pet", "natural", 37, 3669),
        VtabTask("svhn", "natural", 10, 26032),
        VtabTask("sun397", "natural", 397, 21750),
        VtabTask("patch_camelyon", "specialized", 2, 32768),
        VtabTask("eurosat", "specialized", 10, 5400),
        VtabTask("resisc45", "specialized", 45, 6300),
        VtabTask("diabetic_retinopathy", "specialized", 5, 42670),
        VtabTask("clevr_count", "structured", 8, 15000),
        VtabTask("clevr_dist", "structured", 6, 15000),
        VtabTask("dmlab", "structured", 6, 22735),
        VtabTask("kitti", "structured", 4, 711),
        VtabTask("dsprites_loc", "structured", 16, 73728),
        VtabTask("dsprites_ori", "structured", 16, 73728),
        VtabTask("smallnorb_azi", "structured", 18, 12150),
        VtabTask("smallnorb_ele", "structured", 9, 12150),
    )
}

# protocol -> (training split, evaluation split): "tuning" picks hyper-parameters, "final" is what Table 3 reports
PROTOCOLS = {"tuning": ("train800", "val200"), "final": ("train800val200", "test")}
SPLITS = ("train800", "val200", "train800val200", "test")


def get_task(name: str) -> VtabTask:
    if name not in VTAB_TASKS:
        raise ValueError(f"unknown VTAB-1k task {name!r}; choose one of {', '.join(VTAB_TASKS)}")
    return VTAB_TASKS[name]


# ---- local data ------------------------------------------------------------------------------------------
def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir())


def _class_ids(task_dir: Path) -> dict[str, int]:
    """Class-folder name -> id, identical for every split of the task (see the module docstring)."""
    names = sorted(
        {p.name for split in SPLITS if (task_dir / split).is_dir() for p in _class_folders(task_dir / split)}
    )
    if all(name.isdigit() for name in names):
        return {name: int(name) for name in names}
    return {name: i for i, name in enumerate(names)}


def read_list_file(path: str | Path) -> list[tuple[Path, int]]:
    """``<relative path> <class id>`` lines (paths relative to the file's folder); errors (``DataError``) name the
    file and line: a malformed line, a negative class id, an image file that does not exist, text that is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the list file: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    samples, missing = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        # the path may itself contain spaces: the class id is the last field
        image, _, label = line.rpartition(" ")
        if not image or not label.lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected '<image path> <class id>', got {line!r}")
        if int(label) < 0:
            raise DataError(f"{path}:{number}: class id {label} is negative")
        samples.append((path.parent / image, int(label)))
        if not samples[-1][0].is_file():  # one stat per image: cheap next to decoding it, and fails now, not mid-epoch
            missing.append(f"line {number}: {image}")
    if missing:
        more = f" ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"{path}: {len(missing)} image file(s) missing (paths relative to {path.parent}): "
            f"{'; '.join(missing[:5])}{more}"
        )
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def list_split(root: str | Path, task: str, split: str) -> list[tuple[Path, int]]:
    """Every (image path, class id) of one split of one task, from image folders or a list file."""
    if split not in SPLITS:
        raise ValueError(f"unknown VTAB-1k split {split!r}; choose one of {', '.join(SPLITS)}")
    task_dir = Path(root) / task
    split_dir, list_file = task_dir / split, task_dir / f"{split}.txt"
    if split_dir.is_dir():
        ids = _class_ids(task_dir)
        samples = [
            (image, ids[folder.name])
            for folder in _class_folders(split_dir)
            for image in sorted(folder.iterdir())
            if image.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not samples:
            raise DataError(f"{split_dir}: no images (expected {split_dir}/<class>/<image>)")
    elif list_file.is_file():
        samples = read_list_file(list_file)
    else:
        raise DataError(
            f"VTAB-1k {task}/{split}: neither the folder {split_dir} nor the list file {list_file} exists",
            ["data.root"],
        )
    if task in VTAB_TASKS:
        limit = VTAB_TASKS[task].num_classes
        bad = sorted({label for _, label in samples if label >= limit})
        if bad:
            source = split_dir if split_dir.is_dir() else list_file
            raise DataError(f"{source}: class id(s) {bad[:5]} out of range for its {limit} classes (VTAB-1k {task})")
    return samples


class ImageSamples:
    """Map-style dataset of ``{"pixel_values", "labels"}``; images are decoded and preprocessed on access.

    ``image_processor`` is the model's (e.g. ``ViTImageProcessor``: resize to the model's size, rescale,
    normalise with the statistics the backbone was pretrained with).
    """

    def __init__(self, samples, image_processor):  # a list of (path, id) or HubSamples
        self.samples = samples
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        image, label = self.samples[index]
        if not isinstance(image, Image.Image):  # a path (local layouts); hub datasets hand over decoded images
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except OSError as error:
                raise OSError(f"cannot read image {image}: {error}") from error
        else:
            image = image.convert("RGB")
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": label}


class HubSamples:
    """(PIL image, class id) pairs of a ``datasets.Dataset``, read row by row (test sets are too big to decode at
    once)."""

    def __init__(self, records, image_column: str, label_column: str, source: str):
        missing = [c for c in (image_column, label_column) if c not in records.column_names]
        if missing:
            raise DataError(f"{source}: column(s) {missing} missing; found {records.column_names}")
        self.records, self.image_column, self.label_column = records, image_column, label_column

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.records[index]
        return row[self.image_column], int(row[self.label_column])


def load_hub_split(
    path: str,
    split: str,
    name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
    data_dir: str | None = None,
) -> HubSamples:
    """One split of a ``datasets`` dataset: a hub id, or a packaged builder such as ``imagefolder`` + ``data_dir``."""
    records = load_hub_dataset("data.hub_dataset", path, name, split=split, cache_dir=cache_dir, data_dir=data_dir)
    return HubSamples(records, image_column, label_column, f"{path} [{split}]")


# ---- metric ----------------------------------------------------------------------------------------------
def top1_accuracy(logits, labels) -> float:
    """Share of rows whose highest logit is the label (VTAB's metric)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or len(labels) == 0:
        raise ValueError(f"expected logits [N, C] and labels [N] with N > 0, got {logits.shape} and {labels.shape}")
    return float((logits.argmax(axis=1) == labels).mean())
