# idefics2-ft. `make help` lists the targets. Every target installs what it needs into .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (on these machines it lies on disk). On a CUDA machine install the
# torch build you want first, or set TORCH_SPEC to it.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= outputs/easyvqa_tiny/demo-$(shell date +%Y%m%d-%H%M%S)

.DEFAULT_GOAL := help
.PHONY: help install install-browser demo test test-slow test-gpu test-slurm test-faults test-8b checkpoint-8b bench bench-mixed bench-gpu plan lint format clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "} {printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,deepspeed,slurm]"
	@touch $@

install: $(VENV)/.installed ## create .venv and install the package with its test tools

install-browser: ## Debian's Chromium + ChromeDriver (root), for the test that opens report.html in a browser
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

demo: $(VENV)/.installed ## train the embedded default recipe (tiny Idefics2, easy-VQA, QLoRA) on the CPU and report
	$(PY) train.py run_dir=$(DEMO_DIR)
	$(PY) scripts/demo_report.py $(DEMO_DIR) --min-overall 0.80 --min-gain 0.15 --goal-overall 0.85 --goal-type 0.75

test: $(VENV)/.installed ## the fast test tier (CPU, tiny model)
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed ## the slow tier (longer CPU runs, the full demo)
	$(PY) -m pytest -q -m slow

test-gpu: $(VENV)/.installed ## the CUDA tier (skipped without a GPU)
	$(PY) -m pytest -q -m gpu

test-slurm: $(VENV)/.installed ## a real single-node SLURM cluster (root): sbatch, preemption + requeue, a submitit sweep
	$(PY) -m pytest -q -m slurm

test-faults: $(VENV)/.installed ## fault injection through train.py: bad inputs in both modes, kill -9 and resume, divergence, reused folders
	$(PY) -m pytest -q -m faults
	@cat outputs/fault_table.md

checkpoint-8b: $(VENV)/.installed ## write (once) a random-init idefics2-8b checkpoint and DocVQA-like pages into the cache
	$(PY) scripts/build_8b.py

test-8b: $(VENV)/.installed ## the real-size 8B (random init) through recipe=docvqa_qlora on the CPU: 2 steps, resume, validation, export (~25 min, 16 GB disk)
	$(PY) -m pytest -q -s -m big8b

bench: $(VENV)/.installed ## our loop against a bare PyTorch loop and HF Trainer on the same batches (outputs/bench.md, ~2 min)
	$(PY) scripts/bench.py

bench-mixed: $(VENV)/.installed ## data.group_by on mixed DocVQA-like pages, and HF Trainer's group_by_length (outputs/bench_mixed.md, ~10 min)
	$(PY) scripts/bench.py --mixed --repeats 3

bench-gpu: $(VENV)/.installed ## on a CUDA GPU: the 8B's measured memory, tokens/s and MFU against the plan (outputs/bench_gpu.md); says so and exits 0 without CUDA
	$(PY) scripts/bench_gpu.py

plan: $(VENV)/.installed ## will docvqa_qlora fit? memory and time per step on common GPUs (RECIPE=, GPU_GB=)
	$(PY) scripts/plan.py recipe=$(or $(RECIPE),docvqa_qlora) plan.gpu_gb=$(or $(GPU_GB),24)

lint: $(VENV)/.installed ## ruff check + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed ## ruff fix + format
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
