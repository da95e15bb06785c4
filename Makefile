# Set-up and day-to-day commands. `make run` and `make test` do everything on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where scripts/install_test_tools.sh unpacks the test tools for a developer who is not root.
TOOLS_DIR ?= $(VENV)/tools
# pytest-xdist: workers and how tests are handed out (docs/development.md says why these).
PYTEST_PARALLEL ?= -n 4 --dist loadfile --no-loadscope-reorder

.PHONY: run test test-fast soak test-tools lint check-services init-db bench bench-growth clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

check-services:
	@scripts/check_services.sh

## Create the database if missing and apply init_db.sql (idempotent).
init-db: $(VENV)/.runtime check-services
	$(PY) aggregator.py --init-db

## Run the service against the local RabbitMQ and PostgreSQL (settings: environment or .env).
run: init-db
	$(PY) aggregator.py

## Lint, type-check and run the whole test suite against the local RabbitMQ and PostgreSQL
## (the soak as a 90 s day: `make soak` runs the full one).
test: $(VENV)/.dev check-services test-tools lint
	PATH="$(abspath $(TOOLS_DIR))/bin:$$PATH" $(PY) -m pytest $(PYTEST_PARALLEL)

## The quicker part of the suite: all but the tests marked `ha` (throwaway servers started,
## restarted, killed, failed over) and `slow` (the soak, floods, outages waited out).
test-fast: $(VENV)/.dev check-services
	PATH="$(abspath $(TOOLS_DIR))/bin:$$PATH" $(PY) -m pytest $(PYTEST_PARALLEL) -m "not ha and not slow"

## The soak at election-day length: 150 s of publishing with every fault (tests/test_soak.py, ~4 min).
SOAK_SECONDS ?= 150
soak: $(VENV)/.dev check-services test-tools
	TEST_SOAK_SECONDS=$(SOAK_SECONDS) PATH="$(abspath $(TOOLS_DIR))/bin:$$PATH" $(PY) -m pytest -s tests/test_soak.py

## System tools the tests run: promtool/prometheus, systemd-analyze (with apt-get as root, else under TOOLS_DIR).
test-tools:
	@TOOLS_DIR="$(TOOLS_DIR)" scripts/install_test_tools.sh

## Throughput, latency and memory against the bare-consumer limit (prints one table; see docs/performance.md).
## A shorter run: make bench BENCH_ARGS="--votes 5000 --naive-votes 500 --latency-seconds 2"
BENCH_ARGS ?=
bench: $(VENV)/.runtime check-services
	$(PY) bench/throughput.py $(BENCH_ARGS)

## The service into a database holding 8 M votes against an empty one, each PostgreSQL setting of
## docs/performance.md#sizing-postgresql-for-8-million-votes with and without; as root (it starts a
## throwaway PostgreSQL server on a free port), about 30 minutes on 2 cores.
## A quick run: make bench-growth GROWTH_ARGS="--stored 500000 --votes 30000 --warmup 30000 --profiles default,recommended"
GROWTH_ARGS ?= --profiles default,shared_buffers,checkpoints,wal_compression,recommended
bench-growth: $(VENV)/.dev check-services
	$(PY) bench/growth.py $(GROWTH_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
