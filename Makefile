# Two entry points for a fresh machine: `make demo` and `make test` (lint, then the tests: what CI runs);
# `make demo-fraud` runs the fraud example.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

SHELL := /bin/bash

$(BIN)/fedcli: pyproject.toml
	@echo "installing fedcli and its dependencies into $(VENV) (torch, pandas, ...: a few minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	set -o pipefail; $(BIN)/pip install -e '.[dev]' 2>&1 | { grep --line-buffered -E '^(Collecting|Successfully installed|ERROR)' || true; } | cut -c1-100
	touch $@

install: $(BIN)/fedcli

demo: $(BIN)/fedcli
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh demo 5
	@echo; echo "To run fedcli yourself: . $(VENV)/bin/activate   (then: fedcli --help)"

# The fraud example: simulated card transactions at 4 banks, 3 rounds, ending with the report (docs/fraud.md).
demo-fraud: $(BIN)/fedcli
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/fraud/demo.sh demo-fraud 3

# Lint, format and types on fedcli/ (rules and settings in pyproject.toml), cheapest first.
lint: $(BIN)/fedcli
	$(BIN)/ruff check fedcli
	$(BIN)/ruff format --check fedcli
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

.PHONY: install demo demo-fraud lint test
