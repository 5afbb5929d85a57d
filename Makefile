# The common chores. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

# Test processes side by side: most tests wait on real servers, Redis and a browser rather than
# compute, so three fit two cores. Each test module stays in one process (its shared nodes).
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

.PHONY: run test test-fast lint format bench clean

# The service's own dependencies: all `make run` needs.
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(BASE)

# Plus test, lint and benchmark tools.
$(DEV): $(BASE)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(DEV)

## run: apply migrations (SQLite by default), then serve http://127.0.0.1:8000 with daphne and the embedded channel layer
run: $(BASE)
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py serve --host 127.0.0.1 --port 8000

## test: the whole suite (Redis, browser and PostgreSQL tests skip without redis-server / chromium / initdb unless required)
test: $(DEV)
	$(PYTEST)

## test-fast: the suite without the tests marked `slow`, for the edit-and-test loop
test-fast: $(DEV)
	$(PYTEST) -m "not slow"

## lint: ruff (lint + format check) and mypy
lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pingpong project bench/loadgen.py bench/picows_loops.py

format: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: the side-by-side benchmark (see bench/README.md)
bench: $(DEV)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache staticfiles artifacts
