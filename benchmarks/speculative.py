"""Speculative decoding with n-gram drafts (`--speculative-config '{"method": "ngram", ...}'`) against
plain decoding: batch-1 greedy output tokens per second, the drafts' acceptance rate and the tokens
each step produced, on a workload where drafts hit (code edits: the answer copies most of the
prompt) and one where they rarely do (free text).

    .venv/bin/python benchmarks/speculative.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 3]

Both engines are the default configuration of the same model, warmed up; the two alternate round
by round (ABBA), one request at a time, the same prompts. The outputs are checked equal (greedy
tokens must not change), so a speed-up is for the same text.
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


def run(llm, prompts, max_tokens):
    """(output tokens, seconds, token ids per prompt), one request at a time through the chat template."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    total, seconds, ids = 0, 0.0, []
    for prompt in prompts:
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    options = dict(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=256)
    engines = {"plain": LLM(args.model, **options), "ngram": LLM(args.model, speculative_config=NGRAM, **options)}
    results = {}
    for workload, prompts in (("code edits", EDITS), ("free text", FREE)):
        rates = {name: [] for name in engines}
        outputs = {}
        spec = engines["ngram"].engine
        drafted, accepted = spec.num_draft_tokens, spec.num_accepted_draft_tokens
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                tokens, seconds, ids = run(engines[name], prompts, args.max_tokens)
                rates[name].append(tokens / seconds)
                outputs.setdefault(name, ids)
        same = outputs["plain"] == outputs["ngram"]
        drafted, accepted = spec.num_draft_tokens - drafted, spec.num_accepted_draft_tokens - accepted
        plain, ngram = statistics.median(rates["plain"]), statistics.median(rates["ngram"])
        results[workload] = {"plain_tok_s": rates["plain"], "ngram_tok_s": rates["ngram"], "speedup": ngram / plain,
                             "draft_tokens": drafted, "accepted": accepted,
                             "acceptance_rate": accepted / drafted if drafted else None, "same_tokens": same}
        print(f"{workload}: plain {plain:.1f} tok/s, ngram {ngram:.1f} tok/s (x{ngram / plain:.2f}, medians of "
              f"{args.rounds}; spread plain {min(rates['plain']):.1f}-{max(rates['plain']):.1f}, ngram "
              f"{min(rates['ngram']):.1f}-{max(rates['ngram']):.1f}); drafts {drafted}, accepted {accepted} "
              f"({accepted / drafted if drafted else 0:.0%}); same tokens: {same}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "config": NGRAM, "rounds": args.rounds, "results": results}, f, indent=2)
    return 0 if all(r["same_tokens"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
