"""The server's single-stream decode beside the `LLM` engine's, alternated in one run: host overhead.

    .venv/bin/python benchmarks/host_overhead.py --rounds 8 --json docs/data/host-overhead-cpu.json

What a served stream costs beyond the engine's own step loop (the HTTP server, the engine thread's
hand-off to the event loop, detokenizing, SSE, the client on the same cores) is the gap between the
two. `benchmarks/compare.py` reports the same ratio from measurements minutes apart (the `LLM`
probe runs in its offline phase, the served stream after the serving rounds), so the machine's
drift between the two enters it; here they alternate, round by round, with both processes up and
only one of them working at a time:
- `LLM`: this process's engine (`--max-num-seqs` as the server's, so batch 1 has the same step
  program), one request of a 16-token prompt decoding `--tokens` greedy tokens (`ignore_eos`),
  time per token after the first;
- served: `server.py` with the same model and flags, one streamed `/v1/completions` request of the
  same shape through benchmarks/serve.py's client (as compare.py's probe: TPOT = (end - first token)
  / (tokens - 1)); and the server's own view, the mean of its inter-token latency histogram
  (`/metrics`) over the round, which leaves the client's side out.
Reports medians with min-max and the ratios served / `LLM` in tokens/s.
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: the client)
from compare import ROOT, cpu_name, git_commit, spread, wait_healthy  # noqa: E402

ITL = re.compile(r'^jaxinfer:inter_token_latency_seconds_(sum|count)\{[^}]*\} ([0-9.e+-]+)$', re.M)


def itl_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's inter-token latency histogram."""
    found = {kind: float(value) for kind, value in ITL.findall(httpx.get(url + "/metrics", timeout=10).text)}
    return found.get("sum", 0.0), found.get("count", 0.0)


def served_round(url: str, model: str, tokens: int, seed: int) -> dict:
    before = itl_totals(url)
    argv = ["--base-url", url, "--model", model, "--quiet", "--seed", str(seed), "--concurrency", "1",
            "--num-requests", "1", "--prompt-len", "16:16", "--output-len", f"{tokens}:{tokens}"]
    result = asyncio.run(serve.run(serve.build_parser().parse_args(argv)))
    if result["failed"] or not result["tpot_ms"]:
        raise RuntimeError(f"the served request failed: {result}")
    after = itl_totals(url)
    server_itl = (after[0] - before[0]) / (after[1] - before[1]) * 1000 if after[1] > before[1] else None
    return {"tpot_ms": result["tpot_ms"]["mean"], "server_itl_ms": server_itl}


def engine_round(llm, tokens: int, rng) -> float:
    """ms per token after the first, one request alone in `llm`'s engine."""
    from jaxinfer import SamplingParams

    engine = llm.engine
    vocab = engine.model_config.vocab_size
    engine.add_request(rng.integers(100, min(vocab, 30000), 16).tolist(),
                       SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            if first is None and n:
                first, first_n = time.perf_counter(), n
    return (time.perf_counter() - first) / (n - first_n) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--quantization", default=None, help="as server.py's (default: the model's default)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--port", type=int, default=8103)
    parser.add_argument("--json")
    args = parser.parse_args()
    flags = ["--model", args.model, "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
             str(args.max_model_len), *(["--quantization", args.quantization] if args.quantization else [])]
    cmd = [sys.executable, "server.py", *flags, "--port", str(args.port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(cmd, cwd=ROOT)
    try:
        from jaxinfer import LLM

        llm = LLM(args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  **({"quantization": args.quantization} if args.quantization else {}))
        wait_healthy(url, server)
        rng = np.random.default_rng(0)
        engine_round(llm, 8, rng)  # first requests pay for lazy set-up on both sides
        served_round(url, args.model, 8, seed=10_000)
        rounds = []
        for r in range(args.rounds):  # ABBA: the engine first in even rounds
            pair = {}
            for side in (("engine", "served") if r % 2 == 0 else ("served", "engine")):
                pair[side] = (engine_round(llm, args.tokens, rng) if side == "engine"
                              else served_round(url, args.model, args.tokens, seed=r))
            rounds.append({"engine_ms": pair["engine"], **pair["served"]})
            print(f"round {r}: LLM {pair['engine']:.2f} ms/token, served TPOT {pair['served']['tpot_ms']:.2f} ms "
                  f"(server's ITL {pair['served']['server_itl_ms'] or 0:.2f} ms)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    engine = spread([1000 / r["engine_ms"] for r in rounds])
    served = spread([1000 / r["tpot_ms"] for r in rounds])
    server_view = spread([1000 / r["server_itl_ms"] for r in rounds if r["server_itl_ms"]])
    per_round = [r["engine_ms"] / r["tpot_ms"] for r in rounds]
    result = {"meta": {"commit": git_commit(), "cpu": cpu_name(), "server_cmd": " ".join(cmd[1:]),
                       "args": vars(args)},
              "rounds": rounds, "engine_tok_s": engine, "served_tok_s": served, "server_itl_tok_s": server_view,
              "served_over_engine": round(served["median"] / engine["median"], 3),
              "served_over_engine_by_round": spread(per_round),
              "server_view_over_engine": round(server_view["median"] / engine["median"], 3) if server_view else None}
    print(f"LLM engine decode {engine['median']:.1f} tok/s ({engine['min']:.1f}-{engine['max']:.1f}); served "
          f"{served['median']:.1f} ({served['min']:.1f}-{served['max']:.1f}); served / LLM "
          f"{result['served_over_engine']} (by round {result['served_over_engine_by_round']['min']}-"
          f"{result['served_over_engine_by_round']['max']}); the server's own inter-token view / LLM "
          f"{result['server_view_over_engine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
