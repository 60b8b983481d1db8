# Entry points. Every target creates or reuses the virtual environment in .venv/.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo fashion test lint bench-model bench-data bench-train clean

$(STAMP): setup.cfg pyproject.toml tools/setup_system.sh
	tools/setup_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[ffcv,dev]'
	@echo "building DeepSpeed's CPU ops once (communication, CPU Adam): a few minutes"
	$(BIN)/python -c "from lsa_dist.engine import warm_up; warm_up()" > /dev/null 2>&1
	touch $(STAMP)

setup: $(STAMP)

## The main job on built-in data: the digits demo dataset, converted, trained with 2 processes
## (ARGS: config overrides, e.g. ARGS=engine.precision=fp32).
demo: $(STAMP)
	$(BIN)/python tools/make_demo_dataset.py --out data/demo/imagenet
	$(BIN)/python tools/convert_imagenet.py --src data/demo/imagenet --out data/demo/shards --samples-per-shard 200
	$(BIN)/python launch/local.py --config configs/demo.yaml $(ARGS)

## Fashion-MNIST (Debian's dataset-fashion-mnist), written and converted once, trained with 2
## processes for 10 epochs; prints top-1 per epoch beside the published figures.
fashion: $(STAMP)
	$(BIN)/python tools/benchmark_fashion.py --json runs/bench/fashion.json --plot runs/bench/fashion.png $(ARGS)

## The test suite (slow end-to-end tests included).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-model: $(STAMP)
	$(BIN)/python tools/benchmark_model.py --model lsa_tiny --batch-size 8 --steps 10 --compile --json runs/bench/model.json

bench-data: $(STAMP)
	$(BIN)/python tools/benchmark_convert.py --json runs/bench/convert.json
	$(BIN)/python tools/benchmark_data.py --json runs/bench/data.json

bench-train: $(STAMP)
	$(BIN)/python tools/benchmark_train.py --json runs/bench/train.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
