"""The Mosaic GPU weight-only matmul (`kernels_pallas.quant_matmul_mgpu`) against the reference.

The reference is `kernels_pallas.quant_matmul.quant_matmul_reference` (dequantize W to x's dtype,
one dot accumulating in float32): the specification of the formats, shared with the Triton kernel.
The kernel runs in Mosaic GPU's interpret mode (`plgpu.InterpretGPUParams`): TMA copies, the
pipeline's barriers, the shared-memory stores of the dequantized tile and wgmma are simulated on
the CPU. The interpreter fills every buffer it allocates, the output included, with NaN before
the kernel runs (`uninitialized_memory="nan"`), so an output tile the kernel never writes fails.

One axis at a time from two small base cases (int8 per channel and int4 g64 with a min, M = 16,
K = 256, N = 128): M 1/16/64/70 (M <= 16 runs the decode variant with swapped operands), int4
groups 32/64/128 in both variants, symmetric int4, grouped int8, fp8 e4m3, N and K with several
blocks. Then the lowering for CUDA (Mosaic GPU's own passes, layout inference included)
on this GPU-less machine; registers and spills need ptxas: scripts/mgpu_compile_check.py.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # the race detector's flag (no public API)
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer import ops, quant
from kernels_pallas import quant_matmul_mgpu as qmg
from kernels_pallas.quant_matmul import high_rows, pack_high_bits, quant_matmul_reference
from tests.helpers import export_for_cuda

BASES = {
    "int8": lambda w: quant.quantize_int8(w),
    "int4-g64-min": lambda w: quant.quantize_int4(w, group_size=64, symmetric=False),
}
# bf16 output: each element is rounded once (relative 2**-9); the kernel and the reference add the
# same bf16 products in float32 in different orders.
TOLERANCE = 2e-3


def random_weight(seed, k, n):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)), jnp.float32)


def check_against_reference(qw, m, **blocks):
    """Blocks: the dispatcher's (`default_blocks`: the swapped decode variant for M <= 16) unless given."""
    k, n = qw.shape
    blocks = blocks or qmg.default_blocks(qw.format, qw.group_size, m, k, n, jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
    out = qmg.quant_matmul(x, qw.data, qw.scales, qw.mins, fmt=qw.format, group_size=qw.group_size,
                           interpret=True, **blocks)
    ref = quant_matmul_reference(x, qw.data, qw.scales, qw.mins, fmt=qw.format, group_size=qw.group_size)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(out).any(), "an output element was never written (still the interpreter's NaN)"
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE


# M <= 16: the decode variant (y^T = W^T x^T, M padded to 16); above: M tiles of 64 (70: two, the
# second padded).
@pytest.mark.parametrize("m", [1, 16, 64, 70])
@pytest.mark.parametrize("base", list(BASES))
def test_matches_reference_over_m(base, m):
    check_against_reference(BASES[base](random_weight(0, 256, 128)), m)


@pytest.mark.parametrize("m", [5, 16])
@pytest.mark.parametrize("base", list(BASES))
def test_small_m_without_swapping_operands(base, m):
    check_against_reference(BASES[base](random_weight(0, 256, 128)), m, block_m=64)


@pytest.mark.parametrize("m", [16, 64])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_with_min_matches_reference_over_group_size(group_size, m):
    # block_k 128: g32 and g64 put 4 and 2 groups in one step (scales selected by row band), g128 one.
    check_against_reference(quant.quantize_int4(random_weight(1, 256, 128), group_size=group_size,
                                                symmetric=False), m)


def test_int4_symmetric_matches_reference():
    check_against_reference(quant.quantize_int4(random_weight(2, 256, 128), group_size=128), 16)


@pytest.mark.parametrize("m", [1, 64])
def test_fp8_matches_reference(m):
    check_against_reference(quant.quantize_fp8(random_weight(9, 256, 128)), m)


def test_int8_grouped_matches_reference():
    check_against_reference(quant.quantize_int8(random_weight(3, 256, 128), group_size=32), 16)


@pytest.mark.parametrize("base", list(BASES))
def test_several_n_blocks(base):
    check_against_reference(BASES[base](random_weight(4, 256, 256)), 16, block_m=16, block_n=64, swap_ab=True)
    check_against_reference(BASES[base](random_weight(4, 256, 256)), 64, block_n=64)


@pytest.mark.parametrize("base", list(BASES))
def test_more_k_steps_than_pipeline_stages(base):
    # K = 512 in blocks of 128: 4 steps through a 2-stage pipeline, with a group of 256 spanning 2 steps.
    qw = BASES[base](random_weight(5, 512, 128))
    check_against_reference(qw, 16)
    check_against_reference(quant.quantize_int4(random_weight(5, 512, 128), group_size=256, symmetric=False), 16)


def high_bit_weight(fmt, group_size, symmetric, k, n, seed):
    """Random int5/int6 codes (GGUF Q5_0/Q6_K's as stored) with a real model's factor range."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** int(fmt[-1]), (k, n))
    scales = jnp.asarray(rng.uniform(1e-3, 2e-2, (k // group_size, n)), jnp.float16)
    mins = None if symmetric else jnp.asarray(rng.uniform(-0.3, 0.0, (k // group_size, n)), jnp.float16)
    return quant.QuantizedWeight(jnp.asarray(pack_high_bits(q, fmt)), scales, mins, fmt, group_size)


# K = 640: 5 steps of 128 through 2 stages, an int5 band of 4 steps and a partial one (an int6 band
# is 2 steps); int6 g16: 8 groups a step; int5 g32: 4.
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("fmt, group_size, symmetric", [("int5", 32, True), ("int5", 32, False),
                                                         ("int6", 16, True), ("int6", 16, False)])
def test_int5_int6_match_reference(fmt, group_size, symmetric, m):
    check_against_reference(high_bit_weight(fmt, group_size, symmetric, 640, 128, seed=m), m)


def test_int6_reads_each_codes_own_high_bits():
    """A single flipped high bit changes its own column's outputs and no other (a band row or run
    read for another step would change many, or none)."""
    qw = high_bit_weight("int6", 16, True, 512, 128, seed=3)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 512)), jnp.bfloat16)
    run = functools.partial(qmg.quant_matmul, fmt="int6", group_size=16, interpret=True,
                            **qmg.default_blocks("int6", 16, 16, 512, 128, jnp.bfloat16))
    flipped = qw.data.at[256 + 64 + 5, 70].set(qw.data[256 + 64 + 5, 70] ^ 0b100000)  # band 1, run 1
    diff = np.abs(np.asarray(run(x, flipped, qw.scales), np.float32) - np.asarray(run(x, qw.data, qw.scales), np.float32))
    assert diff[:, 70].max() > 0 and np.delete(diff, 70, axis=1).max() == 0


def test_pipeline_has_no_data_race_in_the_interpreter():
    # The interpreter's happens-before race detector over TMA copies, barriers and shared memory
    # (4 K steps through 2 stages). It runs wgmma synchronously: a missing wgmma_wait is not caught.
    qw = quant.quantize_int4(random_weight(8, 512, 128), group_size=64, symmetric=False)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((16, 512)), jnp.bfloat16)
    params = plgpu.InterpretGPUParams(detect_races=True)  # jax 0.11.2 has no `on_race`: read the flag
    out = qmg.quant_matmul(x, qw.data, qw.scales, qw.mins, fmt="int4", group_size=64, interpret=params)
    assert not interpret_pallas_call.get_races().races_found
    ref = quant_matmul_reference(x, qw.data, qw.scales, qw.mins, fmt="int4", group_size=64)
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE


def test_refuses_blocks_it_cannot_tile():
    qw = quant.quantize_int4(random_weight(6, 256, 128), group_size=64)
    x = jnp.zeros((16, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k"):
        qmg.quant_matmul(x, qw.data, qw.scales, qw.mins, fmt="int4", group_size=64, block_k=64)
    with pytest.raises(ValueError, match="no 'int2' path"):
        qmg.quant_matmul(x, qw.data, qw.scales, qw.mins, fmt="int2", group_size=64)
    with pytest.raises(ValueError, match="bfloat16"):
        qmg.quant_matmul(x.astype(jnp.float32), qw.data, qw.scales, qw.mins, fmt="int4", group_size=64)


def test_dispatch_picks_the_mosaic_kernel_where_it_applies_and_triton_elsewhere():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, 256)), jnp.bfloat16)
    for qw in (quant.quantize_int4(random_weight(7, 256, 128), group_size=32, symmetric=False),
               quant.quantize_int4(random_weight(7, 256, 96), group_size=32)):  # N = 96: Triton
        out = ops.quant_matmul(x, qw, backend="mosaic_gpu_interpret")
        ref = ops.quant_matmul(x, qw, backend="xla")
        assert out.shape == ref.shape == (2, 3, qw.shape[1])
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE
    assert qmg.default_blocks("int4", 32, 6, 256, 96, jnp.bfloat16) is None
    assert qmg.default_blocks("int4", 128, 512, 4096, 4096, jnp.bfloat16) == dict(block_m=128, block_n=128,
                                                                                   block_k=128)
    assert qmg.default_blocks("int4", 128, 16, 4096, 4096, jnp.bfloat16)["swap_ab"]


def test_dispatch_runs_a_layer_of_a_stack_under_scan():
    # The engine's path: stacked weights [L, ...], the layer index traced by lax.scan, under jit.
    stacked = jax.vmap(lambda w: quant.quantize_int4(w, group_size=64, symmetric=False))(
        jnp.stack([random_weight(10, 256, 128), random_weight(11, 256, 128)]))
    x = jnp.asarray(np.random.default_rng(12).standard_normal((4, 256)), jnp.bfloat16)

    def layers(backend):
        step = lambda c, layer: (c, ops.quant_matmul(x, stacked, backend=backend, layer=layer))  # noqa: E731
        return jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(2))[1])()

    out, ref = np.asarray(layers("mosaic_gpu_interpret"), np.float64), np.asarray(layers("xla"), np.float64)
    assert out.shape == (2, 4, 128)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE


# (fmt, group_size, with mins, M): decode (swapped) and prefill tiles, every int4 group size.
LOWERINGS = [("int8", 0, False, 16), ("int8", 0, False, 256), ("int4", 32, True, 1), ("int4", 64, True, 16),
             ("int4", 128, True, 256), ("int4", 128, False, 16), ("fp8", 0, False, 16), ("fp8", 0, False, 256),
             ("int5", 32, False, 1), ("int5", 32, True, 256), ("int6", 16, False, 16), ("int6", 16, True, 256)]


@pytest.mark.parametrize("fmt,group_size,with_mins,m", LOWERINGS)
def test_lowers_for_cuda_to_one_mosaic_gpu_kernel(fmt, group_size, with_mins, m):
    k, n = 1024, 512
    s = jax.ShapeDtypeStruct
    dtype = {"int4": jnp.uint8, "int5": jnp.uint8, "int6": jnp.uint8, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[fmt]
    rows = {"int4": k // 2, "int5": k // 2 + high_rows("int5", k), "int6": k // 2 + high_rows("int6", k)}.get(fmt, k)
    args = [s((m, k), jnp.bfloat16), s((rows, n), dtype),
            s((k // group_size, n) if group_size else (n,), jnp.float16)]
    if with_mins:
        args.append(s((k // group_size, n), jnp.float16))
    blocks = qmg.default_blocks(fmt, group_size, m, k, n, jnp.bfloat16)
    exported = export_for_cuda(
        lambda x, d, sc, *mn: qmg.quant_matmul(x, d, sc, *mn, fmt=fmt, group_size=group_size, **blocks), *args)
    assert re.findall(r"custom_call @(\w+)", exported.mlir_module()) == ["mosaic_gpu_v2"]
