import json

import pytest
import torch
from conftest import TARGETS, make_tiny_llama
from peft import PeftModel

import flexlora
from flexlora import FlexLoRAConfig, RankAllocator


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
    with pytest.raises(FileNotFoundError, match="flexlora_adapter.safetensors"):
        flexlora.load_adapters(make_tiny_llama(), tmp_path)
    _, adapters, _ = trained_adapters(tokens)
    flexlora.save_adapters(adapters, tmp_path)
    with pytest.raises(ValueError, match="matched no module"):
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
