# One entry point for users and CI. `make all` runs the pipeline; `make test` builds .venv and tests.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: all test smoke venv prepare train evaluate merge push lock clean-smoke

all:            ## run the whole pipeline with params.yaml (GPU + network)
	dvc repro

prepare train evaluate merge push:   ## run one stage (and what it depends on)
	dvc repro $@

$(VENV)/.done: requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-cpu.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.done

test: venv      ## CPU test suite (what CI runs)
	$(VPY) -m pytest -q tests

smoke: venv     ## the whole DVC pipeline on a tiny random model, offline, on CPU, in minutes
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) -m grpo_gsm8k.smoke build/smoke
