# Two entry points for a fresh machine (see README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RECOUP := $(VENV)/bin/recoup

.PHONY: install install-extras setup demo test test-fast lint bench

# the core install (what `make demo` needs); the test target adds the extras CI tests (export, lm-eval, ray)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls CUDA packages; --no-compile: Python compiles only the
	# modules it imports, on first import (torch's install alone took 23 s with every file compiled, 9 s without)
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(VENV)/.installed-extras: $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -e '.[test,export,lm-eval,ray]'
	touch $@

install: $(VENV)/.installed

install-extras: $(VENV)/.installed-extras

setup: install
	$(RECOUP) setup

demo: setup
	$(RECOUP) run --out runs/default

test-fast: install-extras
	$(PY) -m pytest -q

test: setup install-extras
	$(PY) -m pytest -q -m "slow or not slow"

# ruff lint + format check (line length 120, configured in pyproject.toml); CI runs it before the tests
lint: install-extras
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
