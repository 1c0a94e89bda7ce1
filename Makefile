# peft_lota developer commands. `make install` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

# torch first: gptqmodel is an sdist whose build imports torch, so it is built against the installed one.
install: $(PY)
	$(PY) -m pip install -q "torch==2.14.1"
	$(PY) -m pip install -q --no-build-isolation "gptqmodel==7.7.0"
	$(PY) -m pip install -q -e ".[test,examples,bench]"

test:
	$(PY) -m pytest -q tests

clean:
	rm -rf build dist *.egg-info .pytest_cache logs
