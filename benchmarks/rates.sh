#!/usr/bin/env bash
# Serving at several Poisson request rates: starts server.py on the bundled model, runs
# benchmarks/serve.py once per rate, appends each report to $OUT (JSON lines), stops the server.
#   bash benchmarks/rates.sh [OUT] [RATES...]     (default: rates.jsonl, rates 0.5 1 2 4)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-rates.jsonl}; shift || true
RATES=${*:-0.5 1 2 4}
PORT=${PORT:-8011}
PY=${PY:-.venv/bin/python}
$PY server.py --port "$PORT" --max-num-seqs 32 --max-model-len 1024 --log-level warning &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 1
done
seed=0
for rate in $RATES; do
  seed=$((seed + 1))  # fresh prompts per rate: a repeat would be served from the prefix cache
  $PY benchmarks/serve.py --base-url "http://127.0.0.1:$PORT" --num-requests 48 --request-rate "$rate" --concurrency 0 \
    --prompt-len 64:192 --output-len 64:64 --seed "$seed" --slo-ttft-ms 2000 --slo-tpot-ms 100 \
    --price-per-hour 0.10 --results-file "$OUT" --quiet
done
$PY - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| request rate (req/s) | completed | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | E2E p50 ms | goodput req/s | $ / 1M output tokens |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['request_rate']} | {r['completed']}/{r['num_requests']} | {r['output_tokens_per_s']:.1f} | "
          f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p99']:.1f} | "
          f"{r['e2e_ms']['p50']:.0f} | {r['goodput_requests_per_s']:.2f} | {r['dollars_per_million_output_tokens']} |")
PYEOF
