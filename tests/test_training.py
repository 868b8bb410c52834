"""Short real training runs of a tiny Llama: the loss falls and ranks move, in a plain loop and in Trainer."""

import torch
from conftest import TARGETS, make_tiny_llama
from transformers import Trainer, TrainingArguments

import flexlora
from flexlora import FlexLoRAConfig, RankAllocator
from flexlora.trainer import FlexLoRACallback


def batch():
    # a learnable pattern: each sequence counts upwards from a random start
    starts = torch.randint(0, 40, (16, 1), generator=torch.Generator().manual_seed(0))
    return starts + torch.arange(12)


def test_plain_loop_loss_falls_and_ranks_move():
    model = make_tiny_llama().train()
    config = FlexLoRAConfig(
        target_modules=TARGETS, r=4, lora_alpha=8, b0=2, t_warmup=10, t_final=10, delta_t=5, total_steps=60
    )
    adapters = flexlora.inject(model, config)
    allocator = RankAllocator(adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=60)
    ids = batch()
    total = adapters.total_active_rank()
    initial = {name: layer.rank_mask.clone() for name, layer in adapters.layers.items()}
    losses = []
    for step in range(1, 61):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        allocator.step(step, optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15  # starts at ln(64) = 4.16
    assert allocator.history and {c.action for c in allocator.history} == {"prune", "expand"}
    assert all(10 <= c.step <= 50 for c in allocator.history)
    assert adapters.total_active_rank() == total
    assert any(not torch.equal(initial[n], layer.rank_mask) for n, layer in adapters.layers.items())


class _Sequences(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = batch()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_runs_the_allocator_out_of_the_box(tmp_path):
    model = make_tiny_llama()
    config = FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8, b0=2, t_warmup=6, t_final=6, delta_t=4)
    adapters = flexlora.inject(model, config)
    allocator = RankAllocator(adapters)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
        lr_scheduler_type="linear",
        logging_steps=5,
        save_strategy="steps",
        save_steps=30,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Sequences(), callbacks=[FlexLoRACallback(allocator)])
    trainer.train()
    assert config.total_steps == 30
    # optimizer steps, not micro-batches; from step 18 on the cubic schedule gives b(t) = 0
    assert {c.step for c in allocator.history} == {6, 10, 14}
    assert {c.action for c in allocator.history} == {"prune", "expand"}
    assert adapters.loss_scale_tracker.current.value is not None  # the Trainer's loss carried the regulariser's anchor
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert "orth_penalty" in logs[0] and logs[0]["active_rank_total"] == adapters.total_active_rank()
    saved = tmp_path / "checkpoint-30" / "flexlora"
    reloaded, state = flexlora.load_adapters(make_tiny_llama(), saved)
    assert reloaded.active_ranks() == adapters.active_ranks() and len(state["history"]) == len(allocator.history)


def test_heatmap_labels_name_the_matrices_of_llama_bert_deberta_and_vit():
    from flexlora.recipe_kit.records import short_module_name

    names = {
        "model.layers.3.self_attn.q_proj": "L3.Q",
        "model.layers.3.mlp.down_proj": "L3.Down",
        "bert.encoder.layer.2.attention.self.key": "L2.K",
        "bert.encoder.layer.2.attention.output.dense": "L2.A",
        "bert.encoder.layer.2.intermediate.dense": "L2.I",
        "bert.encoder.layer.2.output.dense": "L2.O",
        "deberta.encoder.layer.11.attention.self.value_proj": "L11.V",
        "vit.encoder.layer.0.attention.o_proj": "L0.A",
        "vit.encoder.layer.0.mlp.fc2": "L0.O",
        "classifier.dense": "dense",
    }
    assert {name: short_module_name(name) for name in names} == names


def test_param_groups_give_lambda_its_own_learning_rate():
    import pytest

    model = make_tiny_llama().train()
    flexlora.inject(model, FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    single = flexlora.param_groups(model, 1e-3)
    assert [group["lr"] for group in single] == [1e-3, 1e-3]
    boosted = flexlora.param_groups(model, 1e-3, lambda_lr_multiplier=10.0)
    assert [group["lr"] for group in boosted] == [1e-3, pytest.approx(1e-2)]
    assert {id(p) for group in boosted for p in group["params"]} == trainable  # every trainable parameter, once
    lambdas = {id(layer.lora_lambda) for layer in model.modules() if hasattr(layer, "lora_lambda")}
    assert {id(p) for p in boosted[1]["params"]} == lambdas

    def first_step_moves(multiplier: float) -> tuple[float, float]:
        torch.manual_seed(0)
        fresh = make_tiny_llama().train()
        flexlora.inject(fresh, FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8))
        before = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(flexlora.param_groups(fresh, 1e-3, multiplier), weight_decay=0.0)
        ids = batch()
        fresh(ids, labels=ids).loss.backward()
        optimizer.step()
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in fresh.named_parameters() if n in before}
        return (
            max(v for n, v in moved.items() if n.endswith("lora_lambda")),
            max(v for n, v in moved.items() if n.endswith("lora_P")),
        )

    lam_1, p_1 = first_step_moves(1.0)
    lam_10, p_10 = first_step_moves(10.0)
    assert lam_10 == pytest.approx(10 * lam_1, rel=1e-3)  # Adam's first step is lr x sign: 10x the lr, 10x the move
    assert p_10 == pytest.approx(p_1, rel=1e-6)
    with pytest.raises(ValueError, match="lambda_lr_multiplier must be a finite number > 0"):
        flexlora.param_groups(model, 1e-3, 0.0)
    plain = make_tiny_llama()
    for param in plain.parameters():
        param.requires_grad_(False)
    plain.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="no trainable FlexLoRA lambda"):
        flexlora.param_groups(plain, 1e-3, 2.0)


def test_auto_lambda_lr_moves_delta_w_at_a_lora_b_pace():
    import math

    import pytest

    from flexlora.optim_state import shape_matched_lambda_multiplier

    # sqrt(d_out / 3) for unit-length factors; divided by the Gaussian factors' lengths init_std^2 sqrt(d_out d_in)
    assert shape_matched_lambda_multiplier(384, 384, "orthonormal", 0.02) == pytest.approx(math.sqrt(128))
    assert shape_matched_lambda_multiplier(384, 384, "gaussian", 0.02) == pytest.approx(math.sqrt(128) / (0.0004 * 384))
    model = make_tiny_llama().train()
    flexlora.inject(model, FlexLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8, factor_init="orthonormal"))
    groups = flexlora.param_groups(model, 1e-3, "auto")
    layers = {id(layer.lora_lambda): layer for layer in model.modules() if hasattr(layer, "lora_lambda")}
    assert sum(len(group["params"]) for group in groups[1:]) == len(layers)
    for group in groups[1:]:  # one group per shape, each at its own multiple
        for param in group["params"]:
            layer = layers[id(param)]
            assert group["lr"] == pytest.approx(1e-3 * math.sqrt(layer.d_out / 3))

    # the claim itself, measured: one Adam step from lambda = 0 moves each matrix's Delta W as far as one step moves a
    # LoRA B of its shape (A at PEFT's kaiming-uniform init); both are sign steps, so the ratio is set by the lengths
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lora_optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    flex_optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    for net, optimizer in ((lora, lora_optimizer), (model, flex_optimizer)):
        ids = batch()
        net(ids, labels=ids).loss.backward()
        optimizer.step()
    lora_moves = {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").norm().item()
        for name, module in lora.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }
    flex_moves = {
        name: module.delta_weight().norm().item()
        for name, module in model.named_modules()
        if hasattr(module, "lora_lambda")
    }
    ratios = [flex_moves[name] / lora_moves[name] for name in flex_moves if name in lora_moves]
    assert len(ratios) == len(flex_moves) and all(0.8 < ratio < 1.25 for ratio in ratios), ratios  # measured 0.92-1.01
