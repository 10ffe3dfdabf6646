# `make run`: set up on a fresh machine and serve; `make test`: run the suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
export BENTOML_HOME ?= $(CURDIR)/var/bentoml
export STORE_URI ?= file://$(CURDIR)/var/store
# One task-result database per server: two servers sharing one break each other's task results.
export BENTOML_RESULT_STORE ?= $(CURDIR)/var/task-results-$(PORT).db
export BENTOML_DO_NOT_TRACK := True
export TF_CPP_MIN_LOG_LEVEL ?= 2
STAMP := $(VENV)/.installed
SIMSERVER := $(VENV)/bin/simserver

.PHONY: run test test-fast install encoder demo lint format bench bento clean

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt requirements-deploy.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-deploy.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# The project itself (the `simserver` command), after the pinned requirements: --no-deps, so it
# changes no pin; editable, so the working tree is what runs.
$(SIMSERVER): $(STAMP) pyproject.toml
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(SIMSERVER)

encoder: install
	$(SIMSERVER) encoder build

demo: encoder
	$(SIMSERVER) domain build --demo --missing-only

# --timeout-graceful-shutdown: without it a server with requests in flight may never stop on SIGTERM.
run: demo
	$(VENV)/bin/bentoml serve service:ImageSimilarity --host 127.0.0.1 --port $(PORT) --timeout-graceful-shutdown 20

# Everything: unit, in-process gateway and integration tests (real servers, real models).
test: encoder
	$(PY) -m pytest -q

# Unit and in-process gateway tests only (no server, no TensorFlow model): under a minute.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# A real server on the demo store: latency, throughput and the ratios against the encoder alone.
bench: demo
	$(SIMSERVER) bench http

# The Bento (a .tar.gz archive) and a Docker build context under var/export (see deploy/aws/README.md).
bento: encoder
	$(SIMSERVER) bento export

# *.egg-info: written by `pip install -e .` (setuptools' metadata of the editable install).
clean:
	rm -rf var $(VENV) *.egg-info
