# peft_lota developer commands. `make install` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install test demo bench-smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

# torch first: gptqmodel is an sdist whose build imports torch, so it is built against the installed one.
# The stamp makes `make demo` on an installed checkout skip straight to the job.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q "torch==2.14.1"
	$(PY) -m pip install -q --no-build-isolation "gptqmodel==7.7.0"
	$(PY) -m pip install -q -e ".[test,examples,bench]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

# Pretrain a small Llama on the stdlib, GPTQ it to 2 bits, fine-tune with LoTA (stock Trainer), merge,
# save, reload and check; prints the result table. Cached in demo_out/ (delete it to start over).
demo: install
	$(PY) examples/demo.py --root demo_out

# The benchmarks' smoke presets (~1 min; CI runs them): every part runs, the numbers mean nothing.
# Models and results go to build/bench-smoke, not to benchmarks/results. Full presets: benchmarks/README.md.
SMOKE := build/bench-smoke
bench-smoke: install
	$(PY) benchmarks/bench_accuracy.py --preset smoke --root $(SMOKE)/models --out $(SMOKE)
	$(PY) benchmarks/bench_speed.py --preset smoke --work-dir $(SMOKE)/models --out $(SMOKE)

clean:
	rm -rf build dist *.egg-info .pytest_cache logs
