"""Every recipe yaml loads into its typed config; overrides and bad values give errors naming the key."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from flexlora.recipe_kit.run_config import ConfigError, check_writable_folder, load_config, parse_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def recipe():
    from recipes import llama3_cr

    return llama3_cr


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"llama3_8b_cr_r8.yaml", "llama3_8b_cr_r32.yaml", "quickstart.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(recipe, path):
    config = load_config(recipe.RecipeConfig, path)
    assert config.method in ("flexlora", "lora", "adalora")
    assert config.adapter.max_rank == math.ceil(1.5 * config.adapter.r)
    assert config.train.batch_size % config.train.micro_batch_size == 0
    # the header says how to run this very file
    command = f"recipes/llama3_cr.py --config recipes/configs/{path.name}"
    assert command in path.read_text().split("\nmethod:")[0]


@pytest.mark.parametrize("rank", [8, 32])
def test_llama3_configs_use_the_paper_hyperparameters(recipe, rank):
    path = REPO / "recipes" / "configs" / f"llama3_8b_cr_r{rank}.yaml"
    header = path.read_text().splitlines()[1]
    launch = "#   accelerate launch --config_file accelerate_configs/fsdp2.yaml recipes/llama3_cr.py"
    assert header.strip() == f"{launch} --config recipes/configs/llama3_8b_cr_r{rank}.yaml"
    c = load_config(recipe.RecipeConfig, path)
    a, t = c.adapter, c.train
    assert (a.r, a.lora_alpha, a.lora_dropout, a.b0, a.t_warmup, a.t_final, a.delta_t) == (
        rank,
        16,
        0.05,
        4,
        5000,
        5000,
        1000,
    )
    assert a.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (t.lr, t.lr_scheduler, t.batch_size, t.warmup_steps, t.epochs, t.max_steps) == (
        3e-4,
        "linear",
        16,
        100,
        3,
        None,
    )
    assert c.data.cutoff_len == 256
    assert c.model.path == "meta-llama/Meta-Llama-3-8B"


def test_overrides_are_typed_and_nested(recipe):
    path = REPO / "recipes" / "configs" / "llama3_8b_cr_r8.yaml"
    c = load_config(
        recipe.RecipeConfig,
        path,
        [
            "method=lora",
            "train.lr=1e-4",
            "adapter.r=32",
            "adapter.target_modules=[q_proj,v_proj]",
            "eval.limit=null",
            "data.max_samples=100",
        ],
    )
    assert c.method == "lora" and c.output_dir == "outputs/llama3_8b_cr_r8-lora"
    assert c.train.lr == 1e-4  # yaml reads "1e-4" as a string; the float field takes it
    assert c.adapter.r == 32 and c.adapter.max_rank == 48
    assert c.adapter.target_modules == ["q_proj", "v_proj"]
    assert c.eval.limit is None and c.data.max_samples == 100


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key(s) train.lrr"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("method=qlora", "method must be one of flexlora, lora, adalora"),
        ("adapter.r=0", "r must be an integer >= 1"),
        ("eval.tasks=[boolq,nope]", "unknown commonsense task 'nope'"),
        ("model.gradient_checkpointing=1", "model.gradient_checkpointing: expected true or false"),
        ("train.lr.x=1", "train.lr"),
        ("adapter.total_steps=1000", "leave it unset"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
    ],
)
def test_bad_values_name_the_key(recipe, override, message):
    path = REPO / "recipes" / "configs" / "quickstart.yaml"
    with pytest.raises(ConfigError) as error:
        load_config(recipe.RecipeConfig, path, [override])
    assert message in str(error.value)
    assert "command line" in str(error.value)  # the override is to blame, not quickstart.yaml
    assert "\n" not in str(error.value)


def test_a_bad_value_in_the_file_names_the_file_and_a_default_says_so(recipe, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text((REPO / "recipes" / "configs" / "quickstart.yaml").read_text().replace("  r: 8", "  r: 0", 1))
    with pytest.raises(ConfigError, match=rf"adapter.r must be an integer >= 1, got 0 \(adapter.r in {path}\)"):
        load_config(recipe.RecipeConfig, path)
    with pytest.raises(
        ConfigError, match=r"adapter.min_rank.*\(adapter.min_rank=9, from the command line; adapter.r in"
    ):
        load_config(recipe.RecipeConfig, REPO / "recipes" / "configs" / "quickstart.yaml", ["adapter.min_rank=9"])


def test_cli_parsing():
    assert parse_cli(["--config", "a.yaml", "x=1", "b.c=[1, 2]"]) == ("a.yaml", ["x=1", "b.c=[1, 2]"])
    assert parse_cli(["x=1", "--config=a.yaml"]) == ("a.yaml", ["x=1"])
    with pytest.raises(ConfigError, match="missing --config"):
        parse_cli(["x=1"])
    with pytest.raises(ConfigError, match="unexpected argument '--lr'"):
        parse_cli(["--config", "a.yaml", "--lr", "1"])


def test_missing_or_non_mapping_config_file(recipe, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(recipe.RecipeConfig, tmp_path / "nope.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(recipe.RecipeConfig, listed)


def _run_recipe(script: str, *args: str):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, f"recipes/{script}.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("script", ["llama3_cr", "deberta_glue", "vit_vtab"])
def test_recipe_help_lists_the_config_keys(script):
    shown = _run_recipe(script, "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"usage: {script}.py --config <file.yaml> [key=value ...]" in shown.stdout
    assert "  [train]" in shown.stdout and "    train.lr: float = " in shown.stdout
    assert "    adapter.orth_reg: str = 'mean_norm'" in shown.stdout


def test_a_user_error_is_one_line_and_exit_status_2():
    bad = _run_recipe("llama3_cr", "--config", "recipes/configs/quickstart.yaml", "train.lr=fast")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert (
        bad.stderr.strip().startswith("error: ")
        and "train.lr" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )


def test_an_output_dir_that_cannot_be_written_is_refused_naming_it(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    check_writable_folder(tmp_path / "new" / "run", "output_dir")  # created later: its nearest existing parent counts
    for path, expected in (
        (tmp_path / "a_file", "output_dir .*a_file is a file, not a folder"),
        (tmp_path / "a_file" / "run", "lies under .*a_file, which is a file"),
    ):
        with pytest.raises(ConfigError, match=expected):
            check_writable_folder(path, "output_dir")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a read-only folder gives a non-root user
    with pytest.raises(ConfigError, match="output_dir .*run: .* is not writable") as raised:
        check_writable_folder(tmp_path / "run", "output_dir")
    assert raised.value.fields == ("output_dir",)


def test_problems_in_several_sections_are_reported_together(recipe):
    """One run names every bad value, each by its dotted key, not only the first section's."""
    overrides = ["train.lr=-1", "adapter.r=0", "model.dtype=int4"]
    with pytest.raises(ConfigError) as error:
        load_config(recipe.RecipeConfig, REPO / "recipes" / "configs" / "quickstart.yaml", overrides)
    assert set(error.value.fields) == {"train.lr", "adapter.r", "model.dtype"}
    for key in ("train.lr must be > 0", "adapter.r must be", "model.dtype must be one of"):
        assert key in str(error.value)
