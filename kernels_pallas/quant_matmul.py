"""Weight-only quantized matmul `x[M, K] @ W[K, N]`: the Pallas kernel (Triton GPU backend) and its
`jax.numpy` reference.

W arrives as its packed arrays (the engine's `jaxinfer.quant.QuantizedWeight` holds them):
- "int8": `data` int8 [K, N], `scales` [N] (per output channel) or [K // group_size, N]:
  w = scale * q.
- "int4": `data` uint8 [K // 2, N], two values per byte: the low nibble is row 2i, the high
  nibble row 2i + 1 (q in 0..15). `scales` and `mins` are [K // group_size, N], one per group of
  `group_size` consecutive rows (32, 64 or 128). Symmetric (`mins` None, GGUF Q4_0):
  w = scale * (q - 8). Asymmetric (GGUF Q4_1): w = scale * q + min.
- "fp8": `data` float8_e4m3fn [K, N], `scales` as for int8: w = scale * q.
The per-channel form (`group_size` 0) applies the scale once to the accumulator, after the dot.

The kernel loads packed tiles and dequantizes them in registers right before the dot,
accumulating in float32: W is never materialised in full precision. int4 tiles are not
interleaved back into [K, N] order: the even and odd rows of W meet the even and odd columns of
x in two dots, so the nibbles need no shuffling. `dequantize_reference` is the specification of
the formats; the reference matmul is that, then one dot.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FORMATS = ("int8", "int4", "fp8")


def unpack_int4(packed):
    """[K // 2, N] uint8 -> [K, N] uint8 in 0..15, low nibble = even row."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], packed.shape[1])


def dequantize_reference(data, scales, mins=None, *, fmt, group_size, dtype=jnp.float32):
    """The full-precision W[K, N] (the reference path; the kernel never builds it)."""
    if fmt == "int4":
        q = unpack_int4(data).astype(jnp.float32)
        if mins is None:
            q = q - 8.0
    else:
        q = data.astype(jnp.float32)
    k, n = q.shape
    if group_size:
        q = q.reshape(k // group_size, group_size, n)
        out = q * scales.astype(jnp.float32)[:, None]
        if mins is not None:
            out = out + mins.astype(jnp.float32)[:, None]
    else:
        out = q * scales.astype(jnp.float32)
    return out.reshape(k, n).astype(dtype)


def quant_matmul_reference(x, data, scales, mins=None, *, fmt, group_size):
    """x: [M, K] -> [M, N] in x's dtype: dequantize W, then one dot accumulating in float32."""
    w = dequantize_reference(data, scales, mins, fmt=fmt, group_size=group_size, dtype=x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Pallas kernel.
# ------------------------------------------------------------------------------------------

def _e4m3_to_float32(w):
    """float8_e4m3fn -> float32 with integer ops (Triton converts fp8 natively only on sm_89+).

    e4m3's 7 exponent-and-mantissa bits, shifted into a float16's, give the value / 2**8 (bias 7
    against 15), subnormals included; float16 subnormals are never flushed. The NaN pattern would
    decode to 480: the quantizers never produce it.
    """
    bits = jax.lax.bitcast_convert_type(w, jnp.uint8).astype(jnp.int32)
    half_bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    half = jax.lax.bitcast_convert_type(half_bits.astype(jnp.uint16), jnp.float16)
    return half.astype(jnp.float32) * 256.0


def _quant_matmul_kernel(x_ref, data_ref, scales_ref, *rest, fmt, group_size, block_m, block_n,
                         block_k):
    mins_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    m, k = x_ref.shape
    n = o_ref.shape[1]
    rows = pl.program_id(0) * block_m + jnp.arange(block_m, dtype=jnp.int32)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n, dtype=jnp.int32)
    row_ok, col_ok = rows < m, cols < n
    rows_in, cols_in = jnp.minimum(rows, m - 1)[:, None], jnp.minimum(cols, n - 1)[None, :]
    dtype = x_ref.dtype

    def load_x(ks):  # [block_m, len(ks)] columns ks of x, zero outside
        ok = row_ok[:, None] & (ks < k)[None, :]
        return plgpu.load(x_ref.at[rows_in, jnp.minimum(ks, k - 1)[None, :]], mask=ok, other=0)

    def load_w(w_ref, w_rows, num_rows):  # [len(w_rows), block_n] of a [num_rows, N] array
        ok = (w_rows < num_rows)[:, None] & col_ok[None, :]
        zero = jnp.zeros((), w_ref.dtype)  # typed: Triton cannot cast a literal to float8
        return plgpu.load(w_ref.at[jnp.minimum(w_rows, num_rows - 1)[:, None], cols_in],
                          mask=ok, other=zero)

    def group_row(ref, first_k):  # [1, block_n]: the scale (or min) row of the group of first_k
        return plgpu.load(ref.at[first_k // group_size, cols_in], mask=col_ok[None, :], other=0
                          ).astype(jnp.float32)

    def body(i, acc):
        first_k = i * block_k
        if fmt == "int4":
            pairs = first_k // 2 + jnp.arange(block_k // 2, dtype=jnp.int32)
            packed = load_w(data_ref, pairs, k // 2).astype(jnp.int32)  # [block_k // 2, block_n]
            scale = group_row(scales_ref, first_k)
            shift = -8.0 * scale if mins_ref is None else group_row(mins_ref, first_k)
            for nibble, q in ((0, packed & 0xF), (1, packed >> 4)):
                w = (q.astype(jnp.float32) * scale + shift).astype(dtype)
                acc += plgpu.dot(load_x(2 * pairs + nibble), w).astype(jnp.float32)
            return acc
        ks = first_k + jnp.arange(block_k, dtype=jnp.int32)
        w = load_w(data_ref, ks, k)  # [block_k, block_n]
        w = _e4m3_to_float32(w) if fmt == "fp8" else w.astype(jnp.float32)
        if group_size:
            w = w * group_row(scales_ref, first_k)
        return acc + plgpu.dot(load_x(ks), w.astype(dtype)).astype(jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
    if fmt != "int4" and not group_size:
        acc = acc * plgpu.load(scales_ref.at[cols_in], mask=col_ok[None, :], other=0).astype(jnp.float32)
    # Masked lanes point past the end: on the GPU they are never stored, and in the interpreter
    # they cannot collide with (and overwrite) a real lane.
    out_rows, out_cols = jnp.where(row_ok, rows, m)[:, None], jnp.where(col_ok, cols, n)[None, :]
    plgpu.store(o_ref.at[out_rows, out_cols], acc.astype(o_ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret"))
def quant_matmul(x, data, scales, mins=None, *, fmt, group_size, block_m=64, block_n=64, block_k=64,
                 num_warps=4, num_stages=3, interpret=False):
    """Pallas version of `quant_matmul_reference`. x: [M, K] -> [M, N] in x's dtype.

    Grid: (M blocks, N blocks); each program walks K `block_k` rows at a time. block_m shrinks
    to the smallest power of two >= M (at least 16, the smallest tensor-core tile); with groups,
    block_k shrinks to divide group_size so that a tile has one scale row.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    m, k = x.shape
    w_rows, n = data.shape
    if (2 * w_rows if fmt == "int4" else w_rows) != k:
        raise ValueError(f"x is [{m}, {k}] but the {fmt} W data is {data.shape}")
    block_m = min(block_m, max(16, _next_power_of_2(m)))
    if group_size:
        block_k = min(block_k, group_size)
        if group_size % block_k:
            raise ValueError(f"block_k={block_k} must divide group_size={group_size}")
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if size != _next_power_of_2(size) or size < 16 or (name == "block_k" and size < 32):
            raise ValueError(f"{name}={size} must be a power of two >= 16 (block_k >= 32)")
    kernel = functools.partial(_quant_matmul_kernel, fmt=fmt, group_size=group_size,
                               block_m=block_m, block_n=block_n, block_k=block_k)
    operands = (x, data, scales) + (() if mins is None else (mins,))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"quant_matmul_{fmt}",
    )(*operands)
