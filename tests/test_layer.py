import pytest
import torch
import torch.nn as nn
from conftest import TARGETS
from transformers.pytorch_utils import Conv1D

import flexlora
from flexlora import FlexLoRAConfig
from flexlora.errors import ModelMismatchError
from flexlora.layer import FlexLoRALayer


def config(**changes):
    return FlexLoRAConfig(target_modules=TARGETS, r=4, **changes)


def test_inject_shapes_masks_and_freezing(tiny_llama):
    adapters = flexlora.inject(tiny_llama, config())
    assert len(adapters.layers) == 2 * 5
    layer = adapters.layers["model.layers.0.self_attn.k_proj"]
    assert layer.lora_P.shape == (16, 6) and layer.lora_Q.shape == (6, 32) and layer.lora_lambda.shape == (6,)
    assert layer.rank_mask.tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.count_nonzero(layer.lora_lambda) == 0
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_P", "lora_lambda", "lora_Q") for n in trainable)
    count = adapters.parameter_count()
    per_dir = sum(layer.d_in + layer.d_out + 1 for layer in adapters.layers.values())
    assert count.capacity == 6 * per_dir and count.active == 4 * per_dir
    assert count.capacity == sum(p.numel() for p in tiny_llama.parameters() if p.requires_grad)


def test_inject_errors_name_the_problem(tiny_llama):
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        flexlora.inject(tiny_llama, FlexLoRAConfig(target_modules=["qkv"], r=2))
    with pytest.raises(ValueError, match="cannot adapt.*embed_tokens"):
        flexlora.inject(tiny_llama, FlexLoRAConfig(target_modules=["embed_tokens"], r=2))
    with pytest.raises(ValueError, match="modules_to_save"):
        flexlora.inject(tiny_llama, FlexLoRAConfig(target_modules=["q_proj"], r=2, modules_to_save=["classifier"]))
    flexlora.inject(tiny_llama, config())
    with pytest.raises(ModelMismatchError, match="already adapted by FlexLoRA"):
        flexlora.inject(tiny_llama, config())


def test_regex_targets_and_modules_to_save(tiny_llama):
    adapters = flexlora.inject(
        tiny_llama,
        FlexLoRAConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj", r=2, modules_to_save=["lm_head"]),
    )
    assert adapters.names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert tiny_llama.lm_head.weight.requires_grad
    assert adapters.parameter_count().modules_to_save == tiny_llama.lm_head.weight.numel()


def test_fresh_adapter_is_a_no_op(tiny_llama, tokens):
    reference = tiny_llama(tokens).logits
    flexlora.inject(tiny_llama, config())
    assert torch.equal(tiny_llama(tokens).logits, reference)


def test_forward_matches_delta_weight_and_conv1d():
    torch.manual_seed(0)
    for base in (nn.Linear(7, 5), Conv1D(5, 7)):
        layer = FlexLoRALayer(base, FlexLoRAConfig(target_modules=["x"], r=2, lora_alpha=4), module_index=0)
        with torch.no_grad():
            layer.lora_lambda.copy_(torch.tensor([0.5, -1.0, 3.0]))  # slot 2 inactive: must not count
        x = torch.randn(3, 7)
        weight = base.weight + layer.delta_weight()
        expected = x @ weight.T + base.bias if isinstance(base, nn.Linear) else x @ weight + base.bias
        torch.testing.assert_close(layer.eval()(x), expected)
        assert layer.delta_weight().shape == base.weight.shape


def test_penalty_works_with_non_reentrant_checkpointing(tiny_llama, tokens):
    adapters = flexlora.inject(tiny_llama, config(orth_reg_weight=0.5))
    tiny_llama.train()
    tiny_llama(tokens, labels=tokens).loss.backward()
    plain = {n: p.grad.clone() for n, p in tiny_llama.named_parameters() if p.requires_grad}
    tiny_llama.zero_grad()
    tiny_llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_llama(tokens, labels=tokens).loss.backward()
    for name, p in tiny_llama.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain[name], msg=name)
    assert adapters.orth_penalty() > 0


def test_bf16_base_with_fp32_adapter(tokens):
    from conftest import make_tiny_llama

    model = make_tiny_llama().to(torch.bfloat16)
    adapters = flexlora.inject(model, config())
    layer = next(iter(adapters.layers.values()))
    assert layer.lora_P.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_lambda.fill_(0.1)
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert loss.dtype == torch.float32 or loss.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
