# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel this project's machines carry; an unpinned torch pulls CUDA packages.
TORCH := torch==2.13.0
DEMO ?= demo
# TransformerLens 3.9 is the line SAELens accepts; CI installs 4.x. `make test-tl39` runs the suite under 3.9.
VENV39 := .venv-tl39

.PHONY: setup test demo bench lint clean test-tl39 lock

# constraints.txt pins every other dependency to the versions CI tested (`make lock` refreshes it).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/actstore demo --out $(DEMO)

# bench/train.py compares with EleutherAI's sparsify; pinned, and with torch held at the CPU wheel.
bench: setup
	$(BIN)/pip install -q eai-sparsify==1.3.3 $(TORCH)
	$(BIN)/python bench/harvest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/analytics.py
	$(BIN)/python bench/scale.py  # torchrun's 2 processes against 1, moto's S3 against disk, bytes per codec (≈ 6 min)

test-tl39:
	$(PY) -m venv $(VENV39)
	$(VENV39)/bin/pip install -q --upgrade pip
	$(VENV39)/bin/pip install -q $(TORCH)
	$(VENV39)/bin/pip install -q -e '.[dev]' 'transformer_lens==3.9.*'
	$(VENV39)/bin/python -m pytest tests

# The newest versions pyproject.toml allows, installed into a scratch venv and written to constraints.txt.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q -e '.[dev]'
	{ head -2 constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-lock

lint: setup
	$(BIN)/ruff check actstore cli tests bench examples && $(BIN)/ruff format --check actstore cli tests bench examples

clean:
	rm -rf $(VENV) $(DEMO)
