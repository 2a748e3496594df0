"""What structured outputs cost a decode step, as ratios within one run on this machine.

    .venv/bin/python benchmarks/grammar_mask.py [--batch 8] [--repeats 40]

One real decode batch (`--batch` sequences, a few dozen tokens into their answers) is captured from
the engine, then run again and again through three step programs, interleaved call by call in a
shuffled order so the machine's noise falls on all three alike: (a) the step program as it was
before grammar masks (no bitmask input), (b) today's program with an all-ones bitmask (no row
constrained: the unpacking is skipped), (c) today's program with row 0 masked by a JSON schema's
mask. Reports the median time of each and its ratio to (a), and the host's median time to compute
one JSON mask (one per token of a JSON text, each in a new state of the grammar).
"""

import argparse
import random
import statistics
import time

import jax
from flax import nnx

from jaxinfer import LLMEngine, SamplingParams, StructuredOutputsParams
from jaxinfer.runner import MAX_LOGPROBS
from jaxinfer.sampling import sample

SCHEMA = {"type": "object", "required": ["name", "tags"], "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}
JSON_TEXT = '{"name": "Ada Lovelace", "tags": ["mathematician", "writer", "analytical engine"'


def step_without_bitmask(graphdef):
    """The step program before grammar masks: the bitmask argument is unused, so jit drops it."""

    def engine_step(state, k_cache, v_cache, token_ids, positions, meta, sampling, history, num_prompt,
                    token_bitmask):
        model = nnx.merge(graphdef, state)
        logits, k_cache, v_cache = model(token_ids, positions, k_cache, v_cache, meta)
        return sample(logits, sampling, history, num_prompt, MAX_LOGPROBS), k_cache, v_cache

    return jax.jit(engine_step, donate_argnums=(1, 2))


def capture_decode_batch(engine, batch: int):
    """The padded arguments of one decode step of `batch` sequences, 32 tokens into their answers."""
    for i in range(batch):
        engine.add_request(f"Request {i}: tell me a story.",
                           SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(40):
        engine.step()
    captured = []
    run = engine.runner._run
    engine.runner._run = lambda *args: captured.append(args) or run(*args)
    engine.step()
    engine.runner._run = run
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return captured[0]


def timed(runner, program, args) -> float:
    start = time.perf_counter()
    out, runner.k_cache, runner.v_cache = program(runner.state, runner.k_cache, runner.v_cache, *args)
    jax.block_until_ready(out)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    engine = LLMEngine(max_model_len=256, max_num_seqs=args.batch, max_num_batched_tokens=256)
    runner = engine.runner
    batch = capture_decode_batch(engine, args.batch)
    matcher = engine.grammars.matcher(StructuredOutputsParams(json=SCHEMA))
    mask_times = []  # one per token of a JSON text, each in a new grammar state
    for token in engine.tokenizer.encode(JSON_TEXT, add_special_tokens=False):
        start = time.perf_counter()
        bitmask = engine.grammars.token_bitmask([(matcher, 0)], len(batch[-1]))
        mask_times.append(time.perf_counter() - start)
        assert matcher.consume_token(token)
    cases = {"a": (step_without_bitmask(runner.graphdef), batch), "b": (runner._step, batch),
             "c": (runner._step, (*batch[:-1], bitmask))}
    times = {name: [] for name in cases}
    order, shuffle = list(cases), random.Random(0).shuffle
    for _ in range(args.repeats + 2):
        shuffle(order)  # no case always runs right after another
        for name in order:
            program, step_args = cases[name]
            times[name].append(timed(runner, program, step_args))
    base = statistics.median(times["a"][2:])  # the first two calls compile
    labels = {"a": "no bitmask input (before)", "b": "bitmask input, all ones",
              "c": f"row 0 of {args.batch} masked"}
    for name, label in labels.items():
        median = statistics.median(times[name][2:])
        print(f"{label:28s} {median * 1e3:7.2f} ms/step  ratio {median / base:.3f}")
    print(f"{'host: one JSON mask':28s} {statistics.median(mask_times) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
