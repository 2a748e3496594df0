#!/usr/bin/env bash
# The kernel tests on jax 0.11.2, the JAX the GPU machines we are lent have preinstalled (and cannot
# replace): the other end of pyproject.toml's jax range. Builds .venv-jax011 once. Test files given
# as arguments replace the default set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/make_venv.sh .venv-jax011 -e '.[test]' jax==0.11.2 jaxlib==0.11.2
[ -z "${INSTALL_ONLY:-}" ] || exit 0  # .ci/run: the venv now, the tests later
.venv-jax011/bin/python -c "import jax; assert jax.__version__ == '0.11.2', jax.__version__; print('jax', jax.__version__)"
# The kernels (interpreted Pallas against their references, and their CUDA lowering): what the GPU
# smoke script needs from this JAX. The engine's own tests run once, on the locked jax, in `make test`.
tests=(tests/test_architecture.py tests/test_paged_attention.py tests/test_quant_matmul.py tests/test_quant_matmul_mgpu.py
       tests/test_cuda_lowering.py)
[ $# -gt 0 ] && tests=("$@")
# The native CPU kernels are not what a GPU machine runs: off here, so that this JAX does not build
# its own copy of them (the jaxlib version is part of their key; about 45 s of compiling).
JAXINFER_NATIVE=0 exec .venv-jax011/bin/python -m pytest -q -p no:cacheprovider "${tests[@]}"
