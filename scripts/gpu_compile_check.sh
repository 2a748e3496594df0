#!/usr/bin/env bash
# Compiles the engine's whole step for H100 and A100 without a GPU (scripts/gpu_compile_check.py)
# and writes docs/data/gpu-compile.md; first the Mosaic GPU matmul for sm_90a (scripts/mgpu_compile_check.py,
# docs/data/mgpu-compile.md). Builds its own environment, .venv-cuda (the engine with jax's
# CUDA plugin and ptxas, about 1 GB), once; later runs reuse it. Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/make_venv.sh .venv-cuda -c constraints.txt -e . "jax[cuda12-local]" nvidia-cuda-nvcc-cu12==12.9.86
[ -z "${INSTALL_ONLY:-}" ] || exit 0  # .ci/run: the venv now, the compiles later
# There is no GPU (nor driver) here: the CUDA plugin must not insist on one. LLVM inside the
# compiler captures stack traces it never prints; symbolizing them (a llvm-symbolizer process each,
# about two a second) was most of the compile time: 10 s instead of over 200 s for one configuration.
export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 TF_CPP_MIN_LOG_LEVEL=3 LLVM_DISABLE_SYMBOLIZATION=1
mkdir -p docs/data
# Mosaic GPU prints an empty "Source Location Trace" banner for each kernel it compiles: dropped from
# the log; every other message stays.
quiet() { grep -v -e "Source Location Trace" -e '^$' >&2 || true; }
.venv-cuda/bin/python scripts/mgpu_compile_check.py > docs/data/mgpu-compile.md 2> >(quiet)
cat docs/data/mgpu-compile.md
.venv-cuda/bin/python scripts/gpu_compile_check.py --markdown docs/data/gpu-compile.md "$@" 2> >(quiet)
