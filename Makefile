VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install lock clean bench

$(PY):
	python3 -m venv $(VENV)

SDK1 := $(VENV)/sdk1

# The official anthropic SDK 2.x is a dev dependency; the tests also drive the 1.x line,
# installed beside it with its own dependencies (PYTHONPATH selects it in a subprocess).
# constraints.txt pins every dependency to the versions of a green run (`make lock` renews it).
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --upgrade --target $(SDK1) 'anthropic>=1.17,<2'
	touch $(STAMP)

install: $(STAMP)

# constraints.txt from the newest releases: a venv of its own, then pip freeze
LOCK_VENV := $(or $(TMPDIR),/tmp)/budgeter-lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

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

# the admission property test unseeded, with many more examples (nightly-style; `make test`
# runs it derandomized): e.g. make test-deep DEEP_EXAMPLES=20000. Without the schemathesis
# plugin, which blanks the arguments of Hypothesis's "Failing test case" report.
DEEP_EXAMPLES ?= 5000
.PHONY: test-deep
test-deep: $(STAMP)
	BUDGETER_HYPOTHESIS_PROFILE=deep BUDGETER_HYPOTHESIS_EXAMPLES=$(DEEP_EXAMPLES) \
		$(PY) -m pytest -q -p no:cacheprovider -p no:schemathesis tests/admission/test_admission_property.py

# every benchmark row, one table (bench/results.md); e.g. make bench BENCH_ARGS="--quick --only admission"
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

# the soak run (issue 7): a steady load for 10 minutes against real processes, then checks
# RSS, Redis memory and connections; writes bench/soak-results.md. Not part of `make test`.
# e.g. make soak SOAK_ARGS="--minutes 1"
.PHONY: soak
soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

# mutation testing (issue 21, docs/mutation.md): every mutant of the .lua scripts
# (tools/mutate_lua.py, minutes), then mutmut over the Python of admission, queue, worker,
# proxy, upstream client and token counter (about an hour at MUTATE_CHILDREN workers).
# Scores per module are printed; the survivors go to mutation-survivors.txt. mutate-ci:
# the Lua part and a sample of the Python part (MUTATE_SAMPLE, mutmut name patterns),
# inside CI's time.
# MUTATE_CHECK=--check fails below 90 % killed in a module (Lua: accepted equivalents left
# out, tools/lua_equivalents.txt); mutate-ci always checks the Lua part.
.PHONY: mutate mutate-lua mutate-py mutate-ci
MUTMUT := SDK1_PATH=$(CURDIR)/$(SDK1) $(VENV)/bin/mutmut
MUTATE_CHECK ?=
MUTATE_SAMPLE ?= 'budgeter.api.proxy.x_retry_after_s__mutmut_*'
# mutmut's workers: its tests mostly wait (on Redis, on timers), so more than the cores pay
MUTATE_CHILDREN ?= 8

mutate: mutate-lua mutate-py

mutate-lua: $(STAMP)
	$(PY) tools/mutate_lua.py $(MUTATE_CHECK) $(MUTATE_LUA_ARGS)

mutate-py: $(STAMP)
	$(MUTMUT) run --max-children $(MUTATE_CHILDREN)
	$(PY) tools/mutmut_report.py $(MUTATE_CHECK)

mutate-ci: $(STAMP)
	$(PY) tools/mutate_lua.py --check $(MUTATE_LUA_ARGS)
	$(MUTMUT) run --max-children 1 $(MUTATE_SAMPLE)
	$(PY) tools/mutmut_report.py $(MUTATE_CHECK)

clean:
	rm -rf $(VENV) .budgeter .pytest_cache
