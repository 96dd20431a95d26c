# One-command set-up: every target that needs the environment creates .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is installed before the package so pip keeps it; GPU users may set e.g. TORCH_SPEC="torch>=2.5".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
SOURCES := src tests benchmarks experiments

.PHONY: install quickstart test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job on the built-in offline default: skill suite, small MoE-BART, two-stage training (~4 min on 2 cores).
quickstart: $(STAMP)
	$(BIN)/moe-mtl fit --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

format: $(STAMP)
	$(BIN)/ruff check --fix $(SOURCES)
	$(BIN)/ruff format $(SOURCES)

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
