VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean bench

$(PY):
	python3 -m venv $(VENV)

SDK1 := $(VENV)/sdk1

# The official anthropic SDK 2.x is a dev dependency; the tests also drive the 1.x line,
# installed beside it with its own dependencies (PYTHONPATH selects it in a subprocess).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --upgrade --target $(SDK1) 'anthropic>=1.17,<2'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/budgeter demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

# every benchmark row, one table (bench/results.md); e.g. make bench BENCH_ARGS="--quick --only admission"
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

# the soak run (issue 7): a steady load for 10 minutes against real processes, then checks
# RSS, Redis memory and connections; writes bench/soak-results.md. Not part of `make test`.
# e.g. make soak SOAK_ARGS="--minutes 1"
.PHONY: soak
soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .budgeter .pytest_cache
