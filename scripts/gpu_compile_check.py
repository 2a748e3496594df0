"""Compiles every Pallas kernel to PTX and cubins for sm_80 and sm_90a on a machine without a GPU.

Each kernel configuration is exported for CUDA with `jax.export`; the Triton IR that Pallas put in
the `__gpu$xla.gpu.triton` custom call's backend config (`ir`, with `num_warps`/`num_stages`) goes
through jaxlib's Triton pipeline (`jax._src.lib.triton.compile`, the same one XLA runs on a GPU
host) to PTX, and ptxas turns the PTX into a cubin and reports registers and spills. Prints one
row per kernel, configuration and architecture; exits 1 on a compile error, on any spill, or on
shared memory above what one block may use on sm_80.

Needs jax[cuda12-local] and nvidia-cuda-nvcc-cu12 (ptxas): run it through
scripts/gpu_compile_check.sh, which builds that environment in .venv-cuda.
"""

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import multiprocessing

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.interpreters import mlir  # noqa: E402
from jax._src.lib import triton  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402

from kernels_pallas import paged_attention, quant_matmul  # noqa: E402

ARCHS = {"sm_80": "8.0", "sm_90a": "9.0"}  # ptxas target -> Triton arch name
SM80_MAX_SMEM_PER_BLOCK = 163 * 1024
TRITON_CALL = "__gpu$xla.gpu.triton"
BF16 = jnp.bfloat16


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def attention_config(num_heads, num_kv_heads, head_dim, page_size=16, num_tokens=256,
                     num_seqs=16, num_pages=1024, max_pages=64, **kernel_args):
    cache = _spec((2, num_kv_heads, num_pages, page_size, head_dim), BF16)
    args = (_spec((num_tokens, num_heads, head_dim), BF16), cache, cache, _spec((), jnp.int32),
            _spec((num_seqs + 1,), jnp.int32), _spec((num_seqs,), jnp.int32),
            _spec((num_seqs, max_pages), jnp.int32))
    kernel_args.setdefault("sm_scale", head_dim ** -0.5)

    def fn(*a):
        return paged_attention.ragged_paged_attention(*a, **kernel_args)
    return fn, args


def write_kv_config(num_kv_heads, head_dim, page_size=16, num_tokens=256, **kernel_args):
    cache = _spec((2, num_kv_heads, 1024, page_size, head_dim), BF16)
    new = _spec((num_tokens, num_kv_heads, head_dim), BF16)
    args = (cache, cache, _spec((), jnp.int32), new, new, _spec((num_tokens,), jnp.int32))

    def fn(*a):
        return paged_attention.write_kv(*a, **kernel_args)
    return fn, args


def quant_config(fmt, m, k=4096, n=4096, group_size=0, symmetric=True, **kernel_args):
    w = jnp.zeros((k, n), jnp.float32)  # only the shapes and dtypes of the quantized form matter
    if fmt == "int4":
        weight = quant_matmul.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    elif fmt == "int8":
        weight = quant_matmul.quantize_int8(w, group_size=group_size)
    else:
        weight = quant_matmul.quantize_fp8(w)
    weight = jax.tree.map(lambda a: _spec(a.shape, a.dtype), weight)

    def fn(x, w):
        return quant_matmul.quant_matmul(x, w, **kernel_args)
    return fn, (_spec((m, k), BF16), weight)


# name -> (function, abstract arguments). Model shapes: Llama-3-8B (32/8 heads, 128 dims),
# SmolLM2-135M (9/3, 64), Gemma 3 270M (4/1, 256, sliding window 512).
CONFIGS = {
    "attention llama8b": attention_config(32, 8, 128),
    "attention llama8b m64": attention_config(32, 8, 128, block_m=64),
    "attention llama8b kv64": attention_config(32, 8, 128, block_kv=64),
    "attention smollm2": attention_config(9, 3, 64),
    "attention smollm2 m64 kv64": attention_config(9, 3, 64, block_m=64, block_kv=64),
    "attention gemma3 window": attention_config(4, 1, 256, sliding_window=512),
    "attention gemma3 window softcap": attention_config(4, 1, 256, sliding_window=512,
                                                        soft_cap=50.0),
    "attention mha page32": attention_config(8, 8, 128, page_size=32),
    "write_kv d64": write_kv_config(3, 64),
    "write_kv d128": write_kv_config(8, 128),
    "write_kv d256": write_kv_config(1, 256),
    "int8 m16": quant_config("int8", 16),
    "int8 m256": quant_config("int8", 256),
    "int8 m256 warps8": quant_config("int8", 256, num_warps=8),
    "int8 g32 m16": quant_config("int8", 16, group_size=32),
    "int4 sym g32 m16": quant_config("int4", 16, group_size=32),
    "int4 sym g32 m256": quant_config("int4", 256, group_size=32),
    "int4 asym g64 m16": quant_config("int4", 16, group_size=64, symmetric=False),
    "int4 asym g128 m256": quant_config("int4", 256, group_size=128, symmetric=False),
    "int4 sym g128 m256 n128 warps8": quant_config("int4", 256, group_size=128, block_n=128,
                                                   num_warps=8),
    "fp8 m16": quant_config("fp8", 16),
    "fp8 m256": quant_config("fp8", 256),
}


def export(fn, args):
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)


def triton_calls(module_text):
    """The Triton kernels of an exported module: [(name, ir bytes, num_warps, num_stages)]."""
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if (child.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL):
                        config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                        calls.append((ir.StringAttr(config["name"]).value,
                                      ir.StringAttr(config["ir"]).value_bytes,
                                      ir.IntegerAttr(config["num_warps"]).value,
                                      ir.IntegerAttr(config["num_stages"]).value))
                    walk(child.operation)

    with mlir.make_ir_context():
        walk(ir.Module.parse(module_text).operation)
    return calls


def ptxas_path():
    import nvidia.cuda_nvcc
    return os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")


def _init_worker():
    jax.devices()  # initializing the CUDA plugin registers its Triton compilation handler


def compile_cubin(ttir, arch, num_warps, num_stages):
    """TTIR -> PTX (Triton) -> cubin (ptxas). Returns registers, smem bytes, spill bytes."""
    result = triton.compile("cuda", ttir, ARCHS[arch], num_warps=num_warps, num_ctas=1,
                            num_stages=num_stages)
    with tempfile.TemporaryDirectory() as workdir:
        ptx = os.path.join(workdir, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(result.asm)
        proc = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", ptx, "-o", ptx + ".cubin"],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed:\n{proc.stderr}")
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr))
    # Triton kernels use dynamic shared memory only; ptxas reports static smem, Triton the rest.
    static_smem = re.search(r"(\d+) bytes smem", proc.stderr)
    smem = result.smem_bytes + (int(static_smem.group(1)) if static_smem else 0)
    return registers, smem, spills


def _new_pool():
    # Triton aborts the process on some errors (an LLVM ERROR): compile in a worker that may die.
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)


def check(name, fn, args, pool):
    """Exports, compiles and prints one configuration. Returns (failures, pool)."""
    try:
        calls = triton_calls(export(fn, args).mlir_module())
        if not calls:
            raise RuntimeError(f"no {TRITON_CALL} custom call in the exported module")
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        print(f"| {name:34} | export FAILED: {type(e).__name__}: {str(e).splitlines()[0]}")
        return 1, pool
    failures = 0
    for _, ttir, num_warps, num_stages in calls:
        for arch in ARCHS:
            try:
                regs, smem, spills = pool.submit(
                    compile_cubin, ttir, arch, num_warps, num_stages).result()
            except BrokenProcessPool:
                print(f"| {name:34} | {arch:6} | compile FAILED: the compiler crashed "
                      "(its message is above)")
                failures, pool = failures + 1, _new_pool()
                continue
            except Exception as e:  # noqa: BLE001
                print(f"| {name:34} | {arch:6} | compile FAILED: {type(e).__name__}: {e}")
                failures += 1
                continue
            problems = (["spills"] if spills else []) + (
                ["smem over the sm_80 limit"] if smem > SM80_MAX_SMEM_PER_BLOCK else [])
            failures += bool(problems)
            print(f"| {name:34} | {arch:6} | {num_warps:5} | {num_stages:6} | {regs:4} | "
                  f"{smem / 1024:7.1f} | {spills:6} |"
                  + (f" FAIL: {', '.join(problems)}" if problems else ""), flush=True)
    return failures, pool


def main():
    header = (f"| {'kernel / configuration':34} | {'arch':6} | warps | stages | regs | smem KB "
              "| spills |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    failures, pool = 0, _new_pool()
    for name, (fn, args) in CONFIGS.items():
        failed, pool = check(name, fn, args, pool)
        failures += failed
    pool.shutdown()
    print(f"\n{failures} failure(s)" if failures else "\nall kernels compiled for " + ", ".join(ARCHS))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
