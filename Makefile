# segflow: the README's two commands are `make demo` and `make test`.
# Each creates .venv and installs the project on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segflow-installed

# Local-only defaults: no hub downloads (pretrained weights need network),
# no telemetry from the Prefect server or DVC. Override on the command line.
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
# Stages run `python -m tasks.<stage>`: make that python the venv's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test test-all bench reliability lint clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

## The whole pipeline on the built-in demo dataset, through the Prefect flow.
demo: install
	$(BIN)/segflow run

## The default test suite (no GPU, no network, no outside server).
## Exit code 5 (no tests collected) is reported, not treated as a failure.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest: no tests collected" || exit $$rc; }

## Everything, slow tests included.
test-all: install
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

## Benchmarks; writes docs/benchmarks.md.
bench: install
	$(BIN)/python bench/run.py

## The reliability tests; writes docs/reliability.md (promise, test, last result).
reliability: install
	$(BIN)/python bench/reliability.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## Remove pipeline outputs (they are reproducible with `make demo` / `dvc repro`).
clean-outputs:
	rm -rf data/ingest data/augment data/train data/evaluate dvc_plots
