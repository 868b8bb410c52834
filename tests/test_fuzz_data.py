"""Malformed training data, generated into tmp_path and run through the real loaders: every case must be refused
with a ``DataError`` whose message names the file and the row (or field) at fault; nothing is dropped silently.

Issue "Nothing silent, nothing lost": an empty training file used to print "0 examples" and spin at step 0, and a
file whose every response is cut away by cutoff_len used to train on a NaN loss.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from recipe_cli import QUICKSTART, tiny_cr_overrides, user_error

from flexlora.recipe_kit.data import DataError, glue, vtab
from flexlora.recipe_kit.data.commonsense import (
    load_rows,
    tokenize_rows,
    training_prompt,
)
from recipes import deberta_glue, llama3_cr, vit_vtab

ROW = {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true", "answer": "true"}


def _row(**changes) -> dict:
    return {**ROW, **changes}


def _rows(*rows) -> str:
    return json.dumps(list(rows))


def _lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import build_tiny_model_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama")))


@dataclass
class Case:
    name: str
    files: dict[str, str | bytes]  # path under tmp_path -> content (bytes written as they are)
    load: Callable[[Path, object], object]  # (root, tokenizer) -> runs the real loaders
    expect: tuple[str, ...]  # substrings the DataError's message must contain


def _commonsense(path: str, **kwargs):
    return lambda root, tok: load_rows(root / path, **kwargs)


def _tokenised(path: str, cutoff_len: int, train_on_inputs: bool):
    def load(root, tok):
        rows, _ = load_rows(root / path)
        return tokenize_rows(rows, tok, cutoff_len, train_on_inputs, True, source=str(root / path))

    return load


def _glue(task: str, folder: str | None = None):
    return lambda root, tok: glue.load_glue_local(task, root if folder is None else root / folder)


def _vtab(task: str, split: str):  # VTAB cases write under <tmp_path>/vt
    return lambda root, tok: vtab.list_split(root / "vt", task, split)


PNG = bytes.fromhex(  # a valid 1x1 PNG, so list files can point at real images
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def _stsb(score: str) -> str:
    return f"{STSB_HEADER}0\tmain\tf\t2012\t1\tnone\tnone\tA plane takes off.\tA plane leaves.\t{score}\n"


CASES = [
    # ---- commonsense: files that are not a list of records ------------------------------------------------
    Case("empty list (the issue)", {"empty.json": "[]"}, _commonsense("empty.json"), ("empty.json", "no rows")),
    Case("zero-byte file", {"zero.json": ""}, _commonsense("zero.json"), ("zero.json", "empty file")),
    Case("whitespace-only file", {"blank.json": " \n\n  "}, _commonsense("blank.json"), ("blank.json", "empty file")),
    Case(
        "jsonl with blank lines only",
        {"blank.jsonl": "\n\n"},
        _commonsense("blank.jsonl"),
        ("blank.jsonl", "empty file"),
    ),
    Case(
        "truncated JSON",
        {"broken.json": '[{"instruction": "q",\n "input": '},
        _commonsense("broken.json"),
        ("broken.json", "not valid JSON", "line 2"),
    ),
    Case(
        "JSON lines in a .json file",
        {"lines.json": _lines(ROW, ROW)},
        _commonsense("lines.json"),
        ("lines.json", "not valid JSON", "line 2", "name the file .jsonl"),
    ),
    Case(
        "top-level object",
        {"obj.json": json.dumps(ROW)},
        _commonsense("obj.json"),
        ("obj.json", "expected a JSON list", "dict"),
    ),
    Case("top-level number", {"num.json": "42"}, _commonsense("num.json"), ("num.json", "expected a JSON list", "int")),
    Case(
        "latin-1 bytes in .json",
        {
            "latin1.json": (
                "[\n" + json.dumps(ROW) + ",\n" + json.dumps(_row(instruction="café"), ensure_ascii=False) + "\n]"
            ).encode("latin-1")
        },
        _commonsense("latin1.json"),
        ("latin1.json", "line 3", "not UTF-8", "0xe9"),
    ),
    Case(
        "latin-1 bytes in .jsonl",
        {"latin1.jsonl": (_lines(ROW) + json.dumps(_row(input="naïve"), ensure_ascii=False) + "\n").encode("latin-1")},
        _commonsense("latin1.jsonl"),
        ("latin1.jsonl", "line 2", "not UTF-8"),
    ),
    Case(
        "jsonl bad line",
        {"rows.jsonl": _lines(ROW, ROW, "{oops")},
        _commonsense("rows.jsonl"),
        ("rows.jsonl", "line 3 is not valid JSON"),
    ),
    # ---- commonsense: bad rows ------------------------------------------------------------------------------
    Case(
        "row is a string",
        {"str.json": _rows(ROW, ROW, "just text")},
        _commonsense("str.json"),
        ("str.json", "1 malformed row(s) of 3", "row 2: expected an object, got str"),
    ),
    Case(
        "row is null",
        {"null.json": _rows(None, ROW)},
        _commonsense("null.json"),
        ("null.json", "row 0: expected an object, got NoneType"),
    ),
    Case(
        "jsonl row is a list, named by line",
        {"list.jsonl": _lines(ROW, "", [1, 2])},
        _commonsense("list.jsonl"),
        ("list.jsonl", "row 1 (line 3): expected an object, got list"),
    ),
    Case(
        "jsonl missing field, named by line",
        {"gap.jsonl": "\n" + _lines(ROW, "", "", {"instruction": "q", "input": ""})},
        _commonsense("gap.jsonl"),
        ("gap.jsonl", "row 1 (line 5): missing field(s) output, answer"),
    ),
    Case(
        "missing output",
        {"noout.json": _rows({k: v for k, v in ROW.items() if k != "output"})},
        _commonsense("noout.json"),
        ("noout.json", "row 0: missing field(s) output"),
    ),
    Case(
        "instruction is a number",
        {"int.json": _rows(ROW, _row(instruction=7))},
        _commonsense("int.json"),
        ("int.json", "row 1: field(s) instruction (int) are not strings"),
    ),
    Case(
        "output is null",
        {"nullout.json": _rows(_row(output=None))},
        _commonsense("nullout.json"),
        ("nullout.json", "row 0: field(s) output (NoneType) are not strings"),
    ),
    Case(
        "answer is a list",
        {"listans.json": _rows(ROW, ROW, _row(answer=["true"]))},
        _commonsense("listans.json"),
        ("listans.json", "row 2: field(s) answer (list)"),
    ),
    Case(
        "empty instruction",
        {"noinst.json": _rows(ROW, _row(instruction=""))},
        _commonsense("noinst.json"),
        ("noinst.json", "row 1: empty instruction"),
    ),
    Case(
        "whitespace-only output",
        {"wsout.json": _rows(_row(output=" \n\t"))},
        _commonsense("wsout.json"),
        ("wsout.json", "row 0: empty output"),
    ),
    Case(
        "empty answer in a scoring file",
        {"dev.json": _rows(ROW, _row(answer=""))},
        _commonsense("dev.json", require_answer=True),
        ("dev.json", "row 1: empty answer"),
    ),
    Case(
        "lone surrogate escape",
        {"surrogate.json": '[{"instruction": "caf\\ud800", "input": "", "output": "o", "answer": "a"}]'},
        _commonsense("surrogate.json"),
        ("surrogate.json", "row 0: field(s) instruction", "surrogate"),
    ),
    Case(
        "30 bad rows: the first 20 listed",
        {"many.json": _rows(*[_row(output="")] * 30)},
        _commonsense("many.json"),
        ("many.json", "30 malformed row(s) of 30", "row 19: empty output", "... and 10 more"),
    ),
    # ---- commonsense: folders of <task>/train.json ----------------------------------------------------------
    Case(
        "folder with an empty task file",
        {"cs/a_task/train.json": _rows(ROW), "cs/b_task/train.json": "[]"},
        _commonsense("cs"),
        ("b_task/train.json", "no rows"),
    ),
    Case(
        "folder whose files are all empty",
        {"cs/a_task/train.json": "[]", "cs/b_task/train.json": "[]"},
        _commonsense("cs"),
        ("a_task/train.json", "no rows"),
    ),
    Case(
        "folder with a broken task file",
        {"cs/a_task/train.json": _rows(ROW), "cs/b_task/train.json": "[{"},
        _commonsense("cs"),
        ("b_task/train.json", "not valid JSON"),
    ),
    # ---- commonsense: tokenisation (the tiny Llama tokenizer) -----------------------------------------------
    Case(
        "every response cut away, response-only loss (the issue)",
        {"cut.json": _rows(ROW, _row(instruction="Is grass green?"))},
        _tokenised("cut.json", 16, train_on_inputs=False),
        (
            "cut.json",
            "no row keeps any of its response",
            "cutoff_len=16",
            "2 of 2 rows truncated",
            "2 with no response token left",
        ),
    ),
    Case(
        "every response cut away, train_on_inputs",
        {"cut.json": _rows(ROW, ROW, ROW)},
        _tokenised("cut.json", 16, train_on_inputs=True),
        ("cut.json", "cutoff_len=16", "3 of 3 rows truncated", "3 with no response token left"),
    ),
    # ---- GLUE tsv folders -----------------------------------------------------------------------------------
    Case("empty train.tsv", {"glue/RTE/train.tsv": ""}, _glue("rte", "glue"), ("RTE/train.tsv", "empty file")),
    Case("header only", {"glue/RTE/train.tsv": RTE_HEADER}, _glue("rte", "glue"), ("RTE/train.tsv", "no data rows")),
    Case(
        "wrong number of columns",
        {"glue/RTE/train.tsv": RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tnot_entailment\n"},
        _glue("rte", "glue"),
        ("RTE/train.tsv:3", "3 tab-separated field(s), expected 4"),
    ),
    Case(
        "blank line inside",
        {"glue/RTE/train.tsv": RTE_HEADER + "0\ta\tb\tentailment\n\n1\ta\tb\tentailment\n"},
        _glue("rte", "glue"),
        ("RTE/train.tsv:3", "1 tab-separated field(s)"),
    ),
    Case(
        "empty second sentence",
        {"glue/RTE/train.tsv": RTE_HEADER + "0\tA man sleeps.\t\tentailment\n"},
        _glue("rte", "glue"),
        ("RTE/train.tsv:2", "empty sentence2"),
    ),
    Case(
        "blank CoLA sentence (no header)",
        {"glue/CoLA/train.tsv": "gj04\t1\t\tGood.\ngj04\t0\t*\t   \n"},
        _glue("cola", "glue"),
        ("CoLA/train.tsv:2", "empty sentence"),
    ),
    Case(
        "unknown RTE label",
        {"glue/RTE/train.tsv": RTE_HEADER + "0\ta\tb\tmaybe\n"},
        _glue("rte", "glue"),
        ("RTE/train.tsv:2", "label 'maybe' is not one of"),
    ),
    Case(
        "CoLA label out of range",
        {"glue/CoLA/train.tsv": "gj04\t1\t\tGood.\ngj04\t2\t\tAlso good.\n"},
        _glue("cola", "glue"),
        ("CoLA/train.tsv:2", "label '2'"),
    ),
    Case(
        "STS-B score not a number",
        {"glue/STS-B/train.tsv": _stsb("high")},
        _glue("stsb", "glue"),
        ("STS-B/train.tsv:2", "score 'high' is not a number"),
    ),
    Case(
        "STS-B score above 5",
        {"glue/STS-B/train.tsv": _stsb("7.5")},
        _glue("stsb", "glue"),
        ("STS-B/train.tsv:2", "score '7.5' is outside [0, 5]"),
    ),
    Case(
        "STS-B score nan",
        {"glue/STS-B/train.tsv": _stsb("nan")},
        _glue("stsb", "glue"),
        ("STS-B/train.tsv:2", "not finite"),
    ),
    Case(
        "latin-1 dev.tsv",
        {
            "glue/MRPC/train.tsv": MRPC_HEADER + "1\t1\t2\tA b.\tC d.\n",
            "glue/MRPC/dev.tsv": (MRPC_HEADER[1:] + "1\t1\t2\tA b.\tC d.\n0\t3\t4\tCafé.\tE f.\n").encode("latin-1"),
        },
        _glue("mrpc", "glue/MRPC"),
        ("MRPC/dev.tsv:3", "not UTF-8"),
    ),
    Case(
        "comma-separated instead of tabs",
        {"glue/RTE/train.tsv": "index,sentence1,sentence2,label\n0,a,b,entailment\n"},
        _glue("rte", "glue"),
        ("RTE/train.tsv:1", "lacks column(s)"),
    ),
    Case(
        "too few rows to carve a validation split",
        {"glue/STS-B/train.tsv": _stsb("3.0")},
        lambda root, tok: glue.carve_validation(glue.load_glue_local("stsb", root / "glue")["train"], 0.1, seed=0),
        ("STS-B/train.tsv", "leaves no rows"),
    ),
    # ---- VTAB-1k list files ---------------------------------------------------------------------------------
    Case(
        "list file naming a missing image",
        {"vt/kitti/images/a.png": PNG, "vt/kitti/train800.txt": "images/a.png 1\nimages/gone.png 2\n"},
        _vtab("kitti", "train800"),
        ("kitti/train800.txt", "1 image file(s) missing", "line 2: images/gone.png"),
    ),
    Case(
        "latin-1 list file",
        {"vt/kitti/images/a.png": PNG, "vt/kitti/val200.txt": "images/a.png 1\nimages/é.png 0\n".encode("latin-1")},
        _vtab("kitti", "val200"),
        ("kitti/val200.txt:2", "not UTF-8"),
    ),
    Case("empty list file", {"vt/kitti/test.txt": "\n"}, _vtab("kitti", "test"), ("kitti/test.txt", "no samples")),
    Case(
        "list file class id out of range",
        {"vt/kitti/images/a.png": PNG, "vt/kitti/test.txt": "images/a.png 12\n"},
        _vtab("kitti", "test"),
        ("kitti/test.txt", "class id(s) [12] out of range", "4 classes"),
    ),
    Case(
        "list file that is a folder",
        {"vt/kitti/odd.txt/x": "", "vt/kitti/images/a.png": PNG},
        lambda root, tok: vtab.read_list_file(root / "vt" / "kitti" / "odd.txt"),
        ("odd.txt", "cannot read the list file"),
    ),
]


def test_the_table_has_enough_cases():
    assert len(CASES) >= 20
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_data_is_refused_naming_file_and_row(case, tmp_path, tokenizer):
    for relative, content in case.files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        case.load(tmp_path, tokenizer)
    message = str(error.value)
    missing = [expected for expected in case.expect if expected not in message]
    assert not missing, f"message lacks {missing}:\n{message}"


def test_partly_cut_rows_are_dropped_and_reported_not_silently(tmp_path, tokenizer, caplog):
    """Rows that lose their whole response are dropped with a warning that counts them; the others train."""
    long = _row(instruction="Please answer the following question with true or false. " * 8)
    path = tmp_path / "mixed.json"
    path.write_text(_rows(ROW, long, ROW))
    rows, _ = load_rows(path)
    cutoff = len(tokenizer(training_prompt(ROW))["input_ids"]) + 4  # ROW fits; the long row's response does not
    with caplog.at_level(logging.INFO):
        kept = tokenize_rows(rows, tokenizer, cutoff, train_on_inputs=False, add_eos_token=True, source=str(path))
    assert len(kept) == 2 and (kept.truncated, kept.without_response) == (1, 1)
    assert all(any(label != -100 for label in example["labels"]) for example in kept)
    assert f"{path}: dropped 1 of 3 rows whose whole response was cut away by cutoff_len={cutoff}" in caplog.text
    assert f"{path}: 1 of 3 rows are longer than cutoff_len={cutoff}" in caplog.text


def test_glue_truncation_is_counted_and_logged(tmp_path, tokenizer, caplog):
    folder = tmp_path / "RTE"
    folder.mkdir()
    (folder / "train.tsv").write_text(
        RTE_HEADER + "0\tA man sleeps.\tHe rests.\tentailment\n"
        f"1\t{'A very long sentence indeed. ' * 20}\tShort.\tnot_entailment\n"
    )
    split = glue.load_glue_local("rte", tmp_path)["train"]
    with caplog.at_level(logging.INFO):
        encoded = glue.EncodedGlue(split, tokenizer, max_length=24)
    assert encoded.truncated == 1 and len(encoded) == 2
    assert len(encoded[1]["input_ids"]) == 24 and len(encoded[0]["input_ids"]) < 24
    assert f"{folder / 'train.tsv'}: 1 of 2 rows are longer than max_length=24 tokens" in caplog.text


# ---- the same mistakes end to end: the recipe's command line, exit status 2, one line naming the file ----------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny_models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama_recipe"))


@dataclass
class RecipeCase:
    name: str
    recipe: str  # cr | glue | vtab
    files: dict[str, str | bytes]  # path under tmp_path -> content
    settings: dict[str, str]  # key=value overrides; "{tmp}" is tmp_path
    expect: tuple[str, ...]  # substrings of the error line (the file, and what is wrong with it)


RECIPE_CASES = [
    RecipeCase(
        "cr empty list", "cr", {"empty.json": "[]"}, {"data.path": "{tmp}/empty.json"}, ("empty.json", "no rows")
    ),
    RecipeCase(
        "cr truncated JSON",
        "cr",
        {"broken.json": '[{"instruction": "q",\n "input": '},
        {"data.path": "{tmp}/broken.json"},
        ("broken.json", "not valid JSON", "line 2"),
    ),
    RecipeCase(
        "cr row without output",
        "cr",
        {"noout.json": _rows(ROW, {k: v for k, v in ROW.items() if k != "output"})},
        {"data.path": "{tmp}/noout.json"},
        ("noout.json", "row 1: missing field(s) output"),
    ),
    RecipeCase(
        "cr latin-1 file",
        "cr",
        {"latin1.json": ("[" + json.dumps(_row(instruction="café"), ensure_ascii=False) + "]").encode("latin-1")},
        {"data.path": "{tmp}/latin1.json"},
        ("latin1.json", "not UTF-8"),
    ),
    RecipeCase(
        "cr folder without task files",
        "cr",
        {"cs/readme.txt": "no tasks here"},
        {"data.path": "{tmp}/cs"},
        ("cs: no <task>/train.json files", "data.path={tmp}/cs, from the command line"),
    ),
    RecipeCase(
        "cr every response cut away",
        "cr",
        {"cut.json": _rows(ROW, _row(instruction="Is grass green?"))},
        {"data.path": "{tmp}/cut.json", "data.cutoff_len": "16"},
        ("cut.json", "no row keeps any of its response", "cutoff_len=16"),
    ),
    RecipeCase(
        "cr hub data set that cannot be reached offline",
        "cr",
        {},
        {"data.path": "nobody/no_such_dataset"},
        ("data.path nobody/no_such_dataset", "data.path=nobody/no_such_dataset, from the command line"),
    ),
    RecipeCase(
        "glue hub data set that cannot be reached offline",
        "glue",
        {},
        {"data.source": "hub", "data.hub_dataset": "nobody/no_such_glue"},
        ("data.hub_dataset nobody/no_such_glue", "data.hub_dataset=nobody/no_such_glue, from the command line"),
    ),
    RecipeCase(
        "glue header only",
        "glue",
        {"glue/RTE/train.tsv": RTE_HEADER},
        {"data.data_dir": "{tmp}/glue"},
        ("RTE/train.tsv", "no data rows"),
    ),
    RecipeCase(
        "glue unknown label",
        "glue",
        {"glue/RTE/train.tsv": RTE_HEADER + "0\ta\tb\tmaybe\n"},
        {"data.data_dir": "{tmp}/glue"},
        ("RTE/train.tsv:2", "label 'maybe' is not one of"),
    ),
    RecipeCase(
        "glue folder without train.tsv",
        "glue",
        {"glue/notes.txt": ""},
        {"data.data_dir": "{tmp}/glue"},
        ("no train.tsv for GLUE task rte", "data.data_dir={tmp}/glue, from the command line"),
    ),
    RecipeCase(
        "vtab list file naming a missing image",
        "vtab",
        {"vt/kitti/images/a.png": PNG, "vt/kitti/train800val200.txt": "images/a.png 1\nimages/gone.png 2\n"},
        {"data.root": "{tmp}/vt", "data.task": "kitti"},
        ("kitti/train800val200.txt", "1 image file(s) missing"),
    ),
    RecipeCase(
        "vtab task folder missing",
        "vtab",
        {"vt/readme.txt": ""},
        {"data.root": "{tmp}/vt", "data.task": "kitti"},
        ("VTAB-1k kitti/train800val200: neither the folder", "data.root={tmp}/vt, from the command line"),
    ),
]
SHIPPED = {"cr": "quickstart.yaml", "glue": "glue/minilm_rte.yaml", "vtab": "vtab/vit_b16_in21k.yaml"}


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[case.name for case in RECIPE_CASES])
def test_malformed_data_stops_the_recipe_with_exit_2_naming_the_file(
    case, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    for relative, content in case.files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    settings = {"output_dir": str(tmp_path / "run")}
    if case.recipe == "cr":
        settings.update(tiny_cr_overrides(tiny_model_dir, tmp_path / "run"))
    settings.update({key: value.replace("{tmp}", str(tmp_path)) for key, value in case.settings.items()})
    module = {"cr": llama3_cr, "glue": deberta_glue, "vtab": vit_vtab}[case.recipe]
    config = QUICKSTART.parent / SHIPPED[case.recipe]
    argv = ["--config", str(config), *(f"{key}={value}" for key, value in settings.items())]
    message = user_error(module, argv, monkeypatch, capsys)
    missing = [
        e.replace("{tmp}", str(tmp_path)) for e in case.expect if e.replace("{tmp}", str(tmp_path)) not in message
    ]
    assert not missing, f"message lacks {missing}:\n{message}"
