# modelyard: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
PRESET ?= presets/default.ini

.PHONY: install browser run test test-reliability lint bench bench-router bench-api bench-scale clean
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

LIBLLAMA_PATCHES := $(wildcard patches/llama-cpp-python/*.patch)
# The pin in pyproject.toml is the one version: the patched build and the benchmark's upstream one follow it.
LLAMA_CPP_PYTHON_VERSION := $(shell sed -n 's/^ *"llama-cpp-python==\([^"]*\)",.*/\1/p' pyproject.toml)

# llama-cpp-python is built from source with modelyard's ggml patches (scripts/build-libllama.sh):
# about 8 minutes on 2 cores the first time, then taken from ~/.cache/modelyard/wheels.
$(STAMP): pyproject.toml scripts/build-libllama.sh $(LIBLLAMA_PATCHES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$$(scripts/build-libllama.sh $(PY) $(LLAMA_CPP_PYTHON_VERSION))"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/modelyard --models-preset $(PRESET) --host $(HOST) --port $(PORT)

# The dashboard test drives Debian's chromium (Playwright's own browser download does not work
# here). Installed when missing and apt can; without it that one test is skipped, saying why.
browser:
	-@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Everything, the reliability suite and the browser test included (a few minutes in all).
test: $(STAMP) browser
	$(PY) -m pytest -q tests

# Only the reliability suite, with the figures it measures printed.
test-reliability: $(STAMP)
	$(PY) -m pytest -q -s tests/reliability

lint: $(STAMP)
	$(VENV)/bin/ruff check router child tests
	$(VENV)/bin/mypy

# llama-cpp-python's server as its users get it: the upstream build, in a virtualenv of its own
# (pip's wheel cache makes that install fast after the first).
$(BENCH_STAMP):
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet 'llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)'
	touch $(BENCH_STAMP)

# Compares modelyard's child, the router, llama-cpp-python's server and (with LLAMA_SERVER_BIN or
# llama-server on PATH) llama.cpp's llama-server on SmolLM2. Takes a few minutes; not part of CI.
# BENCH_ARGS passes flags to bench/compare.py, e.g. BENCH_ARGS="--requests 32".
bench: $(STAMP) $(BENCH_STAMP)
	LLAMA_CPP_PYTHON=$(BENCH_VENV)/bin/python $(PY) bench/compare.py $(BENCH_ARGS)

# What the router adds to a request and whether its event loop stays responsive (a few minutes):
# bench/router_overhead.py (the same child directly and through the router, side by side) and
# bench/router_responsiveness.py (/health latency during loads, polling and a download). Debian's
# wrk drives the throughput part; it is installed when missing and apt can.
bench-router: $(STAMP)
	-@command -v wrk >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(PY) bench/router_overhead.py $(BENCH_ARGS)
	$(PY) bench/router_responsiveness.py

# What a JSON schema costs (bench/constrained_decoding.py: 8 constrained against 8 free requests,
# and llguidance against libllama's grammar sampler per token) and embeddings against llama.cpp's
# llama-server when LLAMA_SERVER_BIN points at it (bench/embeddings.py). About 10 minutes.
# Scale-out: what a front router adds over its node, and two nodes (each pinned to its own core
# with taskset) against one at 16 clients (bench/scale_out.py; a few minutes).
bench-scale: $(STAMP)
	$(PY) bench/scale_out.py $(BENCH_ARGS)

bench-api: $(STAMP)
	$(PY) bench/constrained_decoding.py
	$(PY) bench/embeddings.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
