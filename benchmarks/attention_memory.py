"""How much of the native attention call is waiting on memory: one layout against two of its variants.

    .venv/bin/python benchmarks/attention_memory.py --seqs 32 --context 500
    .venv/bin/python benchmarks/attention_memory.py --seqs 32 --context 500 --kv-heads 3  # SmolLM2's

Times `kernels_cpu.native.ragged_paged_attention` (one call per layer of a 30-layer float16 cache,
one decode row per sequence, pages scattered over a pool twice the size needed, as
`benchmarks/kernel_ab.py --kernels attention`) in three cases, alternated round by round:
- "scattered": `--kv-heads` KV heads (default 4) of head_dim 64, 3 query heads each (SmolLM2-135M's
  group and head_dim; it has 3 KV heads), the cache as the engine lays it out ([layers, kv_heads,
  pages, page_size, head_dim]: a page of one KV head is 2 KB);
- "heads together": 1 KV head of head_dim 64 x `--kv-heads` with 3 query heads: the same bytes and
  the same multiply-adds per key, with each page's keys (and values) one run, as a layout with a
  page's KV heads side by side would read them (fewer horizontal sums and exponentials: if anything it
  computes less). Only for 2 or 4 KV heads, so that both head sizes are among the kernel's unrolled
  ones (64, 128, 256: 192 would take its generic loop and measure that instead);
- "cached": as "scattered" with every sequence on the same pages, so after the first row they come
  from cache: what the call costs when memory is not waited on.
Medians of `--rounds` rounds of `--reps` calls of every layer, in ms per layer call.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels_cpu import native  # noqa: E402


def attention_case(rng, layers, seqs, context, num_heads, num_kv_heads, head_dim, shared, page_size=16):
    """A jitted function running every layer's attention call on q, and q."""
    pages = -(-context // page_size)
    pool = 2 * seqs * pages
    shape = (layers, num_kv_heads, pool, page_size, head_dim)
    k = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.float16)
    v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.float16)
    tables = rng.permutation(pool)[:seqs * pages].reshape(seqs, pages)
    if shared:
        tables = np.tile(tables[:1], (seqs, 1))
    tables = jnp.asarray(tables, jnp.int32)
    qsl = jnp.arange(seqs + 1, dtype=jnp.int32)
    lens = jnp.full((seqs,), context, jnp.int32)
    q = jnp.asarray(rng.standard_normal((seqs, num_heads, head_dim)), jnp.float32)

    @jax.jit
    def every_layer(q):
        for layer in range(layers):  # each layer's output feeds the next call, so none is skipped
            q = native.ragged_paged_attention(q, k, v, layer, qsl, lens, tables, sm_scale=head_dim ** -0.5)
        return q

    return every_layer, q


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=32, help="sequences, one decode row each")
    parser.add_argument("--context", type=int, default=500, help="keys per sequence")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads of head_dim 64 (SmolLM2: 3)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    native.load()
    rng = np.random.default_rng(0)
    shape = (args.layers, args.seqs, args.context)
    kv = args.kv_heads
    cases = {"scattered": attention_case(rng, *shape, 3 * kv, kv, 64, shared=False),
             "cached": attention_case(rng, *shape, 3 * kv, kv, 64, shared=True)}
    if kv in (2, 4):
        cases["heads together"] = attention_case(rng, *shape, 3, 1, 64 * kv, shared=False)
    times = {name: [] for name in cases}
    for fn, q in cases.values():
        fn(q).block_until_ready()  # compile
    for r in range(args.rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            fn, q = cases[name]
            start = time.perf_counter()
            for _ in range(args.reps):
                fn(q).block_until_ready()
            times[name].append((time.perf_counter() - start) / args.reps / args.layers * 1e3)
    for name, values in times.items():
        print(f"{name:15s} {statistics.median(values):.3f} ms a layer call (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
