"""Offline throughput: `LLM.generate` over N prompts, and decode tokens/s by weight format at batch
1, 8 and 32 next to each format's memory roofline.

    .venv/bin/python benchmarks/offline.py --formats none int8 native fp8 --concurrency 1 8 32 \\
        --plot docs/img/formats-roofline.png --json results.jsonl

Part 1 generates `--num-prompts` random-token prompts (greedy, ignore_eos, fixed lengths) with one
`LLM.generate` call in the default format and reports requests/s and tokens/s.

Part 2, for each format: one engine (quantization=<format>; the LM head as `auto` gives it), then
`concurrency` requests at once, decode tokens/s measured after the first token, best of `--repeats`
runs with the formats interleaved (the 2-core machine is shared: a slow run is noise). The memory
roofline is bandwidth / (bytes of weights on device) x concurrency: every decode step streams all
weights once (the LM head included), and the bandwidth is measured here (a jitted sum over a
512 MB float32 array). KV-cache reads are left out (small at these lengths); at large batches a
step is bound by compute instead, so the roofline there is an upper bound, not a target.
"""

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.throughput import run  # noqa: E402
from jaxinfer import LLM, LLMEngine, SamplingParams  # noqa: E402


def read_bandwidth(nbytes=512 << 20, repeats=5) -> float:
    """Bytes/s of a jitted streaming read (a sum) over a float32 array of `nbytes`."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def generate_throughput(args, rng) -> dict:
    llm = LLM(args.model, max_model_len=args.prompt_len + args.output_len + 32, max_num_seqs=32)
    vocab = llm.engine.model_config.vocab_size
    prompts = [rng.integers(100, vocab, args.prompt_len).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # every program is compiled at warm-up; touch them
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"part": "generate", "quantization": llm.engine.quantization, "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len, "output_len": args.output_len, "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(args.num_prompts / elapsed, 2),
            "output_tokens_per_s": round(generated / elapsed, 1),
            "total_tokens_per_s": round((generated + args.num_prompts * args.prompt_len) / elapsed, 1)}


def plot(rows, bandwidth, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = list(dict.fromkeys(r["format"] for r in rows))
    concurrency = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, len(concurrency), figsize=(4.2 * len(concurrency), 3.8), squeeze=False)
    for ax, c in zip(axes[0], concurrency):
        at = {r["format"]: r for r in rows if r["concurrency"] == c}
        xs = np.arange(len(formats))
        ax.bar(xs, [at[f]["decode_tokens_per_s"] for f in formats], color="tab:blue", label="measured")
        ax.scatter(xs, [at[f]["roofline_tokens_per_s"] for f in formats], marker="_", s=900, color="tab:red",
                   label="memory roofline", zorder=3)
        ax.set_xticks(xs, [f"{f}\n{at[f]['weight_mb']:.0f} MB" for f in formats], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"batch {c}")
        ax.set_ylabel("decode tokens/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Decode tokens/s by weight format ({bandwidth / 1e9:.0f} GB/s measured read bandwidth)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=64, help="part 1: prompts in one LLM.generate call")
    parser.add_argument("--formats", nargs="+", default=["none", "int8", "native", "fp8"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-generate", action="store_true", help="part 2 only")
    parser.add_argument("--plot", help="write the tokens/s-by-format figure here (PNG)")
    parser.add_argument("--json", help="append every result to this JSON-lines file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth()
    machine = f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})"
    print(f"# {args.model} on {machine}, measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = []
    if not args.skip_generate:
        r = generate_throughput(args, rng)
        results.append(r)
        print(f"\nLLM.generate, {r['num_prompts']} prompts of {r['prompt_len']} tokens -> {r['output_len']} "
              f"tokens ({r['quantization']}): {r['elapsed_s']} s, {r['requests_per_s']} requests/s, "
              f"{r['output_tokens_per_s']} output tokens/s, {r['total_tokens_per_s']} total tokens/s\n")

    engines = {}
    for fmt in args.formats:
        engines[fmt] = LLMEngine(args.model, quantization=fmt, max_model_len=args.prompt_len + args.output_len + 32,
                                 max_num_seqs=max(args.concurrency), max_num_batched_tokens=256, weight_cache_dir=None)
        run(engines[fmt], 1, args.prompt_len, 4, rng)
    best = {}
    for _ in range(args.repeats):
        for fmt, engine in engines.items():
            for c in args.concurrency:
                r = run(engine, c, args.prompt_len, args.output_len, rng)
                best[fmt, c] = max(best.get((fmt, c), 0), r["decode_tokens_per_s"] or 0)
    print("| format | weights on device | by dtype/format | batch | decode tok/s | memory roofline tok/s | of roofline |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for fmt, engine in engines.items():
        by_format = engine.weight_bytes_by_format
        total = sum(by_format.values())
        parts = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in by_format.items())
        for c in args.concurrency:
            roofline = bandwidth / total * c
            rows.append({"part": "format", "format": fmt, "concurrency": c, "weight_mb": total / 1e6,
                         "decode_tokens_per_s": best[fmt, c], "roofline_tokens_per_s": round(roofline, 1),
                         "bandwidth_gb_s": round(bandwidth / 1e9, 2), "machine": machine})
            print(f"| {fmt} | {total / 1e6:.0f} MB | {parts} | {c} | {best[fmt, c]} | {roofline:.0f} | "
                  f"{best[fmt, c] / roofline:.0%} |", flush=True)
    results += rows
    if args.plot:
        plot(rows, bandwidth, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "model": args.model}) + "\n")


if __name__ == "__main__":
    main()
