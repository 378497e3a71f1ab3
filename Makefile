# Two commands on a fresh machine: `make demo` and `make test`. Each creates or reuses the
# virtual environment .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmfuse-installed
DEMO := runs/demo

.PHONY: setup test demo lint clean-demo bench

setup: $(STAMP)

# torch, torchvision and torchaudio must be one matched build: `torch===2.13.0` selects the
# standard wheel (the local +cpu wheel breaks torchvision and torchaudio at import).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch===2.13.0" "torchvision==0.28.0" "torchaudio==2.11.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -c "import torchvision, torchaudio, timm; from transformers import ViTModel" || { \
	  echo "set-up failed: torchvision, torchaudio, timm or transformers.ViTModel do not import;"; \
	  echo "torch, torchvision and torchaudio must be a matched build (see DESIGN.md)."; \
	  exit 1; }
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check mmfuse data_modules tests benchmarks

demo: setup
	$(PY) -m data_modules.world --out data/world --seed 0
	$(VENV)/bin/mmfuse-train experiment=demo
	$(VENV)/bin/mmfuse-eval ckpt=$(DEMO)/model data.path=data/world/test.jsonl output_dir=$(DEMO)/eval
	$(VENV)/bin/mmfuse-eval ckpt=$(DEMO)/model data.path=data/world/test.jsonl output_dir=$(DEMO)/eval-blind 'drop_modalities=[image,audio]'
	$(PY) -m mmfuse.demo_chat --model $(DEMO)/model --world data/world

clean-demo:
	rm -rf $(DEMO)

# performance ratios, each measured side by side (benchmarks/README.md): prints one table and
# writes runs/bench/results.json and runs/bench/scaling.png; under 15 minutes on 2 cores.
# Options through BENCH_ARGS, e.g. make bench BENCH_ARGS="--compile" or "--threads 1"
bench: setup
	$(PY) -m data_modules.world --out data/world --seed 0
	$(PY) -m benchmarks.run $(BENCH_ARGS)
