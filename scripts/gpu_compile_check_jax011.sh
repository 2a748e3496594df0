#!/usr/bin/env bash
# The GPU compile check on the stack of the GPU machines this project is lent: jax/jaxlib 0.11.2 with
# CUDA 13 (jax-cuda13-plugin 0.11.2, ptxas from CUDA 13.0). Without a GPU: the Mosaic GPU kernels for
# sm_90a (scripts/mgpu_compile_check.py, docs/data/mgpu-compile-jax011.md), then the engine's whole
# step (scripts/gpu_compile_check.py, docs/data/gpu-compile-jax011.md) for the bundled SmolLM2 (what
# the GPU smoke script serves), Llama-3-8B on the Mosaic GPU kernels and in a Q4_K_M file's grouped
# formats (int5/int6: the Triton kernels). `--all`: every configuration.
# Builds .venv-cuda011 (about 1 GB) once; later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/make_venv.sh .venv-cuda011 -e . jax==0.11.2 jaxlib==0.11.2 jax-cuda13-plugin==0.11.2 \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88
[ -z "${INSTALL_ONLY:-}" ] || exit 0  # .ci/run: the venv now, the compiles later
export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 TF_CPP_MIN_LOG_LEVEL=3 LLVM_DISABLE_SYMBOLIZATION=1  # gpu_compile_check.sh
py=.venv-cuda011/bin/python
"$py" -c "import jax; assert jax.__version__ == '0.11.2', jax.__version__"
if [ "${1:-}" = "--all" ]; then
    shift
    args=("$@")
else
    # H100 only: the cards these machines have are Hopper (H100/H200)
    args=(--only "SmolLM2-135M native (Q4_1 GGUF)" "Llama-3-8B int4 g128, Mosaic GPU" "Llama-3-8B int8, Mosaic GPU"
          "Llama-3-8B Q4_K_M-like (int5 / int8 g32 / int6 g16)" --cards H100 "$@")
fi
mkdir -p docs/data
# Mosaic GPU 0.11.2 also tries to disassemble each kernel with nvdisasm (not in the CUDA 13.0 wheels): its
# complaint is dropped from the log; every other message stays.
quiet() { grep -v -e "nvdisasm invocation failed" -e "Source Location Trace" -e "mosaic/gpu/dump.cc" -e '^$' >&2 || true; }
"$py" scripts/mgpu_compile_check.py > docs/data/mgpu-compile-jax011.md 2> >(quiet)
cat docs/data/mgpu-compile-jax011.md
"$py" scripts/gpu_compile_check.py --markdown docs/data/gpu-compile-jax011.md "${args[@]}" 2> >(quiet)
