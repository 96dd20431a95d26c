# One-command set-up: every target that needs the environment creates .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is installed before the package so pip keeps it; GPU users may set e.g. TORCH_SPEC="torch>=2.6,<2.14".
TORCH_SPEC ?= torch==2.13.0
# The exact versions the suite was tested with (`make lock` writes it); torch is TORCH_SPEC's.
LOCK := requirements.lock
STAMP := $(VENV)/.installed
SOURCES := src tests benchmarks scripts
# `make compat`: a venv of the newest releases the pyproject ranges admit, COMPAT_PINS on top
# (e.g. COMPAT_PINS="transformers==5.23.0" COMPAT_VENV=.venv-oldest for the oldest transformers supported).
COMPAT_VENV ?= .venv-newest
COMPAT_PINS ?=
# Packages of the torch build, which TORCH_SPEC chooses and the lock leaves alone.
TORCH_BUILD := ^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==

.PHONY: install quickstart test test-fast bench lint format lock compat clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# The main job on the built-in offline default: skill suite, small MoE-BART, two-stage training (README: time).
quickstart: $(STAMP)
	$(BIN)/moe-mtl fit --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# During development: all but the subprocess runs of the real command and the 2-process DDP tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not distributed"

# MoE-BART against dense BART: time, FLOPs and memory ratios (benchmarks/results/results.md names its run time).
bench: $(STAMP)
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/lint-imports .importlinter  # the layer rule: each package imports only those below it
	$(BIN)/hadolint docker/Dockerfile

format: $(STAMP)
	$(BIN)/ruff check --fix $(SOURCES)
	$(BIN)/ruff format $(SOURCES)

# Re-resolve the lock: the newest releases the pyproject ranges admit, in a fresh venv; then run `make test`.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/pip install -q -e ".[dev]"
	{ echo "# Exact versions the test suite passed with: written by 'make lock', installed by 'make'."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -viE '$(TORCH_BUILD)'; } > $(LOCK)
	rm -rf .venv-lock

# The compatibility suite (pytest -m compat) on the newest releases the ranges admit, or on COMPAT_PINS.
compat:
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/pip install -q --upgrade -e ".[dev]" $(COMPAT_PINS)
	@echo "compatibility suite on:"; $(COMPAT_VENV)/bin/pip freeze --exclude-editable \
	  | grep -iE '^(torch|lightning|transformers|huggingface[-_]hub|datasets|tokenizers|torchmetrics|jsonargparse)=='
	$(COMPAT_VENV)/bin/python -m pytest -m compat -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-newest .venv-oldest .venv-lock build .pytest_cache .ruff_cache
