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

.PHONY: run test install encoder demo lint format bench bento deploy-dry-run clean

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt requirements-deploy.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-deploy.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

install: $(STAMP)

encoder: install
	$(PY) scripts/build_encoder.py

demo: encoder
	$(PY) scripts/build_domain.py --demo --missing-only

# --timeout-graceful-shutdown: without it a server with requests in flight may never stop on SIGTERM.
run: demo
	$(VENV)/bin/bentoml serve service:ImageSimilarity --host 127.0.0.1 --port $(PORT) --timeout-graceful-shutdown 20

test: encoder
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: demo
	$(PY) scripts/bench_http.py

# The Bento (.bento archive) and a Docker build context under var/export (see deploy/aws/README.md).
bento: encoder
	$(PY) scripts/export_bento.py

clean:
	rm -rf var $(VENV)
