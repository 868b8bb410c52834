"""data.packing: padding-free micro-batches give the padded run's loss, per-row losses and gradients."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexlora.recipe_kit.data.commonsense import DataConfig
from flexlora.recipe_kit.data.packing import PackedCollator, block_causal_mask, packed_collator_for

REPO = Path(__file__).resolve().parents[1]

LENGTHS = (5, 11, 3, 8)
PROMPTS = (2, 6, 1, 3)  # prompt tokens per row: labels -100 there


def tiny_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float().eval()


def rows():
    generator = torch.Generator().manual_seed(3)
    out = []
    for length, prompt in zip(LENGTHS, PROMPTS):
        ids = torch.randint(1, 64, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return out


def padded(features, pad_id: int = 0):
    """What DataCollatorForSeq2Seq(padding=True) gives: right padding, mask 0 and label -100 on the padding."""
    width = max(len(f["input_ids"]) for f in features)
    fill = [width - len(f["input_ids"]) for f in features]
    return {
        "input_ids": torch.tensor([f["input_ids"] + [pad_id] * n for f, n in zip(features, fill)]),
        "attention_mask": torch.tensor([f["attention_mask"] + [0] * n for f, n in zip(features, fill)]),
        "labels": torch.tensor([f["labels"] + [-100] * n for f, n in zip(features, fill)]),
    }


def row_losses(logits, labels):
    """Mean next-token cross-entropy of one row over its target tokens."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100)


def test_collator_layout():
    batch = PackedCollator("sdpa")(rows())
    total = sum(LENGTHS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["attention_mask"].shape == (1, 1, total, total) and batch["attention_mask"].dtype == torch.bool
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    assert batch["position_ids"][0, starts].tolist() == [0] * len(LENGTHS)
    assert batch["labels"][0, starts].tolist() == [-100] * len(LENGTHS)
    # the shifted targets are exactly the padded batch's: same tokens, same count
    pad = padded(rows())
    padded_targets = [t for row in pad["labels"][:, 1:].tolist() for t in row if t != -100]
    packed_targets = [t for t in batch["labels"][0, 1:].tolist() if t != -100]
    assert packed_targets == padded_targets
    mask = block_causal_mask([2, 3])
    assert mask.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    flash = PackedCollator("flash_attention_2")(rows())
    assert "attention_mask" not in flash and flash["position_ids"].equal(batch["position_ids"])


def _flash_attention_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build counts as absent
        return False
    return True


# Every implementation packing allows. On a GPU (bench/gpu_check.sh runs this test there) sdpa and flash-attention
# run in bf16: the padded and packed kernels then round differently, while a row seeing another moves logits by ~0.5.
IMPLEMENTATIONS = [
    pytest.param("sdpa", "cpu", torch.float32, 1e-5, id="sdpa-fp32"),
    pytest.param(
        "sdpa",
        "cuda",
        torch.bfloat16,
        5e-2,
        id="sdpa-bf16-cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
    pytest.param(
        "flash_attention_2",
        "cuda",
        torch.bfloat16,
        5e-2,
        id="flash_attention_2-bf16",
        marks=pytest.mark.skipif(not _flash_attention_usable(), reason="needs a CUDA GPU and flash_attn"),
    ),
]


@pytest.mark.parametrize("attn, device, dtype, tolerance", IMPLEMENTATIONS)
def test_packed_matches_padded_loss_rows_and_gradients(attn, device, dtype, tolerance):
    model = tiny_llama(attn).to(device=device, dtype=dtype)
    features = rows()

    model.zero_grad()
    pad = {key: value.to(device) for key, value in padded(features).items()}
    out_pad = model(**pad)
    out_pad.loss.backward()
    grads_pad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    packed = {
        key: value.to(device) for key, value in PackedCollator(model.config._attn_implementation)(features).items()
    }
    out_packed = model(**packed)
    out_packed.loss.backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert abs(out_pad.loss.item() - out_packed.loss.item()) <= tolerance, (out_pad.loss.item(), out_packed.loss.item())
    start = 0
    for i, length in enumerate(LENGTHS):
        segment = out_packed.logits[0, start : start + length]
        row = out_pad.logits[i, :length]
        assert (segment - row).abs().max().item() <= tolerance, f"row {i}: logits differ"
        loss_packed = row_losses(segment, packed["labels"][0, start : start + length])
        loss_pad = row_losses(row, pad["labels"][i, :length])
        assert abs(loss_packed.item() - loss_pad.item()) <= tolerance, (
            f"row {i}: {loss_packed.item()} vs {loss_pad.item()}"
        )
        start += length
    assert grads_pad.keys() == grads_packed.keys() and grads_pad
    for name, grad in grads_pad.items():
        assert (grad - grads_packed[name]).abs().max().item() <= tolerance * max(1.0, grad.abs().max().item()), name


def test_position_ids_alone_would_leak():
    """Guard on the premise: without the block mask the second row sees the first (so the mask is needed)."""
    model = tiny_llama("sdpa")
    packed = PackedCollator("sdpa")(rows())
    with torch.no_grad():
        isolated = model(**packed).logits
        leaky = model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            attention_mask=torch.ones_like(packed["input_ids"]),
        ).logits
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert (isolated[0, second] - leaky[0, second]).abs().max().item() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "flex_attention", "paged|eager", None])
def test_unsupported_attention_is_refused(attn):
    with pytest.raises(ValueError, match="attn_implementation=" + repr(attn).replace("|", r"\|")):
        PackedCollator(attn)


def test_eager_model_is_refused_by_its_config():
    model = tiny_llama("eager")
    with pytest.raises(ValueError, match="'eager'"):
        PackedCollator(model.config._attn_implementation)


def test_data_config_packing_default_auto():
    assert DataConfig().packing == "auto"
    assert DataConfig(packing=True).packing is True and DataConfig(packing=False).packing is False


@pytest.mark.parametrize("value", ["yes", "on", 1, 0, None, "Auto"])
def test_data_config_refuses_other_packing_values(value):
    with pytest.raises(ValueError, match="packing must be true, false or auto, got " + repr(value)):
        DataConfig(packing=value)


@pytest.mark.parametrize("override", ["data.packing=always", "data.packing=1", "data.packing=null"])
def test_recipe_config_refuses_other_packing_values(override):
    from flexlora.recipe_kit.run_config import ConfigError, load_config
    from recipes.llama3_cr import RecipeConfig

    with pytest.raises(ConfigError, match="data.packing"):
        load_config(RecipeConfig, REPO / "recipes" / "configs" / "quickstart.yaml", [override])


@pytest.mark.parametrize(
    "override, expected", [([], "auto"), (["data.packing=true"], True), (["data.packing=false"], False)]
)
def test_recipe_config_packing_values(override, expected):
    from flexlora.recipe_kit.run_config import load_config
    from recipes.llama3_cr import RecipeConfig

    assert (
        load_config(RecipeConfig, REPO / "recipes" / "configs" / "quickstart.yaml", override).data.packing == expected
    )


def test_auto_packs_where_exact_and_pads_elsewhere():
    assert "attention_mask" in packed_collator_for("auto", "sdpa")(rows())
    assert "attention_mask" not in packed_collator_for("auto", "flash_attention_2")(rows())
    for attn in ("eager", "flex_attention", None):
        assert packed_collator_for("auto", attn) is None, attn  # the default never fails on such a model
    assert packed_collator_for(False, "sdpa") is None
    assert isinstance(packed_collator_for(True, "sdpa"), PackedCollator)


def test_explicit_packing_under_eager_is_refused():
    with pytest.raises(ValueError, match="data.packing=true is not supported with attn_implementation='eager'"):
        packed_collator_for(True, "eager")
    with pytest.raises(ValueError, match="data.packing must be true, false or auto, got 'yes'"):
        packed_collator_for("yes", "sdpa")


def test_bench_smoke_writes_the_report(tmp_path):
    """bench/packing.py end to end on a tiny random Llama and generated rows (timings are not asserted)."""
    from bench.packing import main

    threads = torch.get_num_threads()
    try:
        main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the benchmark runs on one thread; the other tests do not
    text = (tmp_path / "packing.md").read_text()
    record = json.loads((tmp_path / "packing.json").read_text())
    for header in (
        "| setting | config | rows | micro-batch |",
        "| setting | timed micro-batches | clock |",
        "## Verdict",
    ):
        assert header in text, header
    assert set(record["settings"]) == {"quickstart", "llm_adapters"}
    for setting in record["settings"].values():
        assert 0 < setting["padding"]["padding_fraction"] < 1
        assert setting["padding"]["real_tokens"] < setting["padding"]["padded_tokens"]
        assert setting["agreement"]["abs_difference"] <= 1e-5
        for clock in ("cpu", "wall"):
            timing = setting["timing"][clock]
            assert timing["ratio_q25"] <= timing["ratio_median"] <= timing["ratio_q75"]
            assert timing["padded_tokens_per_s"] > 0 and timing["packed_tokens_per_s"] > 0
