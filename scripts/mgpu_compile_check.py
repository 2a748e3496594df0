"""Compiles the Mosaic GPU quantized matmul (`kernels_pallas.quant_matmul_mgpu`) and ragged paged
attention (`kernels_pallas.ragged_attention_mgpu`) for H100 (sm_90a) without a GPU, and reports each
configuration's registers, spills and shared memory from ptxas.

The devices are compile-only GPUs from `jax.experimental.topologies` (the same target config as
scripts/gpu_compile_check.py); Mosaic GPU lowers the kernel to PTX and runs ptxas on it
(`MOSAIC_GPU_DUMP_PTXAS=1` prints its report). Exits 1 on a compile error or a spill.
Prints two markdown tables (matmul, attention). scripts/gpu_compile_check.sh (`make gpu-compile-check`)
builds .venv-cuda and runs it first; by hand: `.venv-cuda/bin/python scripts/mgpu_compile_check.py [case name ...]`.
"""

import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_dumps import dump_dir  # noqa: E402

DUMP_DIR = dump_dir("jaxinfer-mgpu-compile-")
os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=DUMP_DIR)
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LLVM_DISABLE_SYMBOLIZATION", "1")  # see scripts/gpu_compile_check.sh
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from gpu_compile_check import CARDS  # noqa: E402
from kernels_pallas import quant_matmul_mgpu as qmg  # noqa: E402
from kernels_pallas.quant_matmul import high_rows  # noqa: E402
from kernels_pallas import ragged_attention_mgpu as ram  # noqa: E402

# (name, M, K, N, fmt, group_size, with mins, block options)
CASES = [
    ("int8 decode, swapped", 16, 4096, 4096, "int8", 0, False, dict(block_m=16, swap_ab=True)),
    ("int8 M=64", 64, 4096, 4096, "int8", 0, False, {}),
    ("int8 prefill", 512, 4096, 4096, "int8", 0, False, dict(block_m=128)),
    ("int4 g128 min decode, swapped", 16, 4096, 4096, "int4", 128, True, dict(block_m=16, swap_ab=True)),
    ("int4 g64 min decode, swapped", 16, 4096, 4096, "int4", 64, True, dict(block_m=16, swap_ab=True)),
    ("int4 g32 min decode, swapped", 1, 4096, 4096, "int4", 32, True, dict(block_m=16, swap_ab=True)),
    ("int4 g128 sym decode, swapped", 16, 4096, 4096, "int4", 128, False, dict(block_m=16, swap_ab=True)),
    ("int4 g128 min M=64", 64, 4096, 4096, "int4", 128, True, {}),
    ("int4 g128 min prefill", 512, 4096, 4096, "int4", 128, True, dict(block_m=128)),
    ("int4 g32 min prefill", 512, 4096, 4096, "int4", 32, True, dict(block_m=128)),
    ("int5 g32 sym decode, swapped (GGUF Q5_0)", 1, 4096, 4096, "int5", 32, False, dict(block_m=16, swap_ab=True)),
    ("int5 g32 sym prefill", 512, 4096, 4096, "int5", 32, False, dict(block_m=128)),
    ("int6 g16 sym decode, swapped (GGUF Q6_K)", 16, 4096, 4096, "int6", 16, False, dict(block_m=16, swap_ab=True)),
    ("int6 g16 min decode, swapped (Q4_K + Q6_K)", 16, 4096, 4096, "int6", 16, True, dict(block_m=16, swap_ab=True)),
    ("int6 g16 min prefill (M tiles of 64: default_blocks)", 512, 4096, 4096, "int6", 16, True, dict(block_m=64)),
    ("fp8 decode, swapped", 16, 4096, 4096, "fp8", 0, False, dict(block_m=16, swap_ab=True)),
    ("fp8 prefill", 512, 4096, 4096, "fp8", 0, False, dict(block_m=128)),
]

# (name, num_tokens, num_seqs, max_pages, page_size, head_dim, q heads, kv heads, options): Llama-3-8B's
# attention (32 q heads, 8 kv heads, head_dim 128) first; the window is a traced operand in every case.
ATTENTION_CASES = [
    ("decode 64 seqs, 4K context", 64, 64, 256, 16, 128, 32, 8, {}),
    ("decode 8 seqs, 4K context, split", 8, 8, 256, 16, 128, 32, 8, {}),
    ("prefill 512-token chunk + 3 decodes", 512, 4, 256, 16, 128, 32, 8, {}),
    ("prefill, page 32, block_kv 128", 512, 4, 128, 32, 128, 32, 8, dict(block_kv=128)),
    ("decode, window + soft cap", 64, 64, 256, 16, 128, 32, 8, dict(soft_cap=50.0)),
    ("decode head_dim 64, GQA 4", 64, 64, 256, 16, 64, 32, 8, {}),
    ("prefill head_dim 256, GQA 2, page 32", 512, 4, 128, 32, 256, 16, 8, {}),
]


def spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_case(mesh, m, k, n, fmt, group_size, with_mins, options):
    s = NamedSharding(mesh, PartitionSpec())
    rows = {"int4": k // 2, "int5": k // 2 + high_rows("int5", k), "int6": k // 2 + high_rows("int6", k)}.get(fmt, k)
    groups = k // group_size if group_size else 1
    dtype = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}.get(fmt, jnp.uint8)
    args = [spec((m, k), jnp.bfloat16, s), spec((rows, n), dtype, s),
            spec((groups, n) if group_size else (n,), jnp.float16, s)]
    if with_mins:
        args.append(spec((groups, n), jnp.float16, s))
    f = jax.jit(lambda x, d, sc, *mn: qmg.quant_matmul(x, d, sc, *mn, fmt=fmt, group_size=group_size, **options))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return f.lower(*args).compile()


def compile_attention_case(mesh, num_tokens, num_seqs, max_pages, page_size, head_dim, heads, kv_heads, options):
    s = NamedSharding(mesh, PartitionSpec())
    cache = spec((2, kv_heads, num_seqs * max_pages, page_size, head_dim), jnp.bfloat16, s)
    args = [spec((num_tokens, heads, head_dim), jnp.bfloat16, s), cache, cache, spec((), jnp.int32, s),
            spec((num_seqs + 1,), jnp.int32, s), spec((num_seqs,), jnp.int32, s),
            spec((num_seqs, max_pages), jnp.int32, s), spec((), jnp.int32, s)]
    f = jax.jit(lambda q, k, v, layer, qsl, lens, tables, window: ram.ragged_paged_attention(
        q, k, v, layer, qsl, lens, tables, sm_scale=head_dim ** -0.5, sliding_window=window, **options))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return f.lower(*args).compile()


def ptxas_report(paths):
    """(registers, spill bytes, shared memory bytes) from the files Mosaic GPU dumped for one kernel."""
    text = "".join(open(p).read() for p in paths if p.endswith(".ptxas"))
    resources = "".join(open(p).read() for p in paths if p.endswith(".resources.txt"))
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    smem = int(re.search(r"smem_scratch_bytes=(\d+)", resources).group(1))
    return registers, spills, smem


def main():
    card = CARDS["H100"]
    topology = topologies.get_topology_desc(card.name, "cuda", target_config=card.target_config, topology="1x1x1")
    mesh = Mesh(topology.devices, ("x",))
    failed = False
    print("| case | M x K x N | blocks | registers | spill bytes | shared memory |\n|---|---|---|---|---|---|")
    for name, *case in CASES:
        if len(sys.argv) > 1 and not any(a in name for a in sys.argv[1:]):
            continue
        before = set(glob.glob(os.path.join(DUMP_DIR, "*")))
        m, k, n, fmt, group_size, with_mins, options = case
        try:
            compile_case(mesh, *case)
        except Exception as e:  # noqa: BLE001 - report and go on to the next case
            print(f"| {name} | COMPILE ERROR {type(e).__name__}: {str(e)[:500]} |")
            failed = True
            continue
        registers, spills, smem = ptxas_report(sorted(set(glob.glob(os.path.join(DUMP_DIR, "*"))) - before))
        failed |= spills > 0
        blocks = {**dict(block_m=64, block_n=128, block_k=128), **options}
        print(f"| {name} | {m} x {k} x {n} | {blocks['block_m']}/{blocks['block_n']}/{blocks['block_k']} | "
              f"{registers} | {spills} | {smem / 1024:.1f} KiB |")
    print("\n| case | tokens x seqs, pages x page_size | head_dim, heads/kv heads | block_kv, splits | registers "
          "| spill bytes | shared memory |\n|---|---|---|---|---|---|---|")
    for name, *case in ATTENTION_CASES:
        if len(sys.argv) > 1 and not any(a in name for a in sys.argv[1:]):
            continue
        before = set(glob.glob(os.path.join(DUMP_DIR, "*")))
        num_tokens, num_seqs, max_pages, page_size, head_dim, heads, kv_heads, options = case
        try:
            compile_attention_case(mesh, *case)
        except Exception as e:  # noqa: BLE001 - report and go on to the next case
            print(f"| {name} | COMPILE ERROR {type(e).__name__}: {str(e)[:500]} |")
            failed = True
            continue
        registers, spills, smem = ptxas_report(sorted(set(glob.glob(os.path.join(DUMP_DIR, "*"))) - before))
        failed |= spills > 0
        block_kv = options.get("block_kv", 64)
        splits = ram.default_num_splits(num_tokens, num_seqs, kv_heads, heads // kv_heads, max_pages * page_size,
                                        block_kv)
        print(f"| {name} | {num_tokens} x {num_seqs}, {max_pages} x {page_size} | {head_dim}, {heads}/{kv_heads} | "
              f"{block_kv}, {splits} | {registers} | {spills} | {smem / 1024:.1f} KiB |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
