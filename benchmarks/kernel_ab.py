"""The native CPU matmuls of this checkout against those of another git revision, in one process.

    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 --rows 1 8 32
    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 --kernels attention --rows 8 32 --context 500
    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 --kernels attention --rows 1 --context 2000 \
        --attention-heads 4,1,256  # Gemma 3 270M's heads

End-to-end timings on a shared 2-core VM drift by 10-20% between runs, more than most kernel
changes are worth. This builds the kernels of `--base` (`git show` of kernels_cpu's sources, the
flags of kernels_cpu/native.py), registers them beside this checkout's under other names, and times
the two alternately on the same inputs: stacks of `--layers` random weights too big for the caches
(SmolLM2-135M's projection shapes by default), the matmul of each layer in turn, as a decode step
reads them; medians of `--reps` calls each. Both builds get the same layouts, so a change of layout
cannot be measured this way. It also says whether the two give the same outputs bit for bit (a
change meant to keep the arithmetic should).

`--base HEAD` (the same code on both sides) gives the noise floor: on this VM, with 15 reps, the
totals over the four shapes came within 1% of 1.00 while single shapes moved up to 12% (with 5 reps
a 0.2 ms shape moved 25%): read the totals, and run an A/A first.
"""

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels_cpu import native  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "base_"


def build_base(revision: str, out_dir: Path) -> Path:
    """Compiles `revision`'s kernels_cpu into out_dir and registers its targets as base_<name>."""
    src = out_dir / "kernels_cpu"
    src.mkdir(parents=True)
    for path in (*native.SOURCES, *native.HEADERS):
        relative = path.relative_to(ROOT).as_posix()
        shown = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:  # a header added since is not in an older revision, nor included by it
            (src / path.name).write_text(shown.stdout)
    library = out_dir / "base.so"
    cmd = [native._compiler(), *native.FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{out_dir}",
           *(str(src / p.name) for p in native.SOURCES), "-o", str(library), "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True)
    loaded = ctypes.cdll.LoadLibrary(str(library))
    for target, symbol in native.TARGETS.items():
        if hasattr(loaded, symbol):  # an older revision may lack a kernel added since
            jax.ffi.register_ffi_target(PREFIX + target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    return library


@contextlib.contextmanager
def base_targets():
    """While tracing: native's wrappers call the base build's targets."""
    call = jax.ffi.ffi_call
    with mock.patch.object(jax.ffi, "ffi_call", lambda name, *a, **k: call(PREFIX + name, *a, **k)):
        yield


def weights(kernel: str, rng, layers: int, k: int, n: int):
    """(matmul(x, layer), bytes of one layer) for random weights of `kernel`'s format."""
    if kernel in ("fp8", "fp8_g128"):  # the float path, e4m3 codes (no NaN: 0x7f, 0xff); g128: FP8 blocks
        codes = rng.integers(0, 254, (layers, k, n), dtype=np.uint8)
        codes = np.where(codes >= 0x7f, codes + 1, codes).astype(np.uint8)
        data = native.to_blocked(jnp.asarray(codes.view(jnp.float8_e4m3fn)))
        group = 128 if kernel == "fp8_g128" else 0
        scales = jnp.asarray(rng.uniform(1e-3, 1e-2, (layers, k // 128, n) if group else (layers, n)), jnp.float16)
        return (lambda x, layer: native.int8_matmul(x, data, scales, layer, group_size=group)), k * n
    if kernel in ("int8", "int8_float"):  # int8_float: the float path (the blocked layout)
        data = jnp.asarray(rng.integers(-127, 128, (layers, k, n)), jnp.int8)
        scales = jnp.asarray(rng.uniform(1e-3, 1e-2, (layers, n)), jnp.float16)
        w = native.to_vnni(data) if kernel == "int8" and native.has_integer_path() else native.to_blocked(data)
        return (lambda x, layer: native.int8_matmul(x, w, scales, layer)), k * n
    if kernel in KQUANTS:
        return kquant_weights(KQUANTS[kernel], rng, layers, k, n)
    bits = {"q8_0": 8, "q4_1": 4}[kernel]
    raw = rng.integers(0, 256 if bits == 8 else 16, (layers, k, n))
    data = jnp.asarray(raw - 128 if bits == 8 else raw[:, 0::2] | raw[:, 1::2] << 4, jnp.int8 if bits == 8 else jnp.uint8)
    codes = native.to_group_codes(data, bits)
    scales = jnp.asarray(rng.uniform(1e-3, 1e-2, (layers, k // 32, n)), jnp.float16)
    mins = jnp.asarray(rng.uniform(-0.1, 0, (layers, k // 32, n)), jnp.float16) if bits == 4 else None
    return (lambda x, layer: native.group_matmul(x, codes, scales, mins, layer, bits=bits)), k * n * bits // 8


KQUANTS = {"q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K", "q5_0": "Q5_0"}  # run by kquant_matmul.cc
# Where a block's float16 factors lie: (byte offset, bytes): d and dmin, Q6_K's d at its end, Q5_0's d.
FACTOR_BYTES = {"Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 2), "Q5_0": (0, 2)}


def kquant_weights(kind: str, rng, layers: int, k: int, n: int):
    """A stack of random blocks of a K-quant (or Q5_0) as `jaxinfer.kquant` lays them out (the
    float16 factors set to values of a real model's range: random bytes there would be inf or NaN)."""
    from jaxinfer import kquant

    block_bytes = kquant.BLOCK_BYTES[kind]
    block_rows = 256 if kind.endswith("_K") else 32
    at, size = FACTOR_BYTES[kind]
    layer_blocks = []
    for _ in range(layers):
        raw = rng.integers(0, 256, (n, k // block_rows, block_bytes), dtype=np.uint8)
        factors = rng.uniform(1e-4, 2e-3, (n, k // block_rows, 2)).astype(np.float16).view(np.uint8)
        raw[..., at:at + size] = factors[..., :size]
        layer_blocks.append((kind, kquant.pack_layer(kquant.decode_blocks(raw.reshape(n, -1), kind), kind)))
    data, index = kquant.stack_layers(layer_blocks)
    data, index = jnp.asarray(data), jnp.asarray(index)
    return (lambda x, layer: native.kquant_matmul(x, data, index, layer, n=n)), data.nbytes // layers


def attention_case(rng, layers: int, seqs: int, context: int, query_rows: int, page_size: int = 16,
                   heads=(9, 3, 64)):
    """(attention(q, layer), q, bytes of one layer's keys and values read) for `seqs` sequences of
    `context` tokens, each with its last `query_rows` as queries (1: decode rows), `heads` (query
    heads, KV heads, head_dim; SmolLM2-135M's 9, 3, 64 by default) over a float16 cache whose pages lie
    scattered over a pool twice the size needed, as a server's do after a while."""
    num_heads, num_kv_heads, head_dim = heads
    pages = -(-context // page_size)
    pool = 2 * seqs * pages
    shape = (layers, num_kv_heads, pool, page_size, head_dim)
    k = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.float16)
    v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.float16)
    tables = jnp.asarray(rng.permutation(pool)[:seqs * pages].reshape(seqs, pages), jnp.int32)
    qsl = jnp.arange(seqs + 1, dtype=jnp.int32) * query_rows
    lens = jnp.full((seqs,), context, jnp.int32)
    q = jnp.asarray(rng.standard_normal((seqs * query_rows, num_heads, head_dim)), jnp.float32)
    fn = lambda q, layer: native.ragged_paged_attention(q, k, v, layer, qsl, lens, tables,  # noqa: E731
                                                        sm_scale=head_dim ** -0.5)
    return fn, q, seqs * context * num_kv_heads * head_dim * 2 * 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git revision to compare this checkout with")
    parser.add_argument("--kernels", nargs="+", default=["int8", "q4_1", "q8_0"],
                        choices=["int8", "int8_float", "fp8", "fp8_g128", "q4_1", "q8_0", *KQUANTS, "attention"],
                        help="attention: paged_attention.cc, --rows sequences of --context tokens")
    parser.add_argument("--context", type=int, default=500, help="attention: tokens per sequence")
    parser.add_argument("--query-rows", type=int, default=1,
                        help="attention: query rows per sequence (1: decode; more: a prefill chunk)")
    parser.add_argument("--attention-heads", default="9,3,64",
                        help="attention: query heads, KV heads, head_dim (SmolLM2-135M's; Gemma 3 270M: 4,1,256)")
    parser.add_argument("--shapes", default="576x576,576x1536,1536x576,576x6144", help="KxN,... (SmolLM2-135M's)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    native.load()
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build_base(args.base, Path(tmp))
        for kernel in args.kernels:
            totals = {m: [0.0, 0.0] for m in args.rows}
            shapes = [f"{args.context}x{args.query_rows}"] if kernel == "attention" else args.shapes.split(",")
            for shape in shapes:
                k, n = map(int, shape.split("x"))  # attention: context and query rows
                if kernel != "attention":
                    matmul, layer_bytes = weights(kernel, rng, args.layers, k, n)
                for m in args.rows:
                    if kernel == "attention":
                        matmul, x, layer_bytes = attention_case(
                            rng, args.layers, m, k, n, heads=tuple(map(int, args.attention_heads.split(","))))
                    else:
                        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)

                    def every_layer():  # a new function per side: jit caches its trace per function
                        out = jax.eval_shape(matmul, x, 0)
                        return lambda x: jax.lax.fori_loop(0, args.layers, lambda i, acc: acc + matmul(x, i),
                                                           jnp.zeros(out.shape, jnp.float32))

                    # (until 2026-12-06 both sides jitted one function: the base's trace, made first, was
                    # then reused for ours, and every A/B timed the base build against itself)
                    ours, base = jax.jit(every_layer()), jax.jit(every_layer())
                    with base_targets():
                        want = np.asarray(base(x))  # traced (and compiled) with the base targets
                    got = np.asarray(ours(x))
                    if PREFIX in ours.lower(x).as_text():
                        raise RuntimeError("this checkout's side was traced with the base build's targets")
                    times = {"ours": [], "base": []}
                    for _ in range(args.reps):
                        for name, fn in (("ours", ours), ("base", base)):
                            start = time.perf_counter()
                            fn(x).block_until_ready()
                            times[name].append(time.perf_counter() - start)
                    a, b = (statistics.median(times[name]) for name in ("ours", "base"))
                    totals[m][0] += a
                    totals[m][1] += b
                    row = {"kernel": kernel, "k": k, "n": n, "rows": m, "ours_ms": round(a * 1000, 3),
                           "base_ms": round(b * 1000, 3), "speedup": round(b / a, 3),
                           "identical": bool(np.array_equal(got, want)),
                           "max_abs_diff": float(np.max(np.abs(got - want))),
                           "ours_gb_s": round(args.layers * layer_bytes / a / 1e9, 1)}
                    results.append(row)
                    print(f"{kernel} {k}x{n} rows {m}: ours {row['ours_ms']:.2f} ms, base {row['base_ms']:.2f} ms, "
                          f"speedup {row['speedup']:.3f}, {'identical' if row['identical'] else 'DIFFERENT'}",
                          flush=True)
            for m, (a, b) in totals.items():
                print(f"{kernel} all shapes, rows {m}: speedup {b / a:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
