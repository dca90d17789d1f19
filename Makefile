# Each target sets up .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# zennit 0.5.1 and 1.0.0 beside the 0.4.6 that zennit-crp pins: the suite runs against all three. zennit 1.0.0
# declares Python >= 3.11.11, which pip enforces even where the code runs (tested on 3.11.7): --ignore-requires-python
ZENNIT_051 := .zennit051
ZENNIT_100 := .zennit100
# LXT 2.1, the reference for transformers, beside the package (it needs transformers<5 and patches torchvision's
# classes for the whole process: the test runs it in a process of its own, with this folder on its path)
LXT := .lxt
JOBS ?= 2

.PHONY: venv test lint docs demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[crp,cli,docs,test]'
	touch $@

$(ZENNIT_051)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(ZENNIT_051) zennit==0.5.1
	touch $@

$(ZENNIT_100)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --ignore-requires-python --target $(ZENNIT_100) zennit==1.0.0
	touch $@

$(LXT)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --target $(LXT) 'transformers<5'
	$(PY) -m pip install -q --no-deps --target $(LXT) lxt==2.1
	touch $@

lint: venv
	$(PY) -m ruff check canonizers tests benchmarks scripts

test: venv $(ZENNIT_051)/.installed $(ZENNIT_100)/.installed $(LXT)/.installed lint
	@echo "== test suite with zennit 0.4.6 (as pinned by zennit-crp)"
	$(PY) -m pytest -n $(JOBS) tests
	@echo "== test suite with zennit 0.5.1 (the documentation and the tests marked once ran above)"
	PYTHONPATH=$(ZENNIT_051) $(PY) -m pytest -n $(JOBS) -m "not once" --ignore=tests/test_docs.py tests
	@echo "== test suite with zennit 1.0.0"
	PYTHONPATH=$(ZENNIT_100) $(PY) -m pytest -n $(JOBS) -m "not once" --ignore=tests/test_docs.py tests

# the documentation, warnings as errors (tests/test_docs.py builds it too)
docs: venv
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

demo: venv
	$(PY) -m canonizers demo

bench: venv
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) $(ZENNIT_051) $(ZENNIT_100) $(LXT) .pytest_cache .ruff_cache *.egg-info docs/_build
