# One-command set-up: `make demo` and `make test` create .venv when it is missing.
# Versions (README, "Versions"): .venv installs the lock's exact versions; `make test-latest` tries the
# newest releases pyproject.toml allows (UNCAPPED=1: beyond its upper bounds) in .venv-latest;
# `make lock` rewrites the lock from .venv-latest once the tests pass there.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LATEST := .venv-latest
LATEST_BIN := $(LATEST)/bin
# torch and torchvision stay at the lock's build in .venv-latest too: the drift looked for is the HF stack's
TORCH_PINS := $(LATEST)/torch-pins.txt
UNCAPPED ?=
PYTEST := -m pytest -q -p no:cacheprovider tests

.PHONY: venv demo test test-latest latest-venv lock lock-guard clean

$(STAMP): pyproject.toml $(LOCK)
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	# torch + torchvision first: these pinned builds lie on disk here (see shared/ENV.md).
	$(BIN)/pip install -q -c $(LOCK) torch torchvision
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmtune demo

test: $(STAMP)
	$(BIN)/python $(PYTEST)

# The newest releases pyproject.toml allows (no lock); UNCAPPED=1 lifts its upper bounds, to try a
# release beyond the tested range before widening it.
latest-venv:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	@test -x $(LATEST_BIN)/python || $(PY) -m venv $(LATEST)
	$(LATEST_BIN)/pip install -q --upgrade pip
	grep -iE '^(torch|torchvision)==' $(LOCK) > $(TORCH_PINS)
	$(LATEST_BIN)/pip install -q -c $(TORCH_PINS) torch torchvision
ifeq ($(UNCAPPED),)
	$(LATEST_BIN)/pip install -q --upgrade --upgrade-strategy eager -c $(TORCH_PINS) -e ".[dev]"
else
	$(LATEST_BIN)/pip install -q --no-deps -e .
	$(PY) requirements/uncapped.py pyproject.toml dev > $(LATEST)/uncapped.txt
	$(LATEST_BIN)/pip install -q --upgrade --upgrade-strategy eager -c $(TORCH_PINS) -r $(LATEST)/uncapped.txt
endif
	$(LATEST_BIN)/pip freeze --all --exclude-editable | grep -iE '^(transformers|peft|accelerate|datasets|tokenizers|torch)=='

test-latest: latest-venv
	$(LATEST_BIN)/python $(PYTEST)

lock-guard:
	@test -z "$(UNCAPPED)" || { echo "make lock: the lock must lie inside pyproject.toml's ranges; widen them first, then run make lock without UNCAPPED"; exit 1; }

lock: lock-guard test-latest
	{ sed -n '/^#/p' $(LOCK); $(LATEST_BIN)/pip freeze --all --exclude-editable | grep -iv '^mmtune' | LC_ALL=C sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) rewritten from $(LATEST); review the diff, then make test (reinstalls .venv from it)"

clean:
	rm -rf $(VENV) $(LATEST) build src/*.egg-info
