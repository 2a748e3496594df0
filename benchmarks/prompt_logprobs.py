"""What scoring a prompt costs: one prompt with `max_tokens` 1, with and without `prompt_logprobs`,
alternated round by round in one engine (the prefix cache off, so both compute the whole prompt).

    .venv/bin/python benchmarks/prompt_logprobs.py --lengths 128 512 1024 --rounds 4

A scored prompt's chunks are cut to the step's logits rows (max_num_seqs, one row per prompt token),
so it takes about length / (max_num_seqs - 1) steps where a plain prompt takes length /
max_num_batched_tokens. Reports the median seconds of each and their ratio, per length.
"""

import argparse
import json
import statistics
import time

import pydoc_data.topics

from jaxinfer import LLM, SamplingParams


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds after one untimed")
    parser.add_argument("--top", type=int, default=1, help="prompt_logprobs: alternatives per token")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    args = parser.parse_args()
    options = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    llm = LLM(args.model, max_model_len=max(args.lengths) + 16, enable_prefix_caching=False, **options)
    topics = pydoc_data.topics.topics
    text = "".join(topics[name] for name in sorted(topics))
    ids = llm.engine.tokenizer.encode(text)
    cases = {"plain": SamplingParams(temperature=0, max_tokens=1),
             "prompt_logprobs": SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=args.top)}
    results = []
    for length in args.lengths:
        prompt = {"prompt_token_ids": ids[:length]}
        times = {name: [] for name in cases}
        for round_ in range(args.rounds + 1):
            for name, params in (cases.items() if round_ % 2 == 0 else reversed(cases.items())):
                start = time.perf_counter()
                llm.generate([prompt], params, use_tqdm=False)
                if round_:
                    times[name].append(time.perf_counter() - start)
        plain, scored = (statistics.median(times[name]) for name in cases)
        results.append({"length": length, "plain_s": plain, "prompt_logprobs_s": scored, "ratio": scored / plain,
                        "rounds": times})
        print(f"{length} tokens: plain {plain:.3f} s, prompt_logprobs {scored:.3f} s: {scored / plain:.2f}x",
              flush=True)
    print(json.dumps({"model": args.model, "max_num_seqs": llm.engine.config.max_num_seqs, "results": results}))


if __name__ == "__main__":
    main()
