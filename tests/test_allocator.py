import json

import pytest
import torch
from conftest import TARGETS, make_tiny_llama

import flexlora
from flexlora import FlexLoRAConfig, RankAllocator


def setup(tokens, steps=3, **changes):
    """A tiny Llama trained a few steps (so lambda is non-zero), its adapters, allocator and optimizer."""
    model = make_tiny_llama()
    values = dict(target_modules=TARGETS, r=4, lora_alpha=8, b0=2, t_warmup=10, t_final=0, delta_t=5, total_steps=100)
    values.update(changes)
    adapters = flexlora.inject(model, FlexLoRAConfig(**values))
    allocator = RankAllocator(adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, adapters, allocator, optimizer


def test_flex_step_moves_ranks_and_conserves_the_total(tokens):
    model, adapters, allocator, optimizer = setup(tokens)
    total = adapters.total_active_rank()
    assert allocator.step(9, optimizer) == []  # before t_warmup
    changes = allocator.step(10, optimizer)
    assert [c.action for c in changes] == ["prune", "prune", "expand", "expand"]
    assert adapters.total_active_rank() == total
    assert not {c.module for c in changes if c.action == "prune"} & {c.module for c in changes if c.action == "expand"}
    for change in changes:
        assert change.rank_after == change.rank_before + (1 if change.action == "expand" else -1)
        assert adapters.layers[change.module].rank_mask[change.slot] == (change.action == "expand")
    # the pruned directions were the smallest |lambda| of the least important matrices
    scores = {c.module: c.score for c in changes}
    pruned = [c.score for c in changes if c.action == "prune"]
    expanded = [c.score for c in changes if c.action == "expand"]
    assert max(pruned) <= min(expanded) and len(scores) == 4


def test_zero_impact_expansion_leaves_the_output_bit_identical(tokens):
    model, adapters, allocator, optimizer = setup(tokens, mode="expand_only")
    model.eval()
    before = model(tokens).logits
    changes = allocator.step(10, optimizer)
    assert changes and all(c.action == "expand" for c in changes)
    assert torch.equal(model(tokens).logits, before)
    for change in changes:
        layer = adapters.layers[change.module]
        assert layer.lora_lambda[change.slot] == 0
        assert layer.lora_P[:, change.slot].norm() > 0 and layer.lora_Q[change.slot].norm() > 0


def test_small_init_does_change_the_output(tokens):
    model, adapters, allocator, optimizer = setup(tokens, mode="expand_only", expand_init="small")
    model.eval()
    before = model(tokens).logits
    allocator.step(10, optimizer)
    assert not torch.equal(model(tokens).logits, before)


@pytest.mark.parametrize("kind", ["orthogonal", "small", "zero"])
def test_expansion_inits(tokens, kind):
    model, adapters, allocator, optimizer = setup(tokens, mode="expand_only", expand_init=kind)
    masks_before = {n: layer.rank_mask.clone() for n, layer in adapters.layers.items()}
    changes = allocator.step(10, optimizer)
    for change in changes:
        layer = adapters.layers[change.module]
        p, q = layer.lora_P[:, change.slot], layer.lora_Q[change.slot]
        if kind == "zero":
            assert p.abs().max() == 0 and q.abs().max() == 0 and layer.lora_lambda[change.slot] == 0
            continue
        active = masks_before[change.module] > 0
        assert p.norm().item() == pytest.approx(1.0, abs=1e-5) and q.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert (layer.lora_P[:, active].T @ p).abs().max() < 1e-5
        assert (layer.lora_Q[active] @ q).abs().max() < 1e-5
        assert layer.lora_lambda[change.slot].item() == pytest.approx(1e-3 if kind == "small" else 0.0)


def test_optimizer_state_reset_only_on_touched_slots_and_lr_schedule_continues(tokens):
    model, adapters, allocator, optimizer = setup(tokens)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        scheduler.step()
    lr_before = optimizer.param_groups[0]["lr"]
    state_before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.state}
    changes = allocator.step(10, optimizer)
    touched = {(c.module, c.slot) for c in changes}
    assert optimizer.param_groups[0]["lr"] == lr_before
    for name, layer in adapters.layers.items():
        for attr, slot_dim in (("lora_P", 1), ("lora_lambda", 0), ("lora_Q", 0)):
            param = getattr(layer, attr)
            for key in ("exp_avg", "exp_avg_sq"):
                before, after = state_before[param][key], optimizer.state[param][key]
                for slot in range(layer.capacity):
                    old, new = before.select(slot_dim, slot), after.select(slot_dim, slot)
                    if (name, slot) in touched:
                        assert torch.count_nonzero(new) == 0, (name, attr, key, slot)
                    else:
                        assert torch.equal(old, new), (name, attr, key, slot)
            assert torch.equal(optimizer.state[param]["step"], state_before[param]["step"])
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_before * 4 / 5)


def test_prune_only_and_expand_only_change_the_total(tokens):
    _, adapters, allocator, optimizer = setup(tokens, mode="prune_only")
    total = adapters.total_active_rank()
    allocator.step(10, optimizer)
    assert adapters.total_active_rank() == total - 2
    _, adapters, allocator, optimizer = setup(tokens, mode="expand_only")
    allocator.step(10, optimizer)
    assert adapters.total_active_rank() == total + 2


def test_same_inputs_give_the_same_history(tokens, tmp_path):
    histories = []
    for run in range(2):
        model, adapters, allocator, optimizer = setup(tokens)
        for step in range(10, 40):
            model(tokens, labels=tokens).loss.backward()
            optimizer.step()
            allocator.step(step, optimizer)
            optimizer.zero_grad()
        allocator.write_history(tmp_path / f"h{run}.jsonl")
        histories.append((tmp_path / f"h{run}.jsonl").read_text())
    assert histories[0] == histories[1]
    records = [json.loads(line) for line in histories[0].splitlines()]
    assert {r["step"] for r in records} == {10, 15, 20, 25, 30, 35}
    assert set(records[0]) == {"step", "module", "action", "slot", "rank_before", "rank_after", "score", "budget"}


def test_nan_lambda_is_reported_with_the_module_name(tokens):
    _, adapters, allocator, optimizer = setup(tokens)
    with torch.no_grad():
        adapters.layers["model.layers.1.mlp.up_proj"].lora_lambda[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.up_proj"):
        allocator.step(10, optimizer)


def test_sensitivity_metric_needs_gradients_and_moves_ranks(tokens):
    model, adapters, allocator, optimizer = setup(tokens, importance="sensitivity")
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        allocator.step(1, optimizer)
    for step in range(1, 11):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        changes = allocator.step(step, optimizer)
        optimizer.zero_grad()
    assert [c.action for c in changes] == ["prune", "prune", "expand", "expand"]
    assert all(c.score > 0 for c in changes)


def test_allocation_refuses_non_finite_p_or_q_of_a_matrix_it_touches():
    model = make_tiny_llama()
    config = FlexLoRAConfig(target_modules=TARGETS, r=4, b0=1, t_warmup=1, t_final=1, delta_t=1, total_steps=10)
    adapters = flexlora.inject(model, config)
    allocator = RankAllocator(adapters)
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_lambda[:4].copy_(torch.tensor([1.0, 0.5, 0.2, 0.1]))
            layer.lora_Q[0, 0] = float("nan")  # every matrix: whichever the allocation touches is broken
    with pytest.raises(FloatingPointError, match="step 1: P or Q of a matrix this allocation touches holds NaN or inf"):
        allocator.step(1)


def test_orthonormal_start_unit_expansions_and_an_unchanged_output(tokens):
    fresh = make_tiny_llama()
    before = fresh(tokens).logits
    adapters = flexlora.inject(
        fresh, FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8, factor_init="orthonormal")
    )
    assert torch.equal(fresh(tokens).logits, before)  # lambda = 0: the output is the base model's
    for layer in adapters.layers.values():  # every slot, active or not: P^T P = Q Q^T = I, so the regulariser is 0
        eye = torch.eye(layer.capacity)
        assert torch.allclose(layer.lora_P.T @ layer.lora_P, eye, atol=1e-5)
        assert torch.allclose(layer.lora_Q @ layer.lora_Q.T, eye, atol=1e-5)
        assert layer.orth_penalty().item() < 1e-6
    gaussian = flexlora.inject(make_tiny_llama(), FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8))
    assert min(layer.orth_penalty().item() for layer in gaussian.layers.values()) > 0.1

    model, adapters, allocator, optimizer = setup(tokens, mode="expand_only", factor_init="orthonormal")
    model.eval()
    logits = model(tokens).logits
    changes = allocator.step(10, optimizer)
    assert changes and torch.equal(model(tokens).logits, logits)  # still zero-impact
    for change in changes:
        layer = adapters.layers[change.module]
        assert layer.lora_lambda[change.slot] == 0
        assert layer.lora_P[:, change.slot].norm().item() == pytest.approx(1.0, abs=1e-5)
        assert layer.lora_Q[change.slot].norm().item() == pytest.approx(1.0, abs=1e-5)
