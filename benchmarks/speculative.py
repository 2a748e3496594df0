"""Speculative decoding with n-gram drafts (`--speculative-config '{"method": "ngram", ...}'`) and,
with --draft-model, a draft model (`'{"model": ..., "num_speculative_tokens": k}'`), against plain
decoding: batch-1 output tokens per second (greedy, or sampled with seeds: --temperature) and the
drafts' acceptance rate, on a workload
where n-gram drafts hit (code edits: the answer copies most of the prompt) and one where they rarely
do (free text).

    .venv/bin/python benchmarks/speculative.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 3]
    .venv/bin/python benchmarks/speculative.py --model qwen2.5-coder-1.5b-instruct \
        --draft-model qwen2.5-coder-0.5b-instruct --num-speculative-tokens 3

The engines are the default configuration of the same model, warmed up; they alternate round
by round (ABBA), one request at a time, the same prompts. The outputs are checked equal (greedy
tokens, and seeded samples, must not change), so a speed-up is for the same text.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfer import LLM, SamplingParams  # noqa: E402

CODE = '''def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config
'''
EDITS = [  # the answer repeats the code with one change: drafts from the prompt hit
    f"Rename the variable `config` to `settings` in this function and output the whole function:\n\n{CODE}",
    f"Add a docstring to this function and output the whole function:\n\n{CODE}",
    f"Make this function skip lines that start with ';' as well as '#'. Output the whole function:\n\n{CODE}",
]
FREE = [  # free text: little to copy
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List five ideas for a weekend trip and say why each is fun.",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def run(llm, prompts, max_tokens, temperature=0.0):
    """(output tokens, seconds, token ids per prompt), one request at a time through the chat template;
    sampled requests seeded (the prompt's index), so each engine must give the same tokens."""
    total, seconds, ids = 0, 0.0, []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens)
        tokens = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        out = llm.generate([tokens], params, use_tqdm=False)[0].outputs[0]
        seconds += time.perf_counter() - start
        total += len(out.token_ids)
        ids.append(out.token_ids)
    return total, seconds, ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--draft-model", help="also a draft model (e.g. qwen2.5-coder-0.5b-instruct for the 1.5B)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="the draft model's k (default 4)")
    parser.add_argument("--draft-min-probability", type=float, nargs="+", default=[0.0],
                        help="the draft model's draft_min_probability; several: one engine each (default 0)")
    parser.add_argument("--no-ngram", action="store_true", help="leave n-gram drafting out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature, seeded (default 0: greedy)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    options = dict(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=256)
    configs = {} if args.no_ngram else {"ngram": NGRAM}
    for p in args.draft_model and args.draft_min_probability or ():
        configs["draft" if p == 0 else f"draft-p{p:g}"] = {
            "model": args.draft_model, "num_speculative_tokens": args.num_speculative_tokens, "draft_min_probability": p}
    engines = {"plain": LLM(args.model, **options)}
    engines.update({name: LLM(args.model, speculative_config=config, **options) for name, config in configs.items()})
    results = {}
    for workload, prompts in (("code edits", EDITS), ("free text", FREE)):
        rates = {name: [] for name in engines}
        outputs = {}
        before = {name: (engines[name].engine.num_draft_tokens, engines[name].engine.num_accepted_draft_tokens)
                  for name in configs}
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                tokens, seconds, ids = run(engines[name], prompts, args.max_tokens, args.temperature)
                rates[name].append(tokens / seconds)
                outputs.setdefault(name, ids)
        plain = statistics.median(rates["plain"])
        results[workload] = {"plain_tok_s": rates["plain"]}
        line = (f"{workload}: plain {plain:.1f} tok/s ({min(rates['plain']):.1f}-{max(rates['plain']):.1f}, "
                f"medians of {args.rounds})")
        for name in configs:
            engine = engines[name].engine
            drafted = engine.num_draft_tokens - before[name][0]
            accepted = engine.num_accepted_draft_tokens - before[name][1]
            rate, same = statistics.median(rates[name]), outputs[name] == outputs["plain"]
            results[workload][name] = {"tok_s": rates[name], "speedup": rate / plain, "draft_tokens": drafted,
                                       "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None,
                                       "same_tokens": same}
            line += (f"; {name} {rate:.1f} tok/s (x{rate / plain:.2f}, {min(rates[name]):.1f}-{max(rates[name]):.1f}), "
                     f"drafts {drafted}, accepted {accepted} ({accepted / drafted if drafted else 0:.0%}), "
                     f"same tokens: {same}")
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "configs": configs, "rounds": args.rounds, "max_tokens": args.max_tokens,
                       "temperature": args.temperature, "results": results}, f, indent=2)
    return 0 if all(r[name]["same_tokens"] for r in results.values() for name in configs) else 1


if __name__ == "__main__":
    sys.exit(main())
