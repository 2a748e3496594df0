"""A Q4_K_M GGUF on the CPU: its K-quants and Q5_0 blocks kept as stored (`quantization="native"`)
against the same file requantized to int8 per channel (and full precision for perplexity).

    .venv/bin/python benchmarks/kquant.py ~/.cache/jaxinfer/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Batch-1 decode: `LLM.generate` of one prompt, 128 greedy tokens (ignore_eos), timed after one
untimed call; the formats' runs interleaved, best of `--repeats` (the 2-core machine is shared: a
slow run is noise). Perplexity: `jaxinfer.evaluate.perplexity` over windows of pydoc_data.topics,
as tests/test_quant.py measures it.
"""

import argparse
import gc
import sys
import time

import pydoc_data.topics

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from jaxinfer import LLM, SamplingParams  # noqa: E402
from jaxinfer.evaluate import perplexity, token_windows  # noqa: E402


def engine(path, quantization):
    return LLM(path, quantization=quantization, weight_cache_dir=None, warmup=False, max_model_len=1024)


def decode_tokens_per_second(llm, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(["def quicksort(items):"], params, use_tqdm=False)
    return tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows of 256 tokens (0: skip)")
    args = parser.parse_args()
    llms = {q: engine(args.path, q) for q in ("native", "int8")}
    for llm in llms.values():
        decode_tokens_per_second(llm, 8)  # compiles the steps
    best = {q: 0.0 for q in llms}
    for _ in range(args.repeats):
        for q, llm in llms.items():
            best[q] = max(best[q], decode_tokens_per_second(llm, args.tokens))
    for q, llm in llms.items():
        by_format = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in llm.engine.weight_bytes_by_format.items())
        print(f"{q}: batch-1 decode {best[q]:.1f} tok/s (best of {args.repeats}); weights {by_format}")
    if not args.windows:
        return
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    windows = token_windows(llms["native"].tokenizer.encode(text), 256, args.windows)
    for q in ("native", "int8", "none"):
        llm = llms.pop(q, None) or engine(args.path, q)
        print(f"{q}: perplexity {perplexity(llm.engine.model, windows, cache_dtype=llm.engine.kv_cache_dtype):.4f} over {windows.size} tokens")
        del llm
        gc.collect()


if __name__ == "__main__":
    main()
