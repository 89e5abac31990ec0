# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/fedcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/fedcli

demo: $(BIN)/fedcli
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh demo 5

test: $(BIN)/fedcli
	$(BIN)/python -m pytest -q

.PHONY: install demo test
