"""Times the XLA path (what the engine runs on CPU) of each kernel against its floor here.

The floor of a kernel is max(bytes it must move / memory bandwidth, flops / matmul throughput),
both measured by this script on this machine: bandwidth with a large array copy, throughput
with a large float32 matmul. Writes a markdown table to docs/KERNELS.md (or --out).

    .venv/bin/python benchmarks/kernels.py
    .venv/bin/python benchmarks/kernels.py --only "M=1, 4096x4096"   # print the matching rows only
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels_cpu import native  # noqa: E402
from jaxinfer.xla_attention import ragged_paged_attention_xla  # noqa: E402
from kernels_pallas import paged_attention as pa  # noqa: E402
from jaxinfer import quant  # noqa: E402

F32 = 4


def timeit(fn, *args, repeats=10):
    """Median seconds of a jitted call (after a warm-up call that compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def memory_bandwidth():
    """Bytes per second of a 512 MiB copy (read + write)."""
    src = np.ones(128 * 2**20, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / min(times)


def matmul_throughput():
    """Flops per second of a 2048^3 float32 matmul."""
    a = jnp.ones((2048, 2048), jnp.float32)
    return 2 * 2048**3 / timeit(jax.jit(jnp.dot), a, a, repeats=5)


def attention_case(name, q_lens, kv_lens, *, num_heads=9, num_kv_heads=3, head_dim=64,
                   page_size=16, implementation=pa.ragged_paged_attention_reference):
    """A batch over distinct pages; the floor reads each sequence's K/V once."""
    rng = np.random.default_rng(0)
    num_seqs = len(q_lens)
    max_pages = -(-max(kv_lens) // page_size)
    num_pages = num_seqs * max_pages
    shape = (1, num_kv_heads, num_pages, page_size, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v_cache = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q = jnp.asarray(rng.standard_normal((sum(q_lens), num_heads, head_dim)), jnp.float32)
    args = (q, k_cache, v_cache, jnp.int32(0),
            jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
            jnp.asarray(kv_lens, jnp.int32),
            jnp.asarray(rng.permutation(num_pages).reshape(num_seqs, max_pages), jnp.int32))
    fn = jax.jit(lambda *a: implementation(*a, sm_scale=head_dim**-0.5))
    kv_bytes = 2 * sum(kv_lens) * num_kv_heads * head_dim * F32
    q_bytes = 2 * q.size * F32  # q in, out
    # Causal: row i of a chunk of q_len over kv_len keys sees kv_len - q_len + i + 1 of them.
    pairs = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(q_lens, kv_lens))
    flops = 4 * pairs * num_heads * head_dim  # QK^T and PV
    return name, fn, args, kv_bytes + q_bytes, flops


def matmul_case(name, fmt, m, k, n, **quant_args):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    if fmt == "f32":
        fn, weight, w_bytes = jax.jit(jnp.dot), w, w.nbytes
    elif fmt.startswith("int8 native"):  # the CPU engine's kernel (kernels_cpu): float or integer path
        q = quant.quantize_int8(w, scale_dtype=jnp.float16)
        weight = ((native.to_vnni if "integer" in fmt else native.to_blocked)(q.data), q.scales)
        fn = jax.jit(lambda x, w: native.int8_matmul(x, *w))
        w_bytes = sum(a.nbytes for a in weight)
    elif fmt.startswith("fp8 native"):  # int8_matmul.cc's float path on e4m3, per channel or per 128 rows
        group = quant_args.get("group_size", 0)
        groups = w.reshape(k // group, group, n) if group else w[None]
        scales = jnp.abs(groups).max(axis=1) / quant.FP8_MAX
        data = (groups / scales[:, None]).astype(jnp.float8_e4m3fn).reshape(k, n)
        weight = (native.to_blocked(data), (scales if group else scales[0]).astype(jnp.float16))
        fn = jax.jit(lambda x, w: native.int8_matmul(x, *w, group_size=group))
        w_bytes = sum(a.nbytes for a in weight)
    elif fmt.startswith("int4 native"):  # group_matmul.cc on int8 activations
        q = quant.quantize_int4(w, symmetric=False, scale_dtype=jnp.float16, **quant_args)
        weight = (native.to_group_codes(q.data, 4), q.scales, q.mins)
        fn = jax.jit(lambda x, w: native.group_matmul(x, *w, bits=4))
        w_bytes = sum(a.nbytes for a in weight)
    else:
        weight = {"int8": quant.quantize_int8, "int4": quant.quantize_int4,
                  "fp8": quant.quantize_fp8}[fmt](w, **quant_args)
        fn = jax.jit(quant.quant_matmul_reference)
        w_bytes = sum(a.nbytes for a in jax.tree.leaves(weight))
    return name, fn, (x, weight), w_bytes + (x.size + m * n) * F32, 2 * m * k * n


def kquant_case(name, kind, m, k, n, layers=28):
    """The native K-quant kernel (`kernels_cpu/kquant_matmul.cc`, GGUF blocks as stored) over a stack
    of `layers` layers of one type, as a decode step streams them (the stack does not fit in the
    caches; one layer would): random blocks, whose values do not change the kernel's time."""
    from jaxinfer import kquant

    rng = np.random.default_rng(0)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    packed = []
    for _ in range(layers):
        raw = rng.integers(0, 256, size=(n, k // kquant.TYPES[kind].block * kquant.BLOCK_BYTES[kind]), dtype=np.uint8)
        blocks = raw.reshape(-1, kquant.BLOCK_BYTES[kind])
        for at in ((208,) if kind == "Q6_K" else (0, 2) if kquant.TYPES[kind].block == kquant.SUPER else (0,)):
            blocks[:, at:at + 2] = half  # d (dmin) a modest float16, as in a real file
        packed.append((kind, kquant.pack_layer(kquant.decode_blocks(raw, kind), kind)))
    data, index = map(jnp.asarray, kquant.stack_layers(packed))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)

    @jax.jit
    def fn(x, data, index):
        def layer(i, acc):
            return acc + native.kquant_matmul(x, data, index, i, n=n)
        return jax.lax.fori_loop(0, layers, layer, jnp.zeros((m, n), jnp.float32))

    return name, fn, (x, data, index), data.nbytes + (x.size + m * n) * F32 * layers, 2 * m * k * n * layers


ATTENTION_BATCHES = {
    "decode, 8 seqs x 1024 keys": ([1] * 8, [1024] * 8),
    "decode, 64 seqs x 256 keys": ([1] * 64, [256] * 64),
    "prefill, 1 chunk of 256": ([256], [256]),
    "prefill, chunk 256 after 768 cached": ([256], [1024]),
    "mixed, 7 decode + chunk 128": ([1] * 7 + [128], [512] * 7 + [128]),
}


def cases():
    # SmolLM2-135M attention (9 heads, 3 kv heads, 64 dims) and MLP (576 -> 1536) shapes; a
    # 4096 x 4096 projection whose f32 weight (64 MB) does not fit in the caches.
    for name, (q_lens, kv_lens) in ATTENTION_BATCHES.items():
        if native.available():
            yield attention_case(f"attention {name}: native", q_lens, kv_lens,
                                 implementation=native.ragged_paged_attention)
        yield attention_case(f"attention {name}: xla chunked", q_lens, kv_lens,
                             implementation=ragged_paged_attention_xla)
        yield attention_case(f"attention {name}: reference", q_lens, kv_lens)
    for m, k, n in ((1, 576, 1536), (64, 576, 1536), (1, 4096, 4096), (64, 4096, 4096)):
        natives = [("int8 native integer", {})] if native.available() and native.has_integer_path() else []
        natives += [("int8 native float", {}), ("fp8 native", {})] if native.available() else []
        if native.available() and k % 128 == 0:  # FP8 checkpoints' blocks; AWQ's and GPTQ's groups
            natives += [("fp8 native", dict(group_size=128))]
            natives += [("int4 native", dict(group_size=128))] if native.has_group_path() else []
        g128 = [("int4", dict(group_size=128))] if k % 128 == 0 else []
        for fmt, quant_args in (("f32", {}), *natives, ("int8", {}),
                                ("int4", dict(group_size=32)), *g128, ("fp8", {})):
            label = fmt + (f" g{quant_args['group_size']}" if quant_args else "")
            yield matmul_case(f"matmul {label}, M={m}, {k}x{n}", fmt, m, k, n, **quant_args)
    if native.available() and native.has_group_path():  # Qwen2.5-Coder-1.5B's / 0.5B's MLP shapes
        for kind, k, n in (("Q4_K", 1536, 8960), ("Q6_K", 8960, 1536), ("Q5_0", 896, 4864)):
            yield kquant_case(f"matmul {kind} native, M=1, {k}x{n}, 28 layers", kind, 1, k, n)


def machine():
    return f"{native.cpu_description()}, jax {jax.__version__} ({jax.default_backend()})"


KEPT_FROM = "\n## "  # docs/KERNELS.md from its first heading on is written by hand


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "KERNELS.md"))
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only the cases whose name contains one of these, print them, write nothing")
    args = parser.parse_args()
    bandwidth, throughput = memory_bandwidth(), matmul_throughput()
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, f32 matmul {throughput / 1e9:.0f} GFLOP/s")
    rows = []
    for name, fn, fn_args, nbytes, flops in cases():
        if args.only and not any(text in name for text in args.only):
            continue
        seconds = timeit(fn, *fn_args)
        floor = max(nbytes / bandwidth, flops / throughput)
        bound = "memory" if nbytes / bandwidth >= flops / throughput else "compute"
        rows.append(f"| {name} | {seconds * 1e3:.3f} | {floor * 1e3:.3f} ({bound}) | "
                    f"{seconds / floor:.1f}x | {nbytes / 1e6:.2f} | {flops / 1e6:.1f} |")
        print(rows[-1], flush=True)
    if args.only:
        return
    text = "\n".join([
        "# Kernels: the CPU path against its floor",
        "",
        "On CPU the engine runs the native kernels of `kernels_cpu/` (C++ as XLA FFI custom calls,",
        "compiled with `-march=native` on first use) for attention, per-channel int8 matmuls and a",
        "GGUF file's blocks as stored (`group_matmul.cc`, `kquant_matmul.cc`),",
        "and each other kernel's `jax.numpy` implementation compiled by XLA (`jaxinfer/ops.py`,",
        "backend \"xla\"; `JAXINFER_NATIVE=0` turns the native kernels off). Floor = max(bytes / memory bandwidth,",
        "flops / f32 matmul throughput), both measured by the script on the same machine.",
        "Attention bytes: each sequence's K and V once, plus q and the output; flops count only",
        "the causal (visible) query-key pairs. Matmul bytes: the weight as stored (scales",
        "included), x and the output. A ratio below 1x means the data stayed in the caches",
        "(the 576 x 1536 weights fit in L3) and the DRAM floor does not apply; the compute floor is",
        "float32 FMA, which the integer path (int8 dot products) can beat.",
        "",
        "Attention: \"native\" is what the engine runs on CPU (`kernels_cpu/paged_attention.cc`: each",
        "row reads its keys and values in place in the page pool, by key tiles, online softmax: below the",
        "table); \"xla chunked\" is",
        "the XLA path without the native kernels (`ragged_paged_attention_xla`: blocks of rows gather",
        "their pages chunk by chunk); \"reference\" is `ragged_paged_attention_reference`.",
        "\"int8 native\" is the engine's CPU matmul (`kernels_cpu/int8_matmul.cc`): \"integer\" (the default)",
        "quantizes x to int8 in blocks of 32 and uses VNNI/AVX2 integer dot products; \"float\" converts",
        "the int8 weight to float32 in registers (never written out); \"fp8 native\" is that float path",
        "on e4m3 weights (per channel, or g128: a scale per 128 rows, FP8 checkpoints' blocks), \"int4",
        "native\" the grouped kernel (`group_matmul.cc`) on int8 activations. The other quantized rows",
        "time `quant_matmul_reference`: XLA on CPU dequantizes the whole weight to f32 before the dot",
        "(no fusion), the path the engine takes only where no native kernel runs the format.",
        "\"Q4_K/Q6_K/Q5_0 native\" is `kernels_cpu/kquant_matmul.cc` on a GGUF file's blocks as stored,",
        "over 28 layers in one call (a decode step's stream of one projection; bytes: the stack, far",
        "past the caches). Their ratios just under 1x are not cache hits: the bandwidth is measured by a",
        "single-threaded copy (NumPy), which two threads reading one stream each can beat.",
        "",
        "The Pallas kernels themselves run on GPU only (interpreted on CPU for tests). Their",
        "registers, shared memory and spills for sm_80 and sm_90a, compiled without a GPU:",
        "`bash scripts/gpu_compile_check.sh`.",
        "",
        f"Machine: {machine()}. Memory bandwidth (copy): {bandwidth / 1e9:.1f} GB/s; "
        f"f32 matmul (2048^3): {throughput / 1e9:.0f} GFLOP/s. Times are medians of 10 calls;",
        "other jobs on the same cores show up as a lower bandwidth and throughput here.",
        "",
        "Command: `.venv/bin/python benchmarks/kernels.py`",
        "",
        "| case | ms | floor ms | ms / floor | MB moved | MFLOP |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    kept = ""  # the hand-written sections below the table survive a rerun
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = f.read()
        kept = old[old.index(KEPT_FROM):] if KEPT_FROM in old else ""
    with open(args.out, "w") as f:
        f.write(text + ("\n" + kept if kept else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
