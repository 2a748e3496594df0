#!/usr/bin/env bash
# Compiles every Pallas kernel to cubins for sm_80 and sm_90a, without a GPU (see
# scripts/gpu_compile_check.py). Builds its own environment, .venv-cuda (jax with the CUDA plugin
# and ptxas, about 1 GB installed), once; later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-cuda
REQUIREMENTS="jax[cuda12-local]==0.10.2 nvidia-cuda-nvcc-cu12==12.9.86"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQUIREMENTS" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086  # the requirements are separate words
    "$VENV/bin/python" -m pip install --quiet $REQUIREMENTS
    echo "$REQUIREMENTS" > "$STAMP"
fi
# There is no GPU (nor driver) here: the CUDA plugin must not insist on one.
export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 TF_CPP_MIN_LOG_LEVEL=3
exec "$VENV/bin/python" scripts/gpu_compile_check.py
