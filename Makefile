# The two commands of the README: `make demo` and `make test`. Both set up
# their own virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch is installed on its own first: with no torch present, an unpinned
# resolver run pulls a multi-GB CUDA build on CPU-only machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# DEMO_ARGS: config overrides for a shorter run (the tests use it); the paths stay as typed.
demo: setup
	$(BIN)/python -m pipeline.cli demo $(DEMO_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# For development: everything but the end-to-end tests marked `slow` (a few minutes).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/quantizer.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/vae_quality.py

clean:
	rm -rf $(VENV) runs
