"""4-bit base weights (QLoRA-style) with bitsandbytes' Linear4bit, which runs on CPU (its pure-PyTorch / CPU backend)
as on CUDA: FlexLoRA reads a packed layer by its features, refuses base layers it cannot adapt exactly, merges only by
an explicit dequantization; the commonsense recipe trains, resumes and exports all three methods on an nf4 base."""

from __future__ import annotations

import shutil
from collections import OrderedDict
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from accelerate.utils import DistributedType
from test_recipe_cr import TARGETS, _read_jsonl, run_recipe
from tiny_models import build_tiny_model_dir

import flexlora
from flexlora import FlexLoRAConfig


def packed_linear(d_in: int, d_out: int) -> bnb.nn.Linear4bit:
    """An nf4 Linear4bit holding a seeded dense layer's weight; its storage is [d_in * d_out / 2, 1] bytes."""
    torch.manual_seed(0)
    quantized = bnb.nn.Linear4bit(d_in, d_out, compute_dtype=torch.float32, quant_type="nf4")
    quantized.load_state_dict(nn.Linear(d_in, d_out).state_dict())
    return quantized.to("cpu")  # Params4bit quantizes when it is moved to its device


def dequantized(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def adapted(d_in: int = 128, d_out: int = 64):
    """A packed layer named ``proj`` with a FlexLoRA adapter whose lambda is non-zero, and an input that needs grad
    (training-mode forward: no inference-only repacking by bitsandbytes)."""
    holder = nn.Sequential(OrderedDict(proj=packed_linear(d_in, d_out)))
    adapters = flexlora.inject(holder, FlexLoRAConfig(target_modules=["proj"], r=2, lora_alpha=4))
    with torch.no_grad():
        adapters.layers["proj"].lora_lambda.copy_(torch.tensor([0.5, -1.0, 3.0]))  # slot 2 inactive
    return holder, adapters, torch.randn(3, d_in, requires_grad=True)


def test_a_packed_4bit_layer_is_read_by_its_features_not_its_storage():
    holder, adapters, x = adapted()
    base, layer = holder.proj.base_layer, adapters.layers["proj"]
    assert tuple(base.weight.shape) == (128 * 64 // 2, 1) and base.weight.dtype == torch.uint8  # packed storage
    assert (layer.d_in, layer.d_out) == (128, 64)
    assert layer.lora_P.shape == (64, 3) and layer.lora_Q.shape == (3, 128)
    assert {p.dtype for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)} == {torch.float32}
    assert not base.weight.requires_grad
    output = holder.proj.train()(x)
    torch.testing.assert_close(output, x @ (dequantized(base) + layer.delta_weight()).T + base.bias)
    output.sum().backward()
    assert all(p.grad is not None for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)) and base.weight.grad is None


def test_adapters_stay_float32_on_a_base_computing_in_bfloat16():
    """QLoRA's layout: the 4-bit base computes in bf16, the adapters train in fp32 (adapter_dtype's default)."""
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    holder = nn.Sequential(OrderedDict(proj=base))
    adapters = flexlora.inject(holder, FlexLoRAConfig(target_modules=["proj"], r=2, lora_alpha=4))
    layer = adapters.layers["proj"]
    factors = (layer.lora_P, layer.lora_lambda, layer.lora_Q)
    assert {p.dtype for p in factors} == {torch.float32}
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([30.0, -60.0, 0.0]))  # large enough for Delta W to show in bf16
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    output = holder.proj.train()(x)
    assert output.dtype == torch.bfloat16  # the layer answers in the activations' dtype
    expected = x.float() @ (dequantized(base).float() + layer.delta_weight()).T + base.bias.float()
    torch.testing.assert_close(output.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 activations and base matmul
    output.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in factors[:2])


def test_inject_refuses_base_layers_it_cannot_adapt_exactly_naming_their_type():
    int8 = nn.Sequential(OrderedDict(proj=bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False).to("cpu")))
    with pytest.raises(ValueError, match=r"proj \(bitsandbytes.nn.modules.Linear8bitLt, weight Int8Params torch.int8"):
        flexlora.inject(int8, FlexLoRAConfig(target_modules=["proj"], r=2))
    fp8 = nn.Sequential(OrderedDict(proj=nn.Linear(32, 16)))
    fp8.proj.weight = nn.Parameter(fp8.proj.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"proj \(torch.nn.modules.linear.Linear, weight Parameter torch.float8_e4m3"):
        flexlora.inject(fp8, FlexLoRAConfig(target_modules=["proj"], r=2))


def test_merge_on_a_4bit_base_dequantizes_only_to_a_stated_dtype():
    holder, adapters, x = adapted()
    base, layer = holder.proj.base_layer, adapters.layers["proj"]
    expected = holder.proj.train()(x).detach()
    merged_weight = dequantized(base) + layer.delta_weight().detach()
    with pytest.raises(ValueError, match=r"merge_and_unload: proj has a 4-bit base.*dequantize_to="):
        adapters.merge_and_unload()
    assert isinstance(holder.proj, flexlora.layer.FlexLoRALayer)  # refused before anything changed
    adapters.merge_and_unload(dequantize_to=torch.float32)
    merged = holder.proj
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged.weight, merged_weight)
    torch.testing.assert_close(merged(x), expected)


def test_merge_refuses_a_layer_bitsandbytes_repacked_for_cpu_inference():
    holder, adapters, x = adapted()
    with torch.no_grad():  # eval mode without grad: on AVX512-BF16 CPUs bitsandbytes repacks the weight in place
        holder.eval()(x.detach())
    if not getattr(holder.proj.base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes kept its standard 4-bit layout")
    with pytest.raises(ValueError, match="repacked"):
        adapters.merge_and_unload(dequantize_to=torch.float32)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def recipe():
    from recipes import llama3_cr

    return llama3_cr


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Training-mode logits (dropout is off in these runs): bitsandbytes repacks its weights for eval-mode CPU
    inference, which needs in_features % 64 == 0, and the tiny model's are 32."""
    with torch.no_grad():
        return model.train()(input_ids=tokens).logits


@pytest.mark.parametrize("method", ["flexlora", "lora", "adalora"])
def test_recipe_on_an_nf4_base_trains_resumes_and_exports(
    recipe, tiny_model_dir, tmp_path, monkeypatch, capsys, method
):
    from peft import PeftModel
    from safetensors.torch import load_file

    from flexlora.recipe_kit.models import load_causal_lm
    from flexlora.recipe_kit.sections import ModelConfig

    loaded = []

    def load_and_keep(*args, **kwargs):
        model, tokenizer = load_causal_lm(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(recipe, "load_causal_lm", load_and_keep)
    # scoring runs eval-mode inference, which bitsandbytes' CPU path cannot do at the tiny model's widths (see _logits)
    settings = {"method": method, "model.quantization": "nf4", "adapter.lora_dropout": 0.0, "eval.enabled": "false"}
    out = run_recipe(recipe, tiny_model_dir, tmp_path / method, **settings)
    model = loaded[-1]
    targets = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    assert len(targets) == 10 and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in targets)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    first_log = _read_jsonl(out / "train_log.jsonl")
    first_export = load_file(out / "peft" / "adapter_model.safetensors")

    # The PEFT export, on a freshly loaded nf4 base, is the trained model.
    tokens = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    base, _ = load_causal_lm(ModelConfig(path=str(tiny_model_dir), quantization="nf4"), torch.device("cpu"))
    exported = PeftModel.from_pretrained(base, str(out / "peft"))
    torch.testing.assert_close(_logits(exported, tokens), _logits(model, tokens), rtol=1e-4, atol=1e-5)

    # Killed after step 3: the rerun resumes from that checkpoint to the same losses and the same export.
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    for name in ("adapter", "peft"):
        shutil.rmtree(out / name, ignore_errors=True)
    capsys.readouterr()
    run_recipe(recipe, tiny_model_dir, out, **settings)
    assert "step_00000003: step 3" in capsys.readouterr().out  # the recipe logs to stdout
    resumed_log = _read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first_log, resumed_log):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6, abs=1e-7), after["step"]
    for key, tensor in load_file(out / "peft" / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, first_export[key], rtol=1e-5, atol=1e-6)


def test_random_init_builds_an_nf4_base_too(tiny_model_dir):
    from flexlora.recipe_kit.models import load_causal_lm
    from flexlora.recipe_kit.sections import ModelConfig

    model, _ = load_causal_lm(
        ModelConfig(path=str(tiny_model_dir), init="random", quantization="nf4"), torch.device("cpu")
    )
    linear = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linear.pop("lm_head") is nn.Linear and set(linear.values()) == {bnb.nn.Linear4bit}
    assert torch.isfinite(_logits(model, torch.randint(0, 400, (1, 8)))).all()


def test_quantization_errors_are_one_line_config_errors_naming_the_setting(monkeypatch):
    import importlib.util

    from flexlora.recipe_kit.models import load_classifier, quantization_config
    from flexlora.recipe_kit.run_config import ConfigError
    from flexlora.recipe_kit.sections import ModelConfig
    from flexlora.recipe_kit.train_setup import refuse_unsupported_engine

    with pytest.raises(ValueError, match="quantization must be one of none, nf4; got 'int4'"):
        ModelConfig(quantization="int4")
    nf4 = ModelConfig(quantization="nf4")
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="model.quantization=nf4 cannot run under FSDP2"):
        refuse_unsupported_engine(SimpleNamespace(method="flexlora", model=nf4), fsdp2)
    with pytest.raises(ConfigError, match="model.quantization is for causal LMs"):
        load_classifier(None, nf4, torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match="model.quantization=nf4 needs bitsandbytes"):
        quantization_config(nf4, torch.float32)
