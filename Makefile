# The README's two commands: `make demo` and `make test`. Both work from a fresh
# clone: the first run creates .venv and installs tickpipe with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint down clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tickpipe needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

## demo: start the local stack, run ingest + two flushers + a feeder, check Postgres
demo: $(STAMP)
	$(BIN)/tickpipe demo

## test: lint, type-check and run the whole test suite (real Redis and Postgres)
test: lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## down: stop the local stack the demo left running
down: $(STAMP)
	$(BIN)/tickpipe down

clean: down
	rm -rf .tickpipe
