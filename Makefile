# Entry points. Every target creates or reuses the virtual environment in .venv/.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench-model clean

$(STAMP): setup.cfg pyproject.toml tools/setup_system.sh
	tools/setup_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[ffcv,dev]'
	touch $(STAMP)

setup: $(STAMP)

## The main job on built-in data: for now the model benchmark (lsa_tiny, batch 8, fp32).
demo: $(STAMP)
	$(BIN)/python tools/benchmark_model.py --model lsa_tiny --batch-size 8 --steps 6

## The test suite (slow end-to-end tests included).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-model: $(STAMP)
	$(BIN)/python tools/benchmark_model.py --model lsa_tiny --batch-size 8 --steps 10 --compile --json runs/bench/model.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
