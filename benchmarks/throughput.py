"""Offline engine throughput: aggregate tokens/s with 1, 8 and 32 concurrent requests.

    .venv/bin/python benchmarks/throughput.py --concurrency 1 8 32 --prompt-len 128 --output-len 64

Each run submits `concurrency` requests at once (random token prompts, fixed lengths, ignore_eos;
greedy, or sampled at `--temperature` with `--top-p` and `--top-k`) to one engine and steps it until
all finish. Reports output and total tokens/s, the time to the first token, and decode tokens/s once
every request has its first token (so no prefill is in it). Tokens are counted from the engine's
outputs. Warm-up compiles happen before timing.
"""

import argparse
import json
import platform
import time

import numpy as np

from jaxinfer import LLMEngine, SamplingParams


def run(engine, concurrency, prompt_len, output_len, rng, sampling=None):
    """Tokens counted from what the engine returned, not assumed; "decode tok/s" from the step in which the
    last request got its first token (every prefill done) to the end, over the tokens made in that span."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, **(sampling or {"temperature": 0.0}))
    start = time.perf_counter()
    for _ in range(concurrency):
        engine.add_request(rng.integers(100, vocab, prompt_len).tolist(), params)
    counts = {}  # request id -> tokens so far
    first_token = all_started = None
    tokens_at_all_started = 0
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        for o in outputs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
        started = sum(1 for n in counts.values() if n)
        if first_token is None and started:
            first_token = time.perf_counter()
        if all_started is None and started == concurrency:
            all_started, tokens_at_all_started = time.perf_counter(), sum(counts.values())
    elapsed = time.perf_counter() - start
    generated = sum(counts.values())
    decode_span = elapsed - (all_started - start)
    return {
        "concurrency": concurrency, "prompt_len": prompt_len, "output_len": output_len,
        "elapsed_s": round(elapsed, 3), "steps": steps, "output_tokens": generated,
        "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round((generated + concurrency * prompt_len) / elapsed, 1),
        "time_to_first_token_s": round(first_token - start, 3),
        "decode_tokens_per_s": (round((generated - tokens_at_all_started) / decode_span, 1)
                                if decode_span > 0 and generated > tokens_at_all_started else None),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--quantization", default="auto",
                        help="weight format (auto: a GGUF's own blocks on a CPU with the native grouped kernel)")
    parser.add_argument("--lm-head-quantization", default="auto", help="auto, none, int8 or native")
    parser.add_argument("--no-cpu-integer-matmul", dest="cpu_integer_matmul", action="store_false",
                        help="CPU: float32 activations in the int8 matmul (default: int8 activations)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--json", help="append results to this JSON-lines file")
    args = parser.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    engine = LLMEngine(args.model, max_model_len=args.prompt_len + args.output_len + 64,
                       max_num_seqs=max(args.concurrency), max_num_batched_tokens=args.max_num_batched_tokens,
                       quantization=args.quantization, lm_head_quantization=args.lm_head_quantization,
                       cpu_integer_matmul=args.cpu_integer_matmul)
    rng = np.random.default_rng(0)
    run(engine, 1, args.prompt_len, 4, rng, sampling)  # touch every code path once more after warm-up
    print(f"# {args.model} on {engine.runner.k_cache.devices().pop().platform} ({platform.processor() or platform.machine()}), "
          f"activations {np.dtype(engine.dtype).name}, weights {engine.quantization}, head {engine.lm_head_quantization}; "
          f"temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}")
    print("| concurrency | output tok/s | total tok/s | decode tok/s | TTFT s | steps |")
    print("|---|---|---|---|---|---|")
    for c in args.concurrency:
        r = run(engine, c, args.prompt_len, args.output_len, rng, sampling)
        print(f"| {c} | {r['output_tokens_per_s']} | {r['total_tokens_per_s']} | {r['decode_tokens_per_s']} | "
              f"{r['time_to_first_token_s']} | {r['steps']} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**r, "model": args.model, **sampling}) + "\n")
    assert engine.runner.num_compilations == 0, "a step compiled during the benchmark"


if __name__ == "__main__":
    main()
