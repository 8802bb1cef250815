# Each target creates or updates .venv itself: on a fresh machine `make demo` / `make test` is all.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedserve-installed
DEMO_ARGS ?=

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test test-slow bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(PY) -m scripts.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@command -v wrk >/dev/null || { echo "benchmarks need wrk: apt-get install -y wrk"; exit 1; }
	nice -n 10 $(PY) -m benchmarks.training.strategies
	nice -n 10 $(PY) -m benchmarks.training.async_vs_sync --slots 20 --device-factor 10
	$(PY) -m benchmarks.aggregation.memory
	$(PY) -m benchmarks.serving.bench
	$(PY) -m benchmarks.serving.train_to_serve
	$(PY) -m benchmarks.scale.clients

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs multirun model_repository .pytest_cache
