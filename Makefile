# The two commands a newcomer needs: `make run` and `make test`. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/shop.yaml

.PHONY: install run test test-unit services lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## Run the bridge on the example config with an embedded Temporal dev server (UI on :8233).
run: install
	$(BIN)/signal-bridge serve --config $(CONFIG)

## Install the services (RabbitMQ, Kafka jars) and run the whole suite against real servers.
test: lint services
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

services:
	bash scripts/install-services.sh

## Architecture contracts (import-linter), ruff, and strict mypy over bridge/, adapters/, dispatcher/.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The bridge as users run it (its own processes) against direct starts: throughput and latency per
## adapter and start mode, scale-out, and a wrk burst; the services run for it and stop after.
## 8 to 10 minutes on 2 cores; a shorter run (3 to 5): make bench BENCH_ARGS=--quick
bench: install services
	$(BIN)/python -m tests.services run -- $(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .signal-bridge .pytest_cache
