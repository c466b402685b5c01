# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch is pinned in pyproject's `train` extra; this keeps pip
# from ever pulling CUDA wheels when a local wheel folder exists.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: demo test test-fast system-deps install install-test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(PIP_FLAGS) -e ".[train,test]"
	touch $@ $(VENV)/.installed-base

system-deps:
	bash tests/install-system-deps.sh

install: $(VENV)/.installed-base
install-test: $(VENV)/.installed-test

## make demo: virtual environment, install, then a full run against a local PACS.
demo: system-deps install
	$(BIN)/headscreen demo --work demo-out

## make test: everything the tests need (Debian tools included), then the suite, on two
## pytest-xdist workers: one test module per work unit, slowest modules first (see
## tests/conftest.py). `make test XDIST=` runs it serially in one process. The 25 slowest
## tests are listed at the end, so a run shows where the suite's time goes.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
test: system-deps install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) --durations=25 $(PYTEST_ARGS)

## make test-fast: the loop while changing code, SQLite only: leaves out the tests marked
## `slow` (end to end with Orthanc or dcmtk peers, a browser, the wheel installed, the
## real-scan suite, training) and the PostgreSQL cases (marked `postgres` by conftest's
## db_url parametrisation). `make test` runs everything and is the gate.
test-fast: system-deps install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) -m "not slow and not postgres" $(PYTEST_ARGS)

## make lint: `ruff check` (rules in pyproject's [tool.ruff]) and mypy with the pydantic plugin
## ([tool.mypy]: daemon, db, export, imaging, model_training). CI runs it before `make test`.
## Not `ruff format --check`: the formatter would rewrite 153 of the 181 Python files (the
## code aligns continuation lines under the opening bracket; the formatter does not), so
## the tree is not formatter-clean and a reformat would bury the history.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: system-deps install-test
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/delivery.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
