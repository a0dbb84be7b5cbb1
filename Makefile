# One entry point for users and CI. `make all` runs the pipeline; `make test` builds .venv and tests.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# predict's output is its own (--json is JSON): no "Entering directory" lines from a make that runs make
MAKEFLAGS += --no-print-directory

.PHONY: all test smoke venv prepare train evaluate merge push predict lock check-lock lint-docker train-multi-gpu

all:            ## run the whole pipeline with params.yaml (GPU + network)
	dvc repro

prepare train evaluate merge push:   ## run one stage (and what it depends on)
	dvc repro $@

ARGS ?= --test 3
predict:        ## base vs trained side by side: make predict ARGS="--question '...'" (or --file q.jsonl, --test N)
	@python -m grpo_gsm8k.predict $(value ARGS)

$(VENV)/.done: requirements-cpu.txt
	@echo "building $(VENV)/ from requirements-cpu.txt (about 2 minutes, once)"
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-cpu.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.done

test: venv      ## CPU test suite (what CI runs)
	$(VPY) -m pytest -q tests

FRESH ?=
smoke: venv     ## the whole DVC pipeline on a tiny random model, offline, on CPU, in build/smoke (FRESH=1: replace one with experiments)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH SMOKE_FRESH=$(FRESH) $(VPY) -m grpo_gsm8k.smoke build/smoke

lock: venv      ## regenerate requirements.lock for Linux x86_64 / Python 3.12 (UPGRADE=1 to bump everything)
	UV=$(CURDIR)/$(VENV)/bin/uv scripts/lock.sh

check-lock: venv  ## the lock resolves and installs on the target platform (dry run, nothing installed)
	UV=$(CURDIR)/$(VENV)/bin/uv scripts/check_lock.sh

lint-docker: venv
	HADOLINT=$(CURDIR)/$(VENV)/bin/hadolint scripts/lint_docker.sh

train-multi-gpu:  ## train on N GPUs: make train-multi-gpu N=4 ACCEL=ddp|zero2 [DRY_RUN=1]; params.yaml's generation.vllm_mode: colocate (vLLM on every rank) or server
	scripts/train_multi_gpu.sh
