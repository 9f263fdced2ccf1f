# idefics2-ft. `make help` lists the targets. Every target installs what it needs into .venv.
# The first supported interpreter (3.11, 3.12, 3.13) that runs; PYTHON=python3.13 picks one.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch: the CPU wheel of torch 2.13.0 (on these machines it
# lies on disk). A torch already in the venv (your CUDA build) is kept: pip is held to its version.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,oracle,deepspeed,slurm,serve
PIP_FLAGS ?= -q
# With the oracle extra, install also puts in lmms-eval, the harness whose metric files
# tests/unit/test_metrics_harness.py runs against ours: without its dependencies (torchvision, opencv,
# a wandb pin, ... far too heavy for a test tool; the test stands in for the few its metric files import).
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3
MIN_VENV ?= .venv-min
DEMO_DIR ?= outputs/easyvqa_tiny/demo-$(shell date +%Y%m%d-%H%M%S)
# make demo-dpo: a finished `make demo` run folder; empty: the newest outputs/easyvqa_tiny/demo-*
DEMO_RUN ?=
# The fast and fault tiers run JOBS tests at a time (pytest-xdist), each process on one thread: a tiny
# run keeps one core busy whatever its threads (imports, data, the report are Python), so on 2 cores
# two at a time take ~0.6 of the wall time, where 2 threads each would only contend. The fast tier
# keeps each test file on one worker (module fixtures train once), in collection order (the files of
# long runs first, the many short unit tests fill in after); the fault tier spreads its cases one by
# one (a module with its own plain-list table stays on one worker: tests/conftest.py).
JOBS ?= 2
PARALLEL := OMP_NUM_THREADS=1

.DEFAULT_GOAL := help
.PHONY: help install install-browser demo demo-dpo test test-min test-wheel test-slow test-gpu test-slurm test-faults test-serve test-8b checkpoint-8b bench bench-mixed bench-dpo bench-gpu plan lint format clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "} {printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { test -n "$(PYTHON)" || { echo "make: no Python 3.11, 3.12 or 3.13 found; set PYTHON=/path/to/python3.x"; exit 1; }; \
		echo "make: creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -W ignore -c "import torch" 2>/dev/null || $(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	@$(PY) -c "import sys; from importlib.metadata import version; print(f'make: {sys.executable} (Python {sys.version.split()[0]}), keeping torch {version(\"torch\")}')"
	@$(PY) -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VENV)/keep-torch.txt
	$(PY) -m pip install $(PIP_FLAGS) -c $(VENV)/keep-torch.txt -e ".[$(EXTRAS)]"
	@case ",$(EXTRAS)," in *,oracle,*) $(PY) -m pip install $(PIP_FLAGS) --no-deps "$(LMMS_EVAL_SPEC)";; esac
	@touch $@

install: $(VENV)/.installed ## create .venv and install the package with its test tools

install-browser: ## Debian's Chromium + ChromeDriver (root), for the test that opens report.html in a browser
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

demo: $(VENV)/.installed ## train the embedded default recipe (tiny Idefics2, easy-VQA, QLoRA) on the CPU and report
	$(PY) train.py run_dir=$(DEMO_DIR)
	$(PY) scripts/demo_report.py $(DEMO_DIR) --min-overall 0.80 --min-gain 0.15 --goal-overall 0.85 --goal-type 0.75

demo-dpo: $(VENV)/.installed ## DPO on a demo run's own wrong answers, its adapter the reference; before/after table (DEMO_RUN=, default the newest demo-*)
	$(PY) scripts/demo_dpo.py $(DEMO_RUN)

test: $(VENV)/.installed ## the fast test tier (CPU, tiny model; JOBS=2 files at a time)
	$(PARALLEL) $(PY) -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder

test-slow: $(VENV)/.installed ## the slow tier (longer CPU runs, the full demo)
	$(PY) -m pytest -q -m slow

test-min: ## the fast tier on the lowest versions pyproject.toml declares (torch and all), in .venv-min (~15 min, ~6 GB)
	@test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) scripts/min_constraints.py dev deepspeed slurm > $(MIN_VENV)/min.txt
	$(MIN_VENV)/bin/python -m pip install -q -c $(MIN_VENV)/min.txt -e ".[dev,deepspeed,slurm]"
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -c "import torch, transformers, peft, lightning; print('test-min on torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q

test-wheel: $(VENV)/.installed ## build the wheel from a clean clone, install it into a fresh venv, run idefics2-ft train/export/plan (~3 min)
	$(PY) -m pytest -q -m wheel

test-gpu: $(VENV)/.installed ## the CUDA tier (skipped without a GPU)
	$(PY) -m pytest -q -m gpu

test-slurm: $(VENV)/.installed ## a real single-node SLURM cluster (root): sbatch, preemption + requeue, a submitit sweep
	$(PY) -m pytest -q -m slurm

test-faults: $(VENV)/.installed ## fault injection through train.py: bad inputs in both modes, kill -9 and resume, divergence, reused folders (JOBS=2 at a time)
	$(PARALLEL) $(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m faults
	@for t in outputs/fault_table.md outputs/guarantees_table.md; do if test -f $$t; then echo; cat $$t; fi; done

test-serve: $(VENV)/.installed ## the export served by `transformers serve`, asked with the openai client, answers as predict does, image splitting off and on (~2 min)
	$(PY) -m pytest -q -m serve

checkpoint-8b: $(VENV)/.installed ## write (once) a random-init idefics2-8b checkpoint and DocVQA-like pages into the cache
	$(PY) scripts/build_8b.py

test-8b: $(VENV)/.installed ## the real-size 8B (random init) through recipe=docvqa_qlora on the CPU: 2 steps, resume, validation, export (~25 min, 16 GB disk)
	$(PY) -m pytest -q -s -m big8b

bench: $(VENV)/.installed ## our loop against a bare loop doing the same work, a bare loop with the full head, and HF Trainer, on the same batches (outputs/bench.md, ~3 min)
	$(PY) scripts/benchmarks/loops.py

bench-mixed: $(VENV)/.installed ## data.group_by on mixed DocVQA-like pages against HF Trainer's group_by_length, and a three-format mixture against one source (outputs/bench_mixed.md, bench_mixture.md; ~15 min)
	$(PY) scripts/benchmarks/mixed_pages.py --repeats 3
	$(PY) scripts/benchmarks/mixture.py --repeats 3

bench-dpo: $(VENV)/.installed ## our DPO against TRL's DPOTrainer on the same QLoRA Idefics2 and pairs: pairs/s, peak RSS, pictures per pair; tiny and the 8B's shapes with 2 decoder layers (outputs/bench_dpo.md; 20 min on 2 busy CPU cores)
	$(PY) scripts/benchmarks/dpo.py

bench-gpu: $(VENV)/.installed ## on a CUDA GPU: the 8B's measured memory, tokens/s and MFU against the plan (outputs/bench_gpu.md); says so and exits 0 without CUDA
	$(PY) scripts/bench_gpu.py

plan: $(VENV)/.installed ## will docvqa_qlora fit? memory and time per step on common GPUs (RECIPE=, GPU_GB=)
	$(VENV)/bin/idefics2-ft plan recipe=$(or $(RECIPE),docvqa_qlora) plan.gpu_gb=$(or $(GPU_GB),24)

lint: $(VENV)/.installed ## ruff check + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed ## ruff fix + format
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache $(MIN_VENV)
