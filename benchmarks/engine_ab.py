"""Decode steps of the engine with this checkout's native kernels against another revision's, in one process.

    .venv/bin/python benchmarks/engine_ab.py --base HEAD~1 --seqs 8 32
    .venv/bin/python benchmarks/engine_ab.py --base HEAD~1 --quantization int8 --seqs 8

A change to kernels_cpu moves a whole decode step by a few percent, and two engine processes on this
VM differ by more than that (the same code came out 12.5-16.9 ms a step at 8 sequences, run after
run). This builds `--base`'s kernels beside this checkout's (benchmarks/kernel_ab.py's build_base),
makes two engines on the same model and configuration, the first traced with the base build's FFI
targets, gives both the same `--seqs` prompts and prefills them, then times blocks of decode steps
on each in turn (A B, then B A, ...): medians of the blocks' mean step times, and the ratio. It checks
that each engine's step calls its own build's targets. Only the native kernels differ between the
two sides: a change to the Python engine or the model cannot be measured this way.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernel_ab  # noqa: E402

from jaxinfer import LLMEngine, SamplingParams  # noqa: E402


def calls_base(engine) -> bool:
    """Whether the engine's decode step, as traced, calls the base build's targets."""
    runner = engine.runner
    batch = runner._empty_batch(*runner.padded_shape(1, 1))
    text = runner._step.lower(runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
    return kernel_ab.PREFIX + "jaxinfer" in text


def decoding_engine(args, seqs: int) -> LLMEngine:
    """An engine with `seqs` sequences of --prompt-len random tokens, prefilled and a few steps into decode."""
    engine = LLMEngine(args.model, max_model_len=args.max_model_len, max_num_seqs=max(seqs, 8),
                       **({"quantization": args.quantization} if args.quantization else {}))
    rng = random.Random(0)
    for _ in range(seqs):
        engine.add_request([rng.randrange(1000, 40000) for _ in range(args.prompt_len)],
                           SamplingParams(max_tokens=args.max_model_len - args.prompt_len, temperature=0,
                                          ignore_eos=True))
    while engine.scheduler.waiting or any(seq.num_prefill_tokens_left for seq in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    return engine


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git revision whose kernels are side A")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--quantization", help="the engine's quantization (default: the engine's default)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[8, 32], help="sequences decoding")
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=8, help="blocks of steps per side")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per block (after 2 untimed)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.prompt_len + args.rounds * 2 * (args.steps + 2) + 10 > args.max_model_len:
        parser.error("--max-model-len must hold the prompt and every step of both sides' blocks")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        kernel_ab.build_base(args.base, Path(tmp))
        for seqs in args.seqs:
            with kernel_ab.base_targets():
                base = decoding_engine(args, seqs)
            ours = decoding_engine(args, seqs)
            if not calls_base(base) or calls_base(ours):
                raise RuntimeError("an engine's step was traced with the other side's kernels")
            times = {"base": [], "ours": []}
            for r in range(args.rounds):
                for name in (("base", "ours") if r % 2 == 0 else ("ours", "base")):
                    engine = base if name == "base" else ours
                    for _ in range(2):
                        engine.step()
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        engine.step()
                    times[name].append((time.perf_counter() - start) / args.steps * 1000)
            a, b = statistics.median(times["base"]), statistics.median(times["ours"])
            faster = sum(o < t for o, t in zip(times["ours"], times["base"]))
            results.append({"seqs": seqs, "base_ms": round(a, 2), "ours_ms": round(b, 2), "speedup": round(a / b, 3),
                            "rounds_ours_faster": faster, "base_blocks_ms": [round(x, 2) for x in times["base"]],
                            "ours_blocks_ms": [round(x, 2) for x in times["ours"]]})
            print(f"{seqs} sequences: base {a:.2f} ms, ours {b:.2f} ms a step, speedup {a / b:.3f} "
                  f"(ours faster in {faster} of {args.rounds} rounds)", flush=True)
            del base, ours
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
