"""`make quickstart`'s table: the trained adapter's row beside the untuned base's and the constant answer's."""

from __future__ import annotations

import json
import subprocess

import yaml
from test_recipe_cr import REPO, run_recipe
from tiny_models import build_tiny_model_dir

from flexlora.recipe_kit.data.synthetic import SYNTHETIC_TASKS
from flexlora.recipe_kit.scoring import BASE_ROW, CONSTANT_ROW, EvalConfig, constant_answer_results, evaluate


def test_the_recipe_scores_the_untuned_base_and_the_constant_on_the_same_items(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes import llama3_cr

    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    out = run_recipe(llama3_cr, model_dir, tmp_path / "run", **{"eval.tasks": None, "eval.baselines": "true"})
    report = json.loads((out / "eval.json").read_text())
    table = capsys.readouterr().out
    assert report["table"] in table

    data_dir = out / "synthetic_data"
    config = EvalConfig(tasks=list(SYNTHETIC_TASKS), limit=2, max_new_tokens=3)
    base_model = AutoModelForCausalLM.from_pretrained(model_dir)
    untuned = evaluate(base_model, AutoTokenizer.from_pretrained(model_dir), config, data_dir)
    assert report["baselines"] == {BASE_ROW: untuned, CONSTANT_ROW: constant_answer_results(config, data_dir)}
    method_rows = [line.split(" | ")[1] for line in report["table"].splitlines()[2:]]
    assert method_rows == [
        "FlexLoRA r=4 [llm-adapters, n=2]",
        f"{BASE_ROW} [llm-adapters, n=2]",
        f"{CONSTANT_ROW} [llm-adapters, n=2]",
    ]


def test_make_quickstart_asks_for_the_baselines_and_ends_with_what_its_scale_can_and_cannot_show():
    commands = subprocess.run(
        ["make", "--no-print-directory", "-n", "quickstart"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    # asked for here, not in quickstart.yaml, which bench/quality.py reuses (one more scoring pass per run)
    assert "recipes/llama3_cr.py --config recipes/configs/quickstart.yaml eval.baselines=true" in " ".join(commands)
    config = yaml.safe_load((REPO / "recipes" / "configs" / "quickstart.yaml").read_text())
    assert not config.get("eval", {}).get("baselines", False)
    assert commands[-1].startswith("echo") and "cannot" in commands[-1] and "bench/" in commands[-1]
