"""The orthogonality regulariser: both forms against autograd, loss scaling and accumulation, and exact parity of a
FlexLoRA layer (allocation off) with PEFT's AdaLoRA layer (masking off) over a training run."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TARGETS, make_tiny_llama

import flexlora
from flexlora import FlexLoRAConfig
from flexlora.layer import FlexLoRALayer
from flexlora.regulariser import orthogonality_penalty


def adapted_llama(**changes):
    model = make_tiny_llama()
    adapters = flexlora.inject(model, FlexLoRAConfig(target_modules=TARGETS, r=4, **changes))
    with torch.no_grad():  # some lambda != 0 so that the task gradient reaches P and Q too
        for layer in adapters.layers.values():
            layer.lora_lambda.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return model.train(), adapters


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_penalty_over_active_directions_only():
    torch.manual_seed(0)
    p, q = torch.randn(10, 5), torch.randn(5, 8)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    pa, qa = p[:, mask > 0], q[mask > 0]
    gram_p, gram_q = pa.T @ pa - torch.eye(3), qa @ qa.T - torch.eye(3)
    torch.testing.assert_close(
        orthogonality_penalty(p, q, mask, "eq2_sum"), gram_p.square().sum() + gram_q.square().sum()
    )
    torch.testing.assert_close(
        orthogonality_penalty(p, q, mask, "mean_norm"), torch.linalg.norm(gram_p) + torch.linalg.norm(gram_q)
    )
    u, _ = torch.linalg.qr(torch.randn(10, 5))
    v, _ = torch.linalg.qr(torch.randn(8, 5))
    assert orthogonality_penalty(u, v.T, torch.ones(5)) < 1e-5


@pytest.mark.parametrize("form", ["mean_norm", "eq2_sum"])
def test_injected_gradient_equals_the_penalty_added_to_the_loss(tokens, form):
    model, adapters = adapted_llama(orth_reg_weight=0.3, orth_reg=form)
    next(iter(adapters.layers.values())).rank_mask[1] = 0.0  # an inactive slot among active ones
    model(tokens, labels=tokens).loss.backward()
    injected = trainable_grads(model)
    value = adapters.orth_penalty()

    for layer in adapters.layers.values():
        layer.orth_reg_weight = 0.0  # the same model, penalty off, and its term added to the loss by hand
    model.zero_grad()
    n = len(adapters.layers)
    terms = [
        orthogonality_penalty(layer.lora_P, layer.lora_Q, layer.rank_mask, form) for layer in adapters.layers.values()
    ]
    penalty = torch.stack(terms).sum() / (2 * n if form == "mean_norm" else 1)
    (model(tokens, labels=tokens).loss + 0.3 * penalty).backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(injected[name], grad, msg=name)
    assert value == pytest.approx(penalty.item(), rel=1e-6)
    layer = next(iter(adapters.layers.values()))
    assert injected[next(n for n in injected if n.endswith("lora_P"))][:, 1].abs().max() == 0  # inactive: no gradient
    assert layer.lora_P.grad is not None


@pytest.mark.parametrize("form", ["mean_norm", "eq2_sum"])
@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
def test_gradient_follows_loss_scaling(tokens, form, checkpointing):
    """An fp16-style scaled loss (x 1024, gradients unscaled afterwards) gives the unscaled run's gradients."""
    results = []
    for scale in (1.0, 1024.0):
        model, _ = adapted_llama(orth_reg_weight=0.5, orth_reg=form)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
        (model(tokens, labels=tokens).loss * scale).backward()
        results.append({n: g / scale for n, g in trainable_grads(model).items()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], msg=name)


def test_gradient_accumulation_counts_the_penalty_once_per_optimizer_step(tokens):
    model, _ = adapted_llama(orth_reg_weight=0.5)
    model(tokens, labels=tokens).loss.backward()
    whole = trainable_grads(model)
    model.zero_grad()
    for _ in range(2):  # the same batch twice, each loss divided by 2 as accumulate-then-step loops do
        (model(tokens, labels=tokens).loss / 2).backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, whole[name], msg=name)


def test_exactly_orthonormal_factors_get_zero_gradient_not_nan():
    """||G||_F = 0 is where the plain norm is not differentiable: its gradient is taken as 0 there, never 0 / 0."""
    base = nn.Linear(8, 6)
    layer = FlexLoRALayer(base, FlexLoRAConfig(target_modules=["x"], r=3, max_rank=3, orth_reg_weight=1.0), 0).train()
    with torch.no_grad():
        layer.lora_P.copy_(torch.eye(6, 3))  # exactly orthonormal columns / rows: G_P = G_Q = 0 in floating point
        layer.lora_Q.copy_(torch.eye(3, 8))
        layer.lora_lambda.zero_()  # the task gradient on P and Q is zero too
    layer.loss_scale_tracker.mark(layer(torch.randn(4, 8)).sum()).backward()
    assert torch.equal(layer.lora_P.grad, torch.zeros(6, 3)) and torch.equal(layer.lora_Q.grad, torch.zeros(3, 8))


def test_unmarked_loss_warns_and_mark_loss_marks_a_loss_computed_outside_the_model(tokens):
    model, adapters = adapted_llama(orth_reg_weight=0.5)
    model(tokens, labels=tokens).loss.backward()
    reference = trainable_grads(model)
    model.zero_grad()
    logits = model(tokens).logits  # no labels: the output has no loss to mark
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    with pytest.warns(UserWarning, match="adapters.mark_loss"):
        (loss * 4).backward(retain_graph=True)
    model.zero_grad()
    (adapters.mark_loss(loss) * 4).backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad / 4, reference[name], msg=name)


# ---- parity with PEFT's AdaLoRA ------------------------------------------------------------------------------------
STEPS, RANK, ALPHA, WEIGHT, LR = 32, 6, 8.0, 0.1, 1e-2


def _batches(micro: int):
    """Four fixed batches in turn, so that the loss falls measurably within the run."""
    generator = torch.Generator().manual_seed(7)
    data = [torch.randint(0, 64, (4, 12), generator=generator) for _ in range(4)]
    return [[data[(step * micro + k) % 4] for k in range(micro)] for step in range(STEPS)]


def _task_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _train(model, step_hook, micro: int, loss_scale: float) -> list[float]:
    """AdamW steps with ``micro`` micro-batches each (losses divided by ``micro``) and a loss scaled by ``loss_scale``
    then unscaled on the gradients, as fp16 GradScaler does; returns each step's task loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    for step, batch in enumerate(_batches(micro), start=1):
        task = 0.0
        for tokens in batch:
            output = model(input_ids=tokens, labels=tokens)
            task += _task_loss(output.logits, tokens).item() / micro
            (output.loss / micro * loss_scale).backward()
        for p in params:
            p.grad.div_(loss_scale)
        optimizer.step()
        step_hook(step)
        optimizer.zero_grad()
        losses.append(task)
    return losses


def _adalora_and_flexlora(orth_reg: str):
    from peft import AdaLoraConfig, get_peft_model

    # task_type matters: a task-less PeftModel calls the base model directly and skips AdaLoRA's regulariser
    ada_model = get_peft_model(
        make_tiny_llama(),
        AdaLoraConfig(
            init_r=RANK,
            target_r=RANK // 2,
            tinit=STEPS,
            tfinal=0,
            deltaT=1,
            total_step=STEPS + 10,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            orth_reg_weight=WEIGHT,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    flex_model = make_tiny_llama()
    # AdaLoRA scales by alpha / (r + 1e-5); FlexLoRA by alpha / r: the alpha below makes the two equal.
    config = FlexLoRAConfig(
        target_modules=TARGETS,
        r=RANK,
        max_rank=RANK,
        lora_alpha=ALPHA * RANK / (RANK + 1e-5),
        orth_reg_weight=WEIGHT,
        orth_reg=orth_reg,
        t_warmup=STEPS,
        t_final=0,
        delta_t=1,
        total_steps=STEPS + 10,
    )
    adapters = flexlora.inject(flex_model, config)
    ada_layers = {n.removeprefix("base_model.model."): m for n, m in ada_model.named_modules() if hasattr(m, "lora_E")}
    assert set(ada_layers) == set(adapters.layers)
    with torch.no_grad():  # AdaLoRA's initial A, E, B become Q, lambda, P
        for name, layer in adapters.layers.items():
            layer.lora_P.copy_(ada_layers[name].lora_B["default"])
            layer.lora_lambda.copy_(ada_layers[name].lora_E["default"][:, 0])
            layer.lora_Q.copy_(ada_layers[name].lora_A["default"])
    return ada_model, ada_layers, flex_model, adapters


@pytest.mark.parametrize(
    "micro, loss_scale", [(1, 1.0), (2, 1.0), (1, 1024.0)], ids=["plain", "accumulation2", "fp16_scale"]
)
def test_flexlora_without_allocation_trains_exactly_like_peft_adalora(micro, loss_scale):
    ada_model, ada_layers, flex_model, adapters = _adalora_and_flexlora("mean_norm")
    allocator = flexlora.RankAllocator(adapters)
    ada_losses = _train(ada_model, ada_model.base_model.update_and_allocate, micro, loss_scale)
    flex_losses = _train(flex_model, lambda step: allocator.step(step, None), micro, loss_scale)

    assert not allocator.history and not ada_model.peft_config["default"].rank_pattern  # no rank moved on either side
    torch.testing.assert_close(torch.tensor(flex_losses), torch.tensor(ada_losses), rtol=0, atol=1e-5)
    assert ada_losses[-1] < ada_losses[0] - 0.05  # it did train
    for name, layer in adapters.layers.items():
        ada = ada_layers[name]
        torch.testing.assert_close(layer.lora_P, ada.lora_B["default"], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(layer.lora_lambda, ada.lora_E["default"][:, 0], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(layer.lora_Q, ada.lora_A["default"], rtol=0, atol=1e-5, msg=name)


def test_eq2_sum_is_not_adalora_regulariser():
    """The parity above is not a tolerance artefact: eq. 2 as printed moves P and Q measurably elsewhere."""
    ada_model, ada_layers, flex_model, adapters = _adalora_and_flexlora("eq2_sum")
    _train(ada_model, ada_model.base_model.update_and_allocate, 1, 1.0)
    _train(flex_model, lambda step: None, 1, 1.0)
    gap = max(
        (layer.lora_P - ada_layers[name].lora_B["default"]).abs().max().item()
        for name, layer in adapters.layers.items()
    )
    assert gap > 1e-3


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_adalora_baseline_trains_with_its_regulariser_with_or_without_a_task_type(tokens, task_type):
    from flexlora.recipe_kit.methods import build_method

    config = FlexLoRAConfig(target_modules=TARGETS, r=4, orth_reg_weight=0.5)
    method = build_method("adalora", make_tiny_llama(), config, 10, task_type=task_type)
    inner = method.model.get_base_model()
    with_regulariser = method.model(input_ids=tokens, labels=tokens).loss
    without = inner(input_ids=tokens, labels=tokens).loss
    assert with_regulariser.item() > without.item() + 0.01
