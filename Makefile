# The README's commands. Each target sets up what it needs: a fresh clone needs only `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Exports the ORCH_* URLs of the brokers that scripts/infra runs.
WITH_ENV := eval "$$(scripts/infra env)" &&

.PHONY: run test lint format infra infra-down status schemas clean

$(BIN)/orchestrator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/orchestrator

infra:
	scripts/infra up

infra-down:
	scripts/infra down

status:
	scripts/infra status

## make run: virtualenv, brokers, then the demo: four tenants sharing the workers, one noisy (live view; Ctrl-C stops)
run: venv infra
	$(WITH_ENV) $(BIN)/orchestrator up --demo --concurrency 8

## make test: virtualenv, brokers, lint and types, then the whole test suite
test: venv infra lint
	$(WITH_ENV) $(BIN)/pytest -ra $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/orchestrator schemas export --check

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schemas: venv
	$(BIN)/orchestrator schemas export

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
