"""model.init=random: a model built from a config.json alone, random weights on the training device in its dtype,
with a tokenizer from elsewhere (model.tokenizer) -- the full-size dry run, here at reduced depth and width."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_recipe_cr import tiny_overrides
from tiny_models import build_tiny_tokenizer

from flexlora.recipe_kit.models import load_causal_lm, load_classifier
from flexlora.recipe_kit.run_config import ConfigError, load_config
from flexlora.recipe_kit.sections import ModelConfig

REPO = Path(__file__).resolve().parents[1]
LLAMA3_8B_DIR = REPO / "recipes" / "configs" / "models" / "llama3-8b"
TINY_TOKENIZER = REPO / "recipes" / "configs" / "models" / "tiny-tokenizer"
QUICKSTART = REPO / "recipes" / "configs" / "quickstart.yaml"


def small_llama3_dir(directory: Path, vocab_size: int = 512) -> Path:
    """LLaMA3-8B's config.json at 2 layers and a small width: the folder model.init=random reads, nothing else in it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(LLAMA3_8B_DIR)
    config.update(
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
        )
    )
    config.save_pretrained(directory)
    return directory


def test_shipped_config_is_llama3_8b_with_the_bench_shapes():
    from transformers import AutoConfig, LlamaConfig

    from bench.common import LLAMA3_8B

    shipped = AutoConfig.from_pretrained(LLAMA3_8B_DIR).to_dict()
    bench = LlamaConfig(**LLAMA3_8B, num_hidden_layers=32).to_dict()
    differing = {key for key in set(shipped) | set(bench) if shipped.get(key) != bench.get(key)}
    assert differing == {"architectures", "_name_or_path", "dtype"}  # file metadata, not the architecture


def test_shipped_tokenizer_is_the_tests_tokenizer():
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    built = build_tiny_tokenizer()
    assert shipped.get_vocab() == built.get_vocab() and len(shipped) == 500
    text = "Please choose the correct answer to the question: is the sky green? Answer format: true/false"
    assert shipped(text).input_ids == built(text).input_ids


def test_full_size_llama3_8b_is_built_by_the_same_code_path_on_the_meta_device():
    """The loader the recipe calls, at LLaMA3-8B's full depth and width: shapes and dtype without memory."""
    config = ModelConfig(
        path=str(LLAMA3_8B_DIR),
        init="random",
        tokenizer=str(TINY_TOKENIZER),
        dtype="bfloat16",
        attn_implementation="sdpa",
    )
    model, tokenizer = load_causal_lm(config, torch.device("meta"))
    assert model.config.num_hidden_layers == 32 and len(model.model.layers) == 32
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"meta"}  # made on the device it was asked for
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id


def test_random_weights_follow_train_seed_and_dtype(tmp_path):
    folder = small_llama3_dir(tmp_path / "small")
    config = ModelConfig(path=str(folder), init="random", tokenizer=str(TINY_TOKENIZER), dtype="float32")
    torch.manual_seed(3)
    first, _ = load_causal_lm(config, torch.device("cpu"))
    torch.manual_seed(3)
    second, _ = load_causal_lm(config, torch.device("cpu"))
    assert {p.dtype for p in first.parameters()} == {torch.float32}
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name
    assert first.model.layers[0].self_attn.q_proj.weight.std() > 0


def test_random_init_trains_saves_resumes_and_exports_flexlora(tmp_path):
    """The commonsense recipe with model.init=random on a 2-layer LLaMA3-8B-config folder that holds no weights and
    no tokenizer: FlexLoRA trains with rank moves, checkpoints, resumes from a checkpoint and exports for PEFT."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes import llama3_cr

    folder = small_llama3_dir(tmp_path / "small")
    out = tmp_path / "run"
    overrides = tiny_overrides(
        folder,
        out,
        **{
            "model.init": "random",
            "model.tokenizer": str(TINY_TOKENIZER),
            "eval.enabled": "false",
            "logging.tensorboard": "false",
        },
    )
    llama3_cr.main(["--config", str(QUICKSTART), *overrides])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["rank_changes"] > 0
    assert metrics["tokens_this_run"] > 0 and metrics["tokens_per_second_this_run"] > 0
    assert metrics["median_step_seconds_this_run"] > 0
    first_log = (out / "train_log.jsonl").read_text().splitlines()

    shutil.rmtree(out / "checkpoints" / "step_00000006")  # as if killed after step 3's checkpoint
    llama3_cr.main(["--config", str(QUICKSTART), *overrides])
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == 6 and resumed["tokens_this_run"] < metrics["tokens_this_run"]  # steps 4-6 only
    resumed_log = (out / "train_log.jsonl").read_text().splitlines()
    for before, after in zip(first_log, resumed_log, strict=True):
        assert json.loads(after)["loss"] == pytest.approx(json.loads(before)["loss"], rel=1e-6)

    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    assert PeftModel.from_pretrained(base, str(out / "peft")).peft_config["default"].rank_pattern


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    folder = small_llama3_dir(tmp_path / "small", vocab_size=100)
    config = ModelConfig(path=str(folder), init="random", tokenizer=str(TINY_TOKENIZER), dtype="float32")
    with pytest.raises(
        ConfigError,
        match=r"model.tokenizer .*tiny-tokenizer: 500 tokens do not fit the model's "
        r"vocabulary of 100",
    ):
        load_causal_lm(config, torch.device("cpu"))


def test_a_folder_without_config_or_tokenizer_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="model.path .*empty: no config.json"):
        load_causal_lm(ModelConfig(path=str(empty), init="random", tokenizer=str(TINY_TOKENIZER)), torch.device("cpu"))
    folder = small_llama3_dir(tmp_path / "small")
    with pytest.raises(ConfigError, match="model.path .*small holds no tokenizer: set model.tokenizer"):
        load_causal_lm(ModelConfig(path=str(folder), init="random"), torch.device("cpu"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.init=zeros", "model.init must be one of pretrained, random; got 'zeros'"),
        ("model.init=random", "model.gguf_file must be null under init=random, which reads only the config.json"),
        ("model.tokenizer=''", "model.tokenizer is empty"),
    ],
)
def test_bad_model_settings_name_the_key(override, message):
    from recipes.llama3_cr import RecipeConfig

    with pytest.raises(ConfigError, match=message):
        load_config(RecipeConfig, QUICKSTART, [override])  # quickstart.yaml sets a gguf_file


def test_classifiers_refuse_random_init_and_a_separate_tokenizer():
    from transformers import AutoModelForSequenceClassification

    for config in (ModelConfig(path="unused", init="random"), ModelConfig(path="unused", tokenizer="elsewhere")):
        with pytest.raises(ConfigError, match="are for causal LMs"):
            load_classifier(AutoModelForSequenceClassification, config, torch.device("cpu"), num_labels=2)
