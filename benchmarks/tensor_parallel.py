"""Aggregate output tokens/s at several tensor-parallel sizes on forced host CPU devices.

    .venv/bin/python benchmarks/tensor_parallel.py --sizes 1 3 --concurrency 8 --output-len 64

On a 2-core machine the N "devices" share the same 2 cores: this measures what the split costs
(the all-reduces, each device's smaller kernels, the gathered logits), not a speed-up. Each size
runs in the same process, one engine at a time, `concurrency` requests of `--prompt-len` random
tokens at once (greedy, ignore_eos), tokens/s over the whole `LLM.generate` call, best of `--repeats`.
"""

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, __file__.rsplit("/", 2)[0])

import numpy as np  # noqa: E402

from jaxinfer import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 3])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quantization", default="auto")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 10_000, args.prompt_len).tolist() for _ in range(args.concurrency)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    for size in args.sizes:
        llm = LLM(args.model, tensor_parallel_size=size, quantization=args.quantization,
                  max_num_seqs=args.concurrency, max_model_len=args.prompt_len + args.output_len + 16)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
        print(f"tp {size}: {args.concurrency * args.output_len / best:.1f} output tok/s "
              f"({args.concurrency} requests x {args.output_len} tokens in {best:.2f} s)", flush=True)
        del llm


if __name__ == "__main__":
    main()
