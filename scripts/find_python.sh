#!/usr/bin/env bash
# Prints the path of a Python interpreter of version MIN or newer (MAX or older when given): the
# first of python3, pythonX.Y on PATH, and pyenv's installed versions that runs and fits.
# Usage: scripts/find_python.sh 3.12 [3.13]
set -u
min=$1 max=${2:-}
fits() {
    "$1" -c "import sys; v = sys.version_info[:2]; lo = tuple(map(int, '$min'.split('.')));
hi = tuple(map(int, '${max:-99.99}'.split('.'))); sys.exit(0 if lo <= v <= hi else 1)" 2>/dev/null
}
candidates=(python3 python3.12 python3.13 python3.14 python3.11)
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for dir in "$root"/versions/*/bin; do [ -x "$dir/python3" ] && candidates+=("$dir/python3"); done
for c in "${candidates[@]}"; do
    path=$(command -v "$c" 2>/dev/null) || continue
    if fits "$path"; then
        # A pyenv shim runs whatever version is selected now: print the real interpreter.
        "$path" -c 'import sys; print(sys.executable)'
        exit 0
    fi
done
echo "no Python ${min}${max:+ to $max} found: install one, or pass PYTHON=/path/to/python" >&2
exit 1
