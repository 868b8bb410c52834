"""LLM-Adapters data: the prompt templates (pinned character for character), validation, loading, tokenisation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flexlora.recipe_kit.data import DataError
from flexlora.recipe_kit.data.commonsense import (
    DataConfig,
    evaluation_prompt,
    load_rows,
    select_rows,
    tokenize_rows,
    training_prompt,
    validate_rows,
)
from flexlora.recipe_kit.data.synthetic import synthetic_rows, write_synthetic_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
I16 = " " * 16


def test_training_prompt_is_llm_adapters_text_exactly():
    # LLM-Adapters finetune.py generate_prompt, whitespace included (trailing spaces, 16-space indents,
    # whitespace-only separator lines).
    row = {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true", "answer": "true"}
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
        "\n"
        f"{I16}### Instruction:\n"
        f"{I16}Is the sky blue?\n"
        f"{I16}\n"
        f"{I16}### Response:\n"
        f"{I16}the correct answer is true"
    )
    assert training_prompt(row) == expected
    with_input = {**row, "input": "Some context."}
    expected_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n"
        "\n"
        f"{I16}### Instruction:\n"
        f"{I16}Is the sky blue?\n"
        f"{I16}\n"
        f"{I16}### Input:\n"
        f"{I16}Some context.\n"
        f"{I16}\n"
        f"{I16}### Response:\n"
        f"{I16}the correct answer is true"
    )
    assert training_prompt(with_input) == expected_input


def test_evaluation_prompt_is_commonsense_evaluate_text_exactly():
    # LLM-Adapters commonsense_evaluate.py generate_prompt: one trailing space, empty separator lines.
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
        "\n"
        f"{I16}### Instruction:\n"
        f"{I16}Is the sky blue?\n"
        "\n"
        f"{I16}### Response:\n"
        f"{I16}"
    )
    assert evaluation_prompt("Is the sky blue?") == expected
    expected_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n"
        "\n"
        f"{I16}### Instruction:\n"
        f"{I16}Q\n"
        "\n"
        f"{I16}### Input:\n"
        f"{I16}C\n"
        "\n"
        f"{I16}### Response:\n"
        f"{I16}"
    )
    assert evaluation_prompt("Q", "C") == expected_input


def _row(**changes):
    row = {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}
    row.update(changes)
    return row


def test_bad_rows_are_reported_by_index_and_never_dropped():
    rows = [
        _row(),
        {k: v for k, v in _row().items() if k != "output"},
        _row(),
        _row(output="  "),
        _row(answer=3),
        "text",
    ]
    with pytest.raises(ValueError) as error:
        validate_rows(rows, "train.json")
    message = str(error.value)
    assert "train.json: 4 malformed row(s) of 6" in message
    assert "row 1: missing field(s) output" in message
    assert "row 3: empty output" in message
    assert "row 4: field(s) answer (int) are not strings" in message
    assert "row 5: expected an object, got str" in message
    assert "row 0" not in message and "row 2" not in message


def test_answer_must_be_non_empty_only_for_scoring():
    rows = [_row(answer="")]
    assert validate_rows(rows, "train") == rows
    with pytest.raises(ValueError, match="row 0: empty answer"):
        validate_rows(rows, "dev", require_answer=True)


def test_file_errors_name_the_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_rows(broken)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_rows(not_list)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")  # used to print "0 examples" and spin at step 0
    with pytest.raises(DataError, match="empty.json: no rows"):
        load_rows(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no <task>/train.json"):
        load_rows(tmp_path)


def test_jsonl_bad_line_reports_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + "{oops\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_rows(path)


def test_directory_of_tasks_is_concatenated_in_name_order(tmp_path):
    for task, n in (("b_task", 2), ("a_task", 3)):
        (tmp_path / task).mkdir()
        (tmp_path / task / "train.json").write_text(json.dumps([_row(instruction=f"{task}{i}") for i in range(n)]))
    (tmp_path / "a_task" / "dev.json").write_text(json.dumps([_row()]))
    rows, counts = load_rows(tmp_path, "train")
    assert counts == {"a_task": 3, "b_task": 2}
    assert [r["instruction"] for r in rows] == ["a_task0", "a_task1", "a_task2", "b_task0", "b_task1"]
    bad = tmp_path / "b_task" / "train.json"
    bad.write_text(json.dumps([_row(), _row(instruction="")]))
    with pytest.raises(ValueError, match=r"b_task/train.json: 1 malformed row\(s\) of 2:\n  row 1: empty instruction"):
        load_rows(tmp_path, "train")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared commonsense data not present")
def test_shared_commonsense_data_validates():
    rows, counts = load_rows(SHARED / "openbookqa" / "train.json")
    assert counts == {"train.json": 4957}
    assert rows[0]["output"] == f"the correct answer is {rows[0]['answer']}"


def test_synthetic_rows_are_deterministic_and_correct(tmp_path):
    tf = synthetic_rows("synthetic_truefalse", 30, seed=3)
    assert tf == synthetic_rows("synthetic_truefalse", 30, seed=3)
    assert tf != synthetic_rows("synthetic_truefalse", 30, seed=4)
    for row in tf:
        a, b = (int(x) for x in row["instruction"].split("is ")[1].split("?")[0].split(" greater than "))
        assert row["answer"] == ("true" if a > b else "false")
    for row in synthetic_rows("synthetic_choice", 30, seed=3):
        question = row["instruction"].split("What is ")[1]
        a, b = (int(x) for x in question.split("?")[0].split(" plus "))
        options = dict(re.findall(r"Answer(\d): (\d+)", question))
        assert options[row["answer"].removeprefix("answer")] == str(a + b)
    write_synthetic_dataset(tmp_path, 5, 2, seed=0)
    rows, counts = load_rows(tmp_path, "dev", require_answer=True)
    assert counts == {"synthetic_choice": 2, "synthetic_truefalse": 2}


def test_select_rows_is_a_seeded_subset_in_original_order():
    rows = [_row(instruction=str(i)) for i in range(50)]
    chosen = select_rows(rows, 10, seed=1)
    assert chosen == select_rows(rows, 10, seed=1)
    indices = [int(r["instruction"]) for r in chosen]
    assert len(indices) == 10 and indices == sorted(indices)
    assert select_rows(rows, None, 1) is rows


class _CharTokenizer:
    """One token per character, id 0 = EOS: enough to check masking and truncation exactly."""

    eos_token_id = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[1 + (ord(c) % 200) for c in t][:max_length] for t in texts]}


def test_tokenize_masks_the_prompt_when_training_on_responses_only():
    row = _row(instruction="abc", output="xyz")
    prompt_len = len(training_prompt({**row, "output": ""}))
    full = tokenize_rows([row], _CharTokenizer(), cutoff_len=1000, train_on_inputs=False)[0]
    assert full["input_ids"][-1] == 0 and len(full["input_ids"]) == prompt_len + 3 + 1  # response + EOS
    assert full["labels"][:prompt_len] == [-100] * prompt_len
    assert full["labels"][prompt_len:] == full["input_ids"][prompt_len:]
    plain = tokenize_rows([row], _CharTokenizer(), cutoff_len=1000, train_on_inputs=True)[0]
    assert plain["labels"] == plain["input_ids"]
    counted = tokenize_rows([row], _CharTokenizer(), cutoff_len=1000, train_on_inputs=True)
    assert counted.truncated == 0 and counted.without_response == 0
    # the response cut to 2 of its 3 characters: truncated, no room for EOS, still a target
    cut = tokenize_rows([row], _CharTokenizer(), cutoff_len=prompt_len + 2)
    assert len(cut[0]["input_ids"]) == prompt_len + 2 and cut[0]["input_ids"][-1] != 0
    assert (cut.truncated, cut.without_response) == (1, 0)
    exact = tokenize_rows([row], _CharTokenizer(), cutoff_len=prompt_len + 3)  # fits exactly: not truncated, no EOS
    assert len(exact[0]["input_ids"]) == prompt_len + 3 and exact.truncated == 0


def test_rows_whose_response_is_cut_away_are_counted_dropped_and_logged(caplog):
    short, long = _row(instruction="abc", output="xyz"), _row(instruction="a" * 100, output="xyz")
    cutoff = len(training_prompt({**short, "output": ""})) + 10
    with caplog.at_level("INFO"):
        kept = tokenize_rows([short, long, short], _CharTokenizer(), cutoff, train_on_inputs=False, source="d.json")
    assert len(kept) == 2 and (kept.truncated, kept.without_response) == (1, 1)
    assert all(any(label != -100 for label in e["labels"]) for e in kept)
    assert "d.json: 1 of 3 rows are longer than cutoff_len" in caplog.text
    assert "d.json: dropped 1 of 3 rows whose whole response was cut away" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        all_kept = tokenize_rows([short, long], _CharTokenizer(), cutoff, train_on_inputs=True, source="d.json")
    assert len(all_kept) == 2 and all_kept.without_response == 1  # trains on its prompt, but it is reported
    assert "1 of 2 rows lost their whole response" in caplog.text
    for train_on_inputs in (False, True):  # no response left anywhere: refused (NaN loss / nothing to learn)
        with pytest.raises(
            DataError, match=r"d.json: no row keeps any of its response .*2 of 2 rows truncated, 2 with no"
        ):
            tokenize_rows([long, long], _CharTokenizer(), 20, train_on_inputs=train_on_inputs, source="d.json")


def test_data_config_checks_values():
    with pytest.raises(ValueError, match="if_missing"):
        DataConfig(if_missing="maybe")
    assert DataConfig(path="synthetic").uses_synthetic()
    assert DataConfig(path="/nonexistent/dir", if_missing="synthetic").uses_synthetic()
    assert not DataConfig(path="/nonexistent/dir").uses_synthetic()
    assert not DataConfig(path="org/hub-dataset", if_missing="synthetic").uses_synthetic()
