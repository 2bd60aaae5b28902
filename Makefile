# Two commands set up everything on a fresh machine:
#   make start   create the environment and run multibot on its embedded defaults
#   make test    create the environment and run lint, type checks and the whole test suite
# Both install the exact versions in requirements.lock; `make lock` refreshes it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
PIP_VERSION := 26.3
# One lock for every Python multibot supports: markers pick per version.
COMPILE := $(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
	--quiet --output-file $(LOCK)

.PHONY: start test lint lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "multibot needs Python 3.11+: set PYTHON=/path/to/python3.11"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'pip==$(PIP_VERSION)'
	$(BIN)/pip install --quiet --constraint $(LOCK) --editable '.[dev]'
	touch $(STAMP)

start: $(STAMP)
	$(BIN)/multibot start

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Three workers (pytest-xdist): each test starts its own servers on free ports. The slow
# tests are collected first and handed out two at a time to whichever worker is free, so
# none starts last.
TEST_WORKERS ?= 3

test: lint
	$(BIN)/pytest --numprocesses $(TEST_WORKERS) --dist load --maxschedchunk 2

# Every dependency at its newest release that pyproject.toml allows; then run `make test`
# and commit requirements.lock only if it passes. `make lock PACKAGE=redis` moves one only.
lock: $(STAMP)
	$(COMPILE) $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)
	$(BIN)/pip install --quiet --constraint $(LOCK) --editable '.[dev]'

bench: $(STAMP)
	$(BIN)/multibot bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
