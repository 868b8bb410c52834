import json

import pytest
import torch
from conftest import TARGETS, make_tiny_llama
from peft import PeftModel

import flexlora
from flexlora import FlexLoRAConfig, RankAllocator
from flexlora.errors import AdapterFileError


def trained_adapters(tokens, **changes):
    """Adapters with non-zero lambda and uneven ranks (some pruned to the minimum, some expanded)."""
    model = make_tiny_llama()
    values = dict(target_modules=TARGETS, r=3, min_rank=0, b0=3, t_warmup=2, delta_t=2, total_steps=40, seed=3)
    values.update(changes)
    adapters = flexlora.inject(model, FlexLoRAConfig(**values))
    allocator = RankAllocator(adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(1, 16):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        allocator.step(step, optimizer)
        optimizer.zero_grad()
    model.eval()
    return model, adapters, allocator


def test_save_load_restores_outputs_masks_and_history(tokens, tmp_path):
    model, adapters, allocator = trained_adapters(tokens)
    expected = model(tokens).logits
    flexlora.save_adapters(adapters, tmp_path, allocator.state_dict())
    fresh = make_tiny_llama()
    loaded, allocator_state = flexlora.load_adapters(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(tokens).logits, expected)
    assert loaded.active_ranks() == adapters.active_ranks()
    for name, layer in loaded.layers.items():
        assert torch.equal(layer.rank_mask, adapters.layers[name].rank_mask)
    restored = RankAllocator(loaded)
    restored.load_state_dict(allocator_state)
    assert restored.history == allocator.history
    ranks = json.loads((tmp_path / "rank_state.json").read_text())["ranks"]
    assert ranks == adapters.active_ranks()


def test_load_errors(tmp_path, tokens):
    with pytest.raises(AdapterFileError, match="flexlora_adapter.safetensors"):
        flexlora.load_adapters(make_tiny_llama(), tmp_path)
    _, adapters, _ = trained_adapters(tokens)
    flexlora.save_adapters(adapters, tmp_path)
    with pytest.raises(ValueError, match="matched no module"):
        flexlora.load_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path)


def _snapshot(model: torch.nn.Module) -> tuple:
    """Everything load_adapters could change: module types, parameter values and requires_grad, hooks."""
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
        len(model._forward_hooks) + len(model._forward_pre_hooks),
    )


def _same(before: tuple, after: tuple) -> bool:
    (modules, params, hooks), (modules2, params2, hooks2) = before, after
    return (
        modules == modules2
        and hooks == hooks2
        and params.keys() == params2.keys()
        and all(torch.equal(v, params2[k][0]) and flag == params2[k][1] for k, (v, flag) in params.items())
    )


def _corrupt(tmp_path, change):
    """A saved adapter, then ``change(tensors)`` applied to its safetensors file."""
    from safetensors.torch import load_file, save_file

    _, adapters, _ = trained_adapters(torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1)))
    flexlora.save_adapters(adapters, tmp_path)
    tensors = load_file(tmp_path / "flexlora_adapter.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "flexlora_adapter.safetensors")


def _nan_lambda(tensors):
    tensors["model.layers.1.self_attn.v_proj.lora_lambda"][0] = float("nan")


def _inf_p(tensors):
    tensors["model.layers.0.mlp.down_proj.lora_P"][1, 1] = float("inf")


def _drop_q(tensors):
    del tensors["model.layers.0.self_attn.q_proj.lora_Q"]


def _reshape_p(tensors):
    key = "model.layers.1.mlp.up_proj.lora_P"
    tensors[key] = tensors[key][:, :-1].contiguous()


@pytest.mark.parametrize(
    "change, expected",
    [
        (_nan_lambda, "tensor model.layers.1.self_attn.v_proj.lora_lambda holds non-finite values"),
        (_inf_p, "tensor model.layers.0.mlp.down_proj.lora_P holds non-finite values"),
        (_drop_q, "missing ['model.layers.0.self_attn.q_proj.lora_Q']"),
        (_reshape_p, "model.layers.1.mlp.up_proj.lora_P: saved shape"),
    ],
    ids=["nan", "inf", "missing-tensor", "wrong-shape"],
)
def test_a_refused_adapter_leaves_the_model_exactly_as_it_was(tmp_path, change, expected):
    _corrupt(tmp_path, change)
    model = make_tiny_llama()
    before = _snapshot(model)
    with pytest.raises(AdapterFileError) as raised:
        flexlora.load_adapters(model, tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "flexlora_adapter.safetensors") in message and expected in message, message
    assert _same(before, _snapshot(model))
    flexlora.inject(model, FlexLoRAConfig(target_modules=["q_proj"], r=2))  # nothing left behind: injectable again


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("flexlora_adapter.safetensors", b"not a safetensors file", "cannot be read"),
        ("flexlora_config.json", b"{broken", "cannot be read"),
        ("flexlora_config.json", b'{"r": 0, "target_modules": ["q_proj"]}', "r must be an integer >= 1"),
        ("rank_state.json", b"[]", "cannot be read"),
    ],
    ids=["tensors", "config-json", "config-values", "rank-state"],
)
def test_an_unreadable_adapter_file_is_named_and_changes_nothing(tmp_path, name, content, expected):
    _corrupt(tmp_path, lambda tensors: None)
    (tmp_path / name).write_bytes(content)
    model = make_tiny_llama()
    before = _snapshot(model)
    with pytest.raises(AdapterFileError) as raised:
        flexlora.load_adapters(model, tmp_path)
    assert str(tmp_path / name) in str(raised.value) and expected in str(raised.value), str(raised.value)
    assert _same(before, _snapshot(model))


def test_an_adapter_for_another_model_names_its_config_file(tmp_path):
    _corrupt(tmp_path, lambda tensors: None)
    with pytest.raises(AdapterFileError, match="flexlora_config.json: target_modules .* matched no module"):
        flexlora.load_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path)


def test_peft_export_gives_identical_logits(tokens, tmp_path):
    model, adapters, _ = trained_adapters(tokens)
    ranks = adapters.active_ranks()
    assert len(set(ranks.values())) > 1 and 0 in ranks.values()  # uneven, and one module pruned away
    expected = model(tokens).logits
    rank_pattern = flexlora.export_peft(adapters, tmp_path)
    assert rank_pattern == {name: r for name, r in ranks.items() if r > 0}
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-5, rtol=0)
    for name, rank in rank_pattern.items():
        lora_a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
        assert lora_a.shape[0] == rank
    dropped = [name for name, r in ranks.items() if r == 0]
    assert not hasattr(peft_model.base_model.model.get_submodule(dropped[0]), "lora_A")


def test_merge_and_unload_equals_the_adapted_model(tokens):
    model, adapters, _ = trained_adapters(tokens)
    expected = model(tokens).logits
    merged = adapters.merge_and_unload()
    assert not any(isinstance(m, flexlora.FlexLoRALayer) for m in merged.modules())
    torch.testing.assert_close(merged(tokens).logits, expected, atol=1e-5, rtol=0)
