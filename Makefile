# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel this project's machines carry; an unpinned torch pulls CUDA packages.
TORCH := torch==2.13.0
DEMO ?= demo

.PHONY: setup test demo bench lint clean test-tl39

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/actstore demo --out $(DEMO)

bench: setup
	$(BIN)/python bench/harvest.py
	$(BIN)/python bench/train.py

lint: setup
	$(BIN)/ruff check actstore cli tests bench examples && $(BIN)/ruff format --check actstore cli tests bench examples

clean:
	rm -rf $(VENV) $(DEMO)
