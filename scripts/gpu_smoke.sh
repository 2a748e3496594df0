#!/usr/bin/env bash
# The GPU smoke run, for any machine with an NVIDIA GPU, from a fresh clone, without network:
#   scripts/gpu_smoke.sh OUTDIR
# It uses the JAX installed there (jax >= 0.11.2 with its CUDA plugin) and installs only our small
# pure-Python dependencies, from wheels kept in scripts/wheels/, when they are missing. Each phase
# of scripts/gpu_smoke.py runs under its own time cap (about 7 minutes in all) and writes a JSON
# file to OUTDIR; docs/GPU.md is updated from those files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_smoke.sh OUTDIR}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1 JAXINFER_NATIVE=0
SITE=$(mktemp -d)
if ! "$PYTHON" -c "import gguf" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" scripts/wheels/*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi || true; git log -1 --format='commit %H %cd' 2>/dev/null || true; } > "$OUT/machine.txt" 2>&1
status=0
for phase in env:30 kernels:60 mosaic:60 engine:75 speed:75 engine-gguf:75 speed-gguf:45; do
    name=${phase%%:*} cap=${phase##*:}
    echo "== $name (at most ${cap}s)"
    timeout "$cap" "$PYTHON" scripts/gpu_smoke.py "$OUT" --phase "$name" 2>&1 | tee "$OUT/$name.log" | cut -c1-400
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "{\"error\": \"timed out after ${cap}s\"}" > "$OUT/$name.json"
    [ "$rc" = 0 ] || status=1
done
exit $status
