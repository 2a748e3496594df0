"""Throughput of one workload on a fresh engine and on the same engine after it has served others.

    .venv/bin/python benchmarks/churn.py --concurrency 32 --churn-requests 128

A server that has been up for a while holds a KV pool whose free pages were handed back in whatever
order requests finished. The engine should run a workload as fast then as when it was fresh. This
runs the measured workload (requests sharing a prefix, random suffixes, fixed output length, at most
`--concurrency` in flight) on a fresh engine, then `--churn-requests` other requests at
`--churn-concurrency`, then the measured workload again with new suffixes, and reports output tokens/s
and the step program's time (`ModelRunner._run`) of each measured run and their ratio. Greedy,
ignore_eos. Warm-up compiles happen before timing.
"""

import argparse
import json
import time

import numpy as np

from jaxinfer import LLMEngine, SamplingParams
from kernels_cpu.native import cpu_description


def serve(engine, prompts, concurrency, output_len):
    """Runs `prompts` with at most `concurrency` in flight; returns (output tokens, seconds, step seconds)."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    runner, step_time = engine.runner, [0.0]
    run = runner._run

    def timed(*args):
        start = time.perf_counter()
        try:
            return run(*args)
        finally:
            step_time[0] += time.perf_counter() - start

    runner._run = timed
    pending, tokens = list(prompts), 0
    start = time.perf_counter()
    try:
        while pending or engine.has_unfinished_requests():
            while pending and len(engine.requests) < concurrency:
                engine.add_request(pending.pop(), params)
            tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    finally:
        runner._run = run
    return tokens, time.perf_counter() - start, step_time[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64, help="of the measured workload")
    parser.add_argument("--prefix-len", type=int, default=260, help="tokens every measured prompt starts with")
    parser.add_argument("--suffix-len", default="130:400", help="random tokens after the prefix, min:max")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--churn-requests", type=int, default=128)
    parser.add_argument("--churn-concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    low, high = (int(x) for x in args.suffix_len.split(":"))

    engine = LLMEngine(args.model, max_model_len=args.max_model_len, max_num_seqs=args.concurrency)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(args.seed)
    prefix = rng.integers(100, vocab, args.prefix_len).tolist()

    def prompts(n, shared=True):
        head = prefix if shared else []
        return [head + rng.integers(100, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(n)]

    results = {"model": args.model, "args": vars(args), "cpu": cpu_description(),
               "num_pages": engine.allocator.num_pages}
    for phase in ("fresh", "churn", "after_churn"):
        if phase == "churn":
            work, concurrency = prompts(args.churn_requests, shared=False), args.churn_concurrency
        else:
            work, concurrency = prompts(args.num_requests), args.concurrency
        print(f"{phase}: {len(work)} requests, {concurrency} in flight ...", flush=True)
        tokens, seconds, step_seconds = serve(engine, work, concurrency, args.output_len)
        results[phase] = {"output_tokens": tokens, "seconds": round(seconds, 2), "step_seconds": round(step_seconds, 2),
                          "output_tokens_per_s": round(tokens / seconds, 1)}
        print(f"  {tokens / seconds:.1f} output tok/s, {seconds:.1f} s, step program {step_seconds:.1f} s", flush=True)
    results["after_over_fresh"] = round(results["after_churn"]["output_tokens_per_s"]
                                        / results["fresh"]["output_tokens_per_s"], 3)
    print(f"after churn / fresh: {results['after_over_fresh']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
