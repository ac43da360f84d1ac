# fastapi-app — every command a developer or CI needs. Only Python 3.11+ is assumed:
# the first target that needs it creates .venv, installs uv into it and syncs the locked deps.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.synced-stamp
PYTEST_ARGS ?=

.PHONY: help install run migration test test-fast test-deploy test-lab lint fmt typecheck migrate serve stack bench soak fuzz clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null
	$(PY) -m pip install --quiet --disable-pip-version-check "uv>=0.5"

# --inexact keeps uv itself (installed by pip above, not in the lock) in the venv.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --inexact --python $(PY)
	@touch $(STAMP)

install: $(STAMP) ## create .venv with the locked dependencies

run: $(STAMP) ## serve the API on http://127.0.0.1:8000 (embedded PostgreSQL unless DATABASE_URL is set)
	$(PY) -m service dev

serve: $(STAMP) ## run the production server (gunicorn + uvicorn workers) with the current env
	$(PY) -m service serve

migrate: $(STAMP) ## upgrade the schema of DATABASE_MIGRATION_URL / DATABASE_URL to head
	$(PY) -m service migrate

migration: $(STAMP) ## autogenerate a migration: make migration m="add owner index"
	$(PY) -m service make-migration "$(m)"

test: $(STAMP) ## run the whole test suite with coverage (real PostgreSQL, real processes)
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=90 $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit + integration tests only
	$(PY) -m pytest -m "not stack and not deploy and not lab" $(PYTEST_ARGS)

test-deploy: $(STAMP) ## render, lint and validate the chart, manifests, Dockerfile, workflows
	$(PY) -m pytest -m deploy $(PYTEST_ARGS)

test-lab: $(STAMP) ## the failure lab: faults between hosts in network namespaces (root; docs/reliability.md)
	$(PY) -m pytest -m lab -s $(PYTEST_ARGS)

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP) ## format and auto-fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

stack: $(STAMP) ## nginx -> 2 gunicorn instances -> PgBouncer -> PostgreSQL (+ Redis), Ctrl-C stops
	$(PY) -m tests.stack.launcher

bench: $(STAMP) ## load-test the API and its ceilings; prints a table (not a test)
	$(PY) tests/bench/run.py

soak: $(STAMP) ## SOAK_MINUTES of mixed load with worker recycling; slopes, errors, p99 (not a test)
	$(PY) bench/soak.py

fuzz: $(STAMP) ## schemathesis with a larger budget against the running stack
	FUZZ_MAX_EXAMPLES=500 $(PY) -m pytest tests/stack/test_fuzz.py -m stack $(PYTEST_ARGS)

clean: ## remove caches (keeps .venv and .data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
