# Every target creates/uses the local virtual environment in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/pgproxy demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pgproxy tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

bench: $(VENV)/.installed
	$(PY) bench/pgbench_compare.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
