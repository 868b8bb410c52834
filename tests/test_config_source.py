"""Where settings and names are defined: each default in one dataclass, a recipe yaml stating only its experiment and
the settings it changes, every config check reporting all of its problems at once with the field each names, and each
closed set of names read from ``flexlora.names`` by the config, the implementations and the README."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml

from flexlora import FlexLoRAConfig, names
from flexlora.config import InvalidConfigError
from flexlora.importance import SPECTRAL_METRICS, matrix_importance
from flexlora.recipe_kit.run_config import ConfigError, load_config
from flexlora.recipe_kit.startup import RESUMABLE_CHANGES
from flexlora.regulariser import orthogonality_penalty

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))


def recipe_for(path: Path):
    from recipes import deberta_glue, llama3_cr, vit_vtab

    folder = path.parent.name
    return {"glue": deberta_glue, "vtab": vit_vtab}.get(folder, llama3_cr)


def field_defaults(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted key of ``cls`` with a default, its value; sections are walked by type, without building them."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            found |= field_defaults(hints[f.name], key + ".")
        elif f.default_factory is not dataclasses.MISSING:
            found[key] = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            found[key] = f.default
    return found


def flat(values: dict, prefix: str = "") -> dict[str, typing.Any]:
    found = {}
    for key, value in values.items():
        if isinstance(value, dict):
            found |= flat(value, f"{prefix}{key}.")
        else:
            found[prefix + key] = value
    return found


# ---- each default defined once ---------------------------------------------------------------------------------


def repeated_defaults(path: Path) -> list[str]:
    """The keys of ``path`` that repeat their dataclass default although they do not shape training (see the rule in
    flexlora.recipe_kit.sections)."""
    defaults = field_defaults(recipe_for(path).RecipeConfig)
    values = flat(yaml.safe_load(path.read_text()))
    return [
        f"{key}: {value!r}"
        for key, value in values.items()
        if key.startswith(RESUMABLE_CHANGES) and key in defaults and value == defaults[key]
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "recipes" / "configs")))
def test_recipe_yaml_states_a_setting_that_does_not_shape_training_only_where_it_differs(path):
    assert repeated_defaults(path) == []


def test_a_repeated_default_is_found(tmp_path):
    copy = tmp_path / "quickstart.yaml"
    values = yaml.safe_load((REPO / "recipes" / "configs" / "quickstart.yaml").read_text())
    values["logging"] = {"tensorboard": True}
    values["model"]["attn_implementation"] = "auto"
    copy.write_text(yaml.safe_dump(values))
    assert sorted(repeated_defaults(copy)) == ["logging.tensorboard: True", "model.attn_implementation: 'auto'"]


@pytest.mark.parametrize("module", ["llama3_cr", "deberta_glue", "vit_vtab"])
def test_recipe_config_classes_restate_no_section_default(module):
    """A section either takes its dataclass's own defaults or has none (the yaml gives it): never a recipe's copy."""
    import importlib

    cls = importlib.import_module(f"recipes.{module}").RecipeConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            assert f.default is dataclasses.MISSING, f.name
            assert f.default_factory in (dataclasses.MISSING, hints[f.name]), f"{module}.RecipeConfig.{f.name}"


@pytest.mark.parametrize("module", ["llama3_cr", "deberta_glue", "vit_vtab"])
def test_help_lists_the_keys_of_a_section_the_yaml_must_give(module, capsys):
    import importlib

    from flexlora.recipe_kit.run_config import config_help

    text = config_help(importlib.import_module(f"recipes.{module}").RecipeConfig, module)
    assert "[adapter] (required: the yaml file gives it)" in text
    assert "adapter.r: int = 8" in text and "adapter.target_modules:" in text


def test_a_recipe_yaml_without_the_adapter_section_is_refused(tmp_path):
    from recipes import llama3_cr

    values = yaml.safe_load((REPO / "recipes" / "configs" / "quickstart.yaml").read_text())
    del values["adapter"]
    path = tmp_path / "no_adapter.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=r"missing required key.* adapter"):
        load_config(llama3_cr.RecipeConfig, path)


# ---- one validation style --------------------------------------------------------------------------------------


def _sections():
    from flexlora.recipe_kit.classifier import EvalSettings
    from flexlora.recipe_kit.data.commonsense import DataConfig
    from flexlora.recipe_kit.scoring import EvalConfig
    from flexlora.recipe_kit.sections import CheckpointConfig, ModelConfig, TrainConfig
    from recipes.deberta_glue import GlueDataConfig
    from recipes.vit_vtab import VtabDataConfig

    # each section with two bad fields
    return [
        (ModelConfig, {"dtype": "int8", "quantization": "int4"}),
        (TrainConfig, {"lr": 0.0, "epochs": 0}),
        (CheckpointConfig, {"every_n_steps": -1, "keep_last": 0}),
        (DataConfig, {"cutoff_len": 4, "packing": "yes"}),
        (EvalConfig, {"limit": 0, "tasks": ["boolq", "nope"]}),
        (EvalSettings, {"every_n_steps": -1, "batch_size": 0}),
        (GlueDataConfig, {"task": "wnli", "max_length": 4}),
        (VtabDataConfig, {"protocol": "best", "num_workers": -1}),
        (FlexLoRAConfig, {"target_modules": ["q"], "r": 0, "importance": "gini"}),
    ]


@pytest.mark.parametrize("cls, bad", _sections(), ids=lambda value: getattr(value, "__name__", ""))
def test_every_config_check_reports_all_its_problems_each_naming_its_field(cls, bad):
    with pytest.raises(InvalidConfigError) as error:
        cls(**bad)
    named = [problem.split(" ", 1)[0].rstrip(":") for problem in error.value.problems]
    wanted = [name for name in bad if name != "target_modules"]
    assert sorted(named) == sorted(wanted), error.value.problems
    assert str(error.value).startswith(f"invalid {cls.__name__}:")


def test_a_recipe_names_every_problem_of_a_section_and_of_the_top_level_with_its_key():
    from recipes import deberta_glue

    path = REPO / "recipes" / "configs" / "glue" / "minilm_rte.yaml"
    with pytest.raises(ConfigError) as error:
        load_config(deberta_glue.RecipeConfig, path, ["train.lr=0", "train.warmup_ratio=2"])
    assert "train.lr must be > 0" in str(error.value) and "train.warmup_ratio must be in [0, 1)" in str(error.value)
    assert set(error.value.fields) == {"train.lr", "train.warmup_ratio"}
    with pytest.raises(ConfigError) as error:
        load_config(deberta_glue.RecipeConfig, path, ["method=qlora", "adapter.modules_to_save=[]"])
    assert "method must be one of flexlora, lora, adalora; got 'qlora'" in str(error.value)
    assert "adapter.modules_to_save is empty" in str(error.value)
    assert set(error.value.fields) == {"method", "adapter.modules_to_save"}


# ---- one registry of names -------------------------------------------------------------------------------------


def test_the_importance_module_implements_exactly_the_registered_metrics():
    assert set(SPECTRAL_METRICS) | set(names.GRADIENT_METRICS) == set(names.IMPORTANCE_METRICS)
    lam, mask = torch.tensor([[0.5, 0.2, 0.0]]), torch.tensor([[True, True, False]])
    for metric in names.IMPORTANCE_METRICS:
        sensitivity = torch.ones(1, 3) if metric in names.GRADIENT_METRICS else None
        assert torch.isfinite(matrix_importance(metric, lam, mask, slot_sensitivity=sensitivity)).all(), metric


def test_each_registered_regulariser_form_computes_its_own_penalty():
    torch.manual_seed(0)
    p, q, mask = torch.randn(6, 3), torch.randn(3, 5), torch.tensor([True, True, False])
    penalties = {form: orthogonality_penalty(p, q, mask, form) for form in names.ORTH_REG_FORMS}
    assert len(set(float(value) for value in penalties.values())) == len(names.ORTH_REG_FORMS)


def test_the_config_accepts_exactly_the_registered_names():
    choices = {
        "importance": names.IMPORTANCE_METRICS,
        "orth_reg": names.ORTH_REG_FORMS,
        "mode": names.MODES,
        "expand_init": names.EXPAND_INITS,
        "factor_init": names.FACTOR_INITS,
        "schedule": names.SCHEDULES,
        "adapter_dtype": names.ADAPTER_DTYPES,
    }
    for field_name, allowed in choices.items():
        for value in allowed:
            FlexLoRAConfig(target_modules=["q"], **{field_name: value})
        with pytest.raises(InvalidConfigError, match=f"{field_name} must be one of {', '.join(allowed)}"):
            FlexLoRAConfig(target_modules=["q"], **{field_name: "other"})


def test_the_recipes_accept_exactly_the_registered_methods():
    from flexlora.recipe_kit.sections import check_run_sections

    class Run:
        output_dir, adapter = "out/{method}", FlexLoRAConfig(target_modules=["q"])

    for method in names.METHODS:
        run = Run()
        run.method = method
        check_run_sections(run)
        assert run.output_dir == f"out/{method}"
    run.method = "qlora"
    with pytest.raises(InvalidConfigError, match="method must be one of " + ", ".join(names.METHODS)):
        check_run_sections(run)


def _strip_parentheses(text: str) -> str:
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\([^()]*\)", "", text)
    return text


def readme_choices(key: str) -> set[str]:
    """The names the README lists for ``key`` in "`key` ∈ a (...), b or c; ..." (asides in parentheses dropped)."""
    readme = (REPO / "README.md").read_text()
    start = re.search(rf"`{key}` ∈\s", readme).end()
    listed = re.split(r";| — ", _strip_parentheses(readme[start:]), maxsplit=1)[0]
    return {name.strip() for name in re.split(r",| or ", listed) if name.strip()}


@pytest.mark.parametrize(
    "key, allowed",
    [
        ("importance", names.IMPORTANCE_METRICS),
        ("mode", names.MODES),
        ("expand_init", names.EXPAND_INITS),
        ("schedule", names.SCHEDULES),
        ("orth_reg", names.ORTH_REG_FORMS),
    ],
)
def test_the_readme_lists_exactly_the_registered_names(key, allowed):
    assert readme_choices(key) == set(allowed)


def test_the_readme_lists_exactly_the_registered_methods():
    readme = (REPO / "README.md").read_text()
    (listed,) = re.findall(r"`method: ([a-z| ]+)`", readme)
    assert [name.strip() for name in listed.split("|")] == list(names.METHODS)


def test_every_registered_method_has_a_label_and_a_benchmark_row():
    from bench import quality_plan

    assert set(names.METHOD_LABELS) == set(names.METHODS)
    assert sorted(quality_plan.METHODS) == sorted(names.METHODS)
