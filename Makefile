# Each target sets up .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# zennit 0.5.1 beside the 0.4.6 that zennit-crp pins: the suite runs against both
ZENNIT_NEW := .zennit051
JOBS ?= 2

.PHONY: venv test lint demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[crp,cli,test]'
	touch $@

$(ZENNIT_NEW)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(ZENNIT_NEW) zennit==0.5.1
	touch $@

lint: venv
	$(PY) -m ruff check canonizers tests benchmarks scripts

test: venv $(ZENNIT_NEW)/.installed lint
	@echo "== test suite with zennit 0.4.6 (as pinned by zennit-crp)"
	$(PY) -m pytest -n $(JOBS) tests
	@echo "== test suite with zennit 0.5.1"
	PYTHONPATH=$(ZENNIT_NEW) $(PY) -m pytest -n $(JOBS) tests

demo: venv
	$(PY) -m canonizers demo

bench: venv
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) $(ZENNIT_NEW) .pytest_cache .ruff_cache *.egg-info
