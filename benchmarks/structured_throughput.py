"""Output tokens/s with every request JSON-schema constrained vs none, at 32 concurrent streams.

    .venv/bin/python benchmarks/structured_throughput.py [--model SmolLM2-135M-Instruct] [--concurrency 32]
        [--output-len 64] [--rounds 3]

One engine; each round runs a batch of `concurrency` chat requests twice, unconstrained and with a
JSON schema (an object holding an array of at least 60 short strings, so that no constrained answer
can end before `output-len` tokens), in alternating order round by round so the machine's noise falls
on both alike. Both batches generate exactly concurrency * output-len tokens (the unconstrained ones
ignore EOS). Reports each round's output tok/s and the median ratio. A warm-up batch of each kind
runs first (compiles, the grammar compiled once and cached).
"""

import argparse
import json
import platform
import statistics
import time

from jaxinfer import LLMEngine, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "required": ["fruits"], "properties": {
    "fruits": {"type": "array", "minItems": 60, "items": {"type": "string", "maxLength": 16}}}}
QUESTIONS = ["List fruits as JSON.", "Give me a JSON object with many fruit names.", "Fruits, in JSON please.",
             "Which fruits do you know? Answer in JSON."]


def run_batch(engine, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    generated = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id in ids:
                generated[out.request_id] = len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    return elapsed, sum(generated.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    engine = LLMEngine(args.model, max_num_seqs=args.concurrency, max_model_len=512)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.concurrency)]
    kinds = {
        "none": SamplingParams(temperature=0.8, seed=1, max_tokens=args.output_len, ignore_eos=True),
        "json_schema": SamplingParams(temperature=0.8, seed=1, max_tokens=args.output_len,
                                      structured_outputs=StructuredOutputsParams(json=SCHEMA)),
    }
    print(f"warming up ({args.model}, {args.concurrency} streams, {args.output_len} tokens each)", flush=True)
    for params in kinds.values():
        run_batch(engine, prompts, params)
    rates = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for kind in order:
            elapsed, tokens = run_batch(engine, prompts, kinds[kind])
            assert tokens == args.concurrency * args.output_len, (kind, tokens)
            rates[kind].append(tokens / elapsed)
            print(f"round {r + 1}: {kind:12s} {tokens / elapsed:8.1f} output tok/s ({elapsed:.2f} s)", flush=True)
    ratios = [c / u for c, u in zip(rates["json_schema"], rates["none"])]
    summary = {"model": args.model, "concurrency": args.concurrency, "output_len": args.output_len,
               "machine": platform.processor() or platform.machine(),
               "none_tok_s": [round(x, 1) for x in rates["none"]],
               "json_schema_tok_s": [round(x, 1) for x in rates["json_schema"]],
               "median_ratio": round(statistics.median(ratios), 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
