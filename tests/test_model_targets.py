"""What inject and the PEFT baselines adapt, and what they refuse before changing the model: target names given as a
plain word, regexes that match only last names, ranks a matrix cannot hold, models PEFT has already wrapped."""

from __future__ import annotations

import pytest
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model

import flexlora
from flexlora import FlexLoRAConfig
from flexlora.config import InvalidConfigError
from flexlora.errors import ModelMismatchError, UserError
from flexlora.recipe_kit.data import DataError
from flexlora.recipe_kit.methods import build_method
from flexlora.recipe_kit.run_config import ConfigError

Q_PROJ = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_plain_word_is_one_module_name_for_every_method():
    adapters = flexlora.inject(make_tiny_llama(), FlexLoRAConfig(target_modules="q_proj", r=2))
    assert sorted(adapters.layers) == Q_PROJ
    for method in ("lora", "adalora"):
        config = FlexLoRAConfig(target_modules="q_proj", r=2, t_warmup=1, t_final=1)
        assert sorted(build_method(method, make_tiny_llama(), config, 10).ranks()) == Q_PROJ


def test_a_regex_of_last_names_says_how_to_fix_it_and_does_not_list_them_as_available():
    with pytest.raises(ModelMismatchError) as raised:
        flexlora.inject(make_tiny_llama(), FlexLoRAConfig(target_modules="q_proj|v_proj", r=2))
    message = str(raised.value)
    assert raised.value.fields == ("target_modules",)
    assert "must match the whole dotted name" in message and "give them as a list" in message
    available = message.rpartition("its linear layers are named ")[2]
    assert "'q_proj'" not in available and "'v_proj'" not in available and "'k_proj'" in available


@pytest.mark.parametrize("method, rank_text", [("lora", "r=40"), ("adalora", "max_rank=60"), ("flexlora", "max_rank")])
def test_every_method_refuses_a_rank_the_matrices_cannot_hold(method, rank_text):
    """The same budget for the three: none may allocate more directions than min(d_out, d_in) of a target."""
    model = make_tiny_llama()
    before = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ModelMismatchError, match=rf"{rank_text}.* is larger than min\(d_out, d_in\)") as raised:
        build_method(method, model, FlexLoRAConfig(target_modules=["q_proj", "k_proj"], r=40, t_warmup=1), 10)
    assert "r" in raised.value.fields
    assert [(name, type(m)) for name, m in model.named_modules()] == before  # refused before any change


def test_lora_takes_the_largest_rank_that_fits():
    method = build_method("lora", make_tiny_llama(), FlexLoRAConfig(target_modules=["k_proj"], r=16), 10)
    assert set(method.ranks().values()) == {16}  # k_proj is 16 x 32


@pytest.mark.parametrize("method", ["flexlora", "lora", "adalora"])
def test_a_model_peft_already_wrapped_is_refused_plainly(method):
    wrapped = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    config = FlexLoRAConfig(target_modules=["v_proj"], r=2, t_warmup=1)
    for model in (wrapped, wrapped.base_model.model):  # the PeftModel, and the model inside it holding LoRA layers
        with pytest.raises(ModelMismatchError, match="already adapted by PEFT .*merge_and_unload"):
            build_method(method, model, config, 10)


def test_injecting_twice_is_refused_and_unload_restores_the_model():
    model = make_tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # a choice inject must give back
    adapters = flexlora.inject(model, FlexLoRAConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ModelMismatchError, match="already adapted by FlexLoRA"):
        flexlora.inject(model, FlexLoRAConfig(target_modules=["v_proj"], r=2))
    adapters.unload()
    assert not any(isinstance(m, flexlora.FlexLoRALayer) for m in model.modules())
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    assert not model._forward_hooks and not model._forward_pre_hooks
    flexlora.inject(model, FlexLoRAConfig(target_modules=["v_proj"], r=2))


def test_b0_the_matrices_cannot_honour_is_a_user_error_naming_b0():
    adapters = flexlora.inject(make_tiny_llama(), FlexLoRAConfig(target_modules=["q_proj"], r=2, b0=2, total_steps=9))
    with pytest.raises(UserError, match="b0=2 is more than half the N=2") as raised:
        flexlora.RankAllocator(adapters)
    assert raised.value.fields == ("b0",)


def test_library_user_errors_share_one_base():
    assert all(issubclass(cls, UserError) for cls in (InvalidConfigError, DataError, ConfigError))
    with pytest.raises(UserError):
        FlexLoRAConfig(r=0)
