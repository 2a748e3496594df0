"""Every Pallas kernel lowers for CUDA on this GPU-less machine.

`jax.export` with platforms=["cuda"] runs the Pallas Triton lowering: a kernel with a
non-power-of-two block, or an op Triton cannot express, fails here as it would on a GPU. The
exported module must hold the Triton custom call. (Compiling that Triton IR on to PTX and cubins
is `scripts/gpu_compile_check.sh`, which needs the CUDA toolchain in its own environment.)
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import paged_attention as pa
from jaxinfer import quant
from kernels_pallas import quant_matmul as qm
from tests.helpers import TRITON_CALL, export_for_cuda


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def attention_args(num_heads, num_kv_heads, head_dim, dtype, page_size=16, num_tokens=64,
                   num_seqs=8):
    cache = spec((4, num_kv_heads, 128, page_size, head_dim), dtype)
    return (spec((num_tokens, num_heads, head_dim), dtype), cache, cache, spec((), jnp.int32),
            spec((num_seqs + 1,), jnp.int32), spec((num_seqs,), jnp.int32),
            spec((num_seqs, 16), jnp.int32))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype,options", [
    (4, 4, 64, jnp.float32, {}),
    (9, 3, 128, jnp.bfloat16, {}),
    (16, 2, 64, jnp.bfloat16, dict(sliding_window=128, soft_cap=30.0)),
    (8, 8, 128, jnp.bfloat16, dict(block_m=64, block_kv=64)),
])
def test_attention_lowers_to_triton(num_heads, num_kv_heads, head_dim, dtype, options):
    exported = export_for_cuda(
        lambda *a: pa.ragged_paged_attention(*a, sm_scale=0.1, **options),
        *attention_args(num_heads, num_kv_heads, head_dim, dtype))
    assert TRITON_CALL in exported.mlir_module()


@pytest.mark.parametrize("num_kv_heads,head_dim,dtype", [(3, 64, jnp.bfloat16),
                                                         (8, 128, jnp.float32)])
def test_write_kv_lowers_to_triton_with_the_cache_aliased(num_kv_heads, head_dim, dtype):
    cache = spec((4, num_kv_heads, 128, 16, head_dim), dtype)
    new = spec((50, num_kv_heads, head_dim), dtype)
    exported = export_for_cuda(pa.write_kv, cache, cache, spec((), jnp.int32), new, new,
                               spec((50,), jnp.int32))
    text = exported.mlir_module()
    assert TRITON_CALL in text
    assert "output_operand_alias" in text  # the caches are updated in place


QUANTIZERS = {
    "int8": lambda w: quant.quantize_int8(w),
    "int8-g32": lambda w: quant.quantize_int8(w, group_size=32),
    "int4-sym-g32": lambda w: quant.quantize_int4(w, group_size=32),
    "int4-asym-g64": lambda w: quant.quantize_int4(w, group_size=64, symmetric=False),
    "int4-sym-g128": lambda w: quant.quantize_int4(w, group_size=128),
    "fp8": lambda w: quant.quantize_fp8(w),
    # GGUF Q5_0 and Q6_K codes as stored (`weights.gguf.group_format`): shapes only, no quantizer
    "int5-sym-g32": lambda w: quant.QuantizedWeight(
        jnp.zeros((256 + qm.high_rows("int5", 512), 384), jnp.uint8), jnp.zeros((16, 384), jnp.float16), None, "int5", 32),
    "int6-asym-g16": lambda w: quant.QuantizedWeight(
        jnp.zeros((256 + qm.high_rows("int6", 512), 384), jnp.uint8), jnp.zeros((32, 384), jnp.float16),
        jnp.zeros((32, 384), jnp.float16), "int6", 16),
}


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quant_matmul_lowers_to_triton(name, m):
    weight = jax.eval_shape(QUANTIZERS[name], spec((512, 384), jnp.float32))
    exported = export_for_cuda(
        lambda x, w: qm.quant_matmul(x, w.data, w.scales, w.mins, fmt=w.format, group_size=w.group_size),
        spec((m, 512), jnp.bfloat16), weight)
    assert TRITON_CALL in exported.mlir_module()


def test_exported_kernel_serializes():
    exported = export_for_cuda(lambda *a: pa.ragged_paged_attention(*a, sm_scale=0.1),
                               *attention_args(8, 2, 64, jnp.bfloat16))
    assert len(exported.serialize()) > 0


def test_non_power_of_two_blocks_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        export_for_cuda(lambda *a: pa.ragged_paged_attention(*a, sm_scale=0.1, block_kv=48),
                        *attention_args(4, 4, 64, jnp.bfloat16))
    with pytest.raises(ValueError, match="power of two"):
        export_for_cuda(lambda *a: pa.ragged_paged_attention(*a, sm_scale=0.1),
                        *attention_args(4, 4, 80, jnp.bfloat16))
