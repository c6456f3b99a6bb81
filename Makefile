# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint typecheck imports pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.bench-installed: $(VENV)/.dev-installed
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/tenfold serve

test: $(VENV)/.dev-installed
	scripts/backends.sh
	$(MAKE) --no-print-directory lint typecheck imports pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

imports:
	$(BIN)/lint-imports

pytest:
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks http ratelimit tasks

clean:
	rm -rf $(VENV) .tenfold .pytest_cache .mypy_cache .ruff_cache .hypothesis
