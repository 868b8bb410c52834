"""VTAB-1k data layouts on generated images, the accuracy metric, and a smoke run of the recipe."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexlora.recipe_kit.data import vtab


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path)


def _folders(root, task, layout):
    """layout: split -> {class folder: number of images}."""
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                _image(root / task / split / name / f"{i}.png", (10 * i, 40, 200))


def test_named_class_folders_share_ids_across_splits(tmp_path):
    # val200 lacks "cat": ids must still come from the union of all splits' folders
    _folders(tmp_path, "dtd", {"train800": {"cat": 2, "dog": 1, "emu": 1}, "val200": {"dog": 1, "emu": 2}})
    train = vtab.list_split(tmp_path, "dtd", "train800")
    val = vtab.list_split(tmp_path, "dtd", "val200")
    assert sorted(label for _, label in train) == [0, 0, 1, 2]
    assert sorted(label for _, label in val) == [1, 2, 2]
    assert all(path.parent.name == ["cat", "dog", "emu"][label] for path, label in train + val)


def test_integer_class_folders_are_the_ids(tmp_path):
    _folders(tmp_path, "svhn", {"test": {"3": 1, "10": 1}})
    with pytest.raises(ValueError, match=r"svhn/test: class id\(s\) \[10\] out of range for its 10 classes"):
        vtab.list_split(tmp_path, "svhn", "test")
    _folders(tmp_path, "eurosat", {"test": {"3": 1, "9": 2}})
    assert sorted(label for _, label in vtab.list_split(tmp_path, "eurosat", "test")) == [3, 9, 9]


def test_list_file_layout_and_malformed_line(tmp_path):
    task_dir = tmp_path / "kitti"
    _image(task_dir / "images" / "a b.jpg", (1, 2, 3))  # a space inside the path
    _image(task_dir / "images" / "c.jpg", (4, 5, 6))
    (task_dir / "train800.txt").write_text("images/a b.jpg 3\n\nimages/c.jpg 0\n")
    samples = vtab.list_split(tmp_path, "kitti", "train800")
    assert samples == [(task_dir / "images" / "a b.jpg", 3), (task_dir / "images" / "c.jpg", 0)]
    (task_dir / "val200.txt").write_text("images/c.jpg 1\nimages/a b.jpg one\n")
    with pytest.raises(ValueError, match=r"val200.txt:2: expected '<image path> <class id>', got 'images/a b.jpg one'"):
        vtab.list_split(tmp_path, "kitti", "val200")


def test_missing_split_and_unknown_names(tmp_path):
    with pytest.raises(vtab.DataError, match=r"neither the folder .*cifar/test nor the list file .*cifar/test.txt"):
        vtab.list_split(tmp_path, "cifar", "test")
    with pytest.raises(ValueError, match="unknown VTAB-1k split 'train'"):
        vtab.list_split(tmp_path, "cifar", "train")
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'cifar100'"):
        vtab.get_task("cifar100")


def test_task_table_matches_the_paper():
    assert len(vtab.VTAB_TASKS) == 19
    groups = [t.group for t in vtab.VTAB_TASKS.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert vtab.get_task("sun397").num_classes == 397 and vtab.get_task("kitti").test_size == 711
    assert vtab.PROTOCOLS == {"tuning": ("train800", "val200"), "final": ("train800val200", "test")}


def test_samples_are_preprocessed_by_the_image_processor(tmp_path):
    from transformers import ViTImageProcessor

    _folders(tmp_path, "dtd", {"test": {"a": 1}})
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    item = vtab.ImageSamples(vtab.list_split(tmp_path, "dtd", "test"), processor)[0]
    assert item["labels"] == 0 and tuple(item["pixel_values"].shape) == (3, 8, 8)
    # colour (0, 40, 200) rescaled to [0, 1] then normalised with mean = std = 0.5
    expected = [2 * 0 / 255 - 1, 2 * 40 / 255 - 1, 2 * 200 / 255 - 1]
    assert item["pixel_values"].mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError, match="cannot read image .*broken.png"):
        vtab.ImageSamples([(broken, 0)], processor)[0]


def test_hub_split_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _folders(tmp_path / "data", "pets", {"train": {"a": 2, "b": 1}})
    samples = vtab.load_hub_split(
        "imagefolder", "train", data_dir=str(tmp_path / "data" / "pets"), cache_dir=str(tmp_path / "cache")
    )
    assert len(samples) == 3 and sorted(label for _, label in (samples[i] for i in range(3))) == [0, 0, 1]
    assert isinstance(samples[0][0], Image.Image)
    with pytest.raises(ValueError, match=r"column\(s\) \['fine_label'\] missing"):
        vtab.HubSamples(samples.records, "image", "fine_label", "imagefolder [train]")


def test_top1_accuracy_by_hand():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.2, 0.1], [1.0, 0.0, 3.0]])
    assert vtab.top1_accuracy(logits, [1, 0, 2, 2]) == pytest.approx(3 / 4)  # row 3 predicts 1, not 2
    with pytest.raises(ValueError, match="expected logits"):
        vtab.top1_accuracy(logits, [1, 0])


# ---- the recipe end to end -------------------------------------------------------------------------------


def _load_recipe():
    from recipes import vit_vtab

    return vit_vtab


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    """A 2-layer random ViT backbone for 32 x 32 images (no head: the recipe adds one) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="module")
def eurosat_root(tmp_path_factory):
    """Generated EuroSAT-shaped data (classes 0-3 of its 10) in the image-folder layout, final protocol."""
    root = tmp_path_factory.mktemp("vtab")
    for split, per_class in (("train800val200", 4), ("test", 2)):
        for label in range(4):
            for i in range(per_class):
                _image(root / "eurosat" / split / str(label) / f"{i}.png", (60 * label, 255 - 60 * label, 20 * i))
    return root


def _config_file(tmp_path, model_dir, root):
    import yaml

    values = {
        "output_dir": str(tmp_path / "{task}-{method}"),
        "model": {
            "path": str(model_dir),
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "gradient_checkpointing": False,
        },
        "data": {"task": "eurosat", "protocol": "final", "source": "local", "root": str(root), "num_workers": 0},
        "adapter": {
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
            "modules_to_save": ["classifier"],
            "r": 2,
            "lora_alpha": 4,
            "b0": 2,
            "t_warmup": 1,
            "t_final": 1,
            "delta_t": 1,
        },
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "micro_batch_size": 8,
            "lr": 1.0e-2,
            "warmup_ratio": 0.1,
            "log_every": 2,
        },
        "eval": {"every_n_steps": 0, "batch_size": 8},
        "checkpoint": {"every_n_steps": 0},
    }
    path = tmp_path / "vtab.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("method", ["flexlora", "adalora"])
def test_recipe_runs_and_writes_everything(tmp_path, tiny_vit_dir, eurosat_root, method):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    from flexlora.recipe_kit.records import read_jsonl

    recipe = _load_recipe()
    metrics = recipe.main(["--config", str(_config_file(tmp_path, tiny_vit_dir, eurosat_root)), f"method={method}"])
    out = tmp_path / f"eurosat-{method}"
    for name in [
        "config.yaml",
        "adapter" if method == "flexlora" else "peft",
        "peft/adapter_model.safetensors",
        "rank_pattern.json",
        "allocation.jsonl",
        "rank_heatmap.png",
        "train_log.jsonl",
        "eval.jsonl",
        "metrics.json",
        "tensorboard",
        "checkpoints/step_00000006/trainer_state.json",
    ]:
        assert (out / name).exists(), name
    assert metrics["steps"] == 6 and metrics["protocol"] == "final" and metrics["main_metric"] == "test/accuracy"
    assert 0 <= metrics["final"]["test/accuracy"] <= 1 and [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [6]
    assert read_jsonl(out / "allocation.jsonl"), "ranks never moved"
    # the new 10-way head (Table 10's EuroSAT classes) is trained and exported
    assert load_file(out / "peft" / "adapter_model.safetensors")["base_model.model.classifier.weight"].shape == (10, 32)
    if method == "flexlora":
        from peft import PeftModel

        import flexlora

        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        native = AutoModelForImageClassification.from_pretrained(tiny_vit_dir, num_labels=10)
        flexlora.load_adapters(native, out / "adapter")
        exported = PeftModel.from_pretrained(
            AutoModelForImageClassification.from_pretrained(tiny_vit_dir, num_labels=10), out / "peft"
        )
        with torch.no_grad():
            torch.testing.assert_close(
                exported.eval()(pixel_values=pixels).logits,
                native.eval()(pixel_values=pixels).logits,
                atol=1e-5,
                rtol=1e-4,
            )


def test_protocol_and_unknown_task_are_checked(tmp_path, tiny_vit_dir, eurosat_root):
    from flexlora.recipe_kit.run_config import ConfigError

    recipe = _load_recipe()
    config = _config_file(tmp_path, tiny_vit_dir, eurosat_root)
    with pytest.raises(vtab.DataError, match=r"eurosat/train800: neither the folder"):
        recipe.main(["--config", str(config), "data.protocol=tuning"])
    with pytest.raises(ConfigError, match="data.task 'mnist' is not a VTAB-1k task"):
        recipe.main(["--config", str(config), "data.task=mnist"])
    with pytest.raises(ConfigError, match="data.hub_dataset is empty: source=hub needs"):
        recipe.main(["--config", str(config), "data.source=hub"])


def test_shipped_config_follows_table_11():
    from flexlora.recipe_kit.run_config import load_config

    recipe = _load_recipe()
    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "vtab" / "vit_b16_in21k.yaml"
    assert "recipes/vit_vtab.py \\\n#     --config recipes/configs/vtab/vit_b16_in21k.yaml" in path.read_text()
    c = load_config(recipe.RecipeConfig, path)
    a, t = c.adapter, c.train
    # Table 11: AdamW, batch 32, lr 1e-3, 100 epochs, b 4, T_warmup 500, T_final 500, Delta_T 100
    assert (t.batch_size, t.lr, t.epochs, a.b0, a.t_warmup, a.t_final, a.delta_t) == (32, 1e-3, 100, 4, 500, 500, 100)
    assert c.model.path == "google/vit-base-patch16-224-in21k" and c.data.protocol == "final"
    assert a.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    assert a.modules_to_save == ["classifier"]
