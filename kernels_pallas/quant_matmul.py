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
- "int5", "int6" (GGUF Q5_0/Q5_1/Q5_K and Q6_K codes as stored): q in 0..31 / 0..63, grouped (16, 32
  or more rows), symmetric (`mins` None: w = scale * (q - 16) / (q - 32)) or with a min. `data`
  uint8 [K // 2 + high_rows(fmt, K), N], K a multiple of 128: first the 4 low bits of every code as
  int4's nibbles, then the high bits (1 for int5, 2 for int6) as a plane of bands of 64 rows. A band
  holds the high bits of `HIGH_SPAN[fmt]` rows of W (512 for int5, 256 for int6), i.e. of
  HIGH_SPAN // 128 runs of 64 nibble rows: nibble row p (W's rows 2p and 2p + 1) is in run
  c = (p % (HIGH_SPAN // 2)) // 64 of band b = p // (HIGH_SPAN // 2), and its high bits are in the
  band's row p % 64 at bit 2 * h * c (row 2p's h bits), then 2 * h * c + h (row 2p + 1's), h the high
  bits per code. Every byte of a full band is used: 5.5 / 6.5 bits a weight with float16 scales in
  groups of 32 (Q5_0's own bits), 7 for Q6_K's groups of 16. The bands are laid out for the Mosaic
  GPU kernel, whose packed tiles are 64 rows: one band row serves the same row of every run.
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
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FORMATS = ("int8", "int4", "fp8", "int5", "int6")
HIGH_BITS = {"int5": 1, "int6": 2}  # bits of a code above its low nibble
HIGH_SPAN = {"int5": 512, "int6": 256}  # rows of W whose high bits one band of 64 plane rows holds
HIGH_BAND = 64
SYMMETRIC_OFFSET = {"int4": 8, "int5": 16, "int6": 32}  # q - offset when there are no mins


def high_rows(fmt, k):
    """Rows of the high-bit plane of an int5/int6 W with K rows (a last band may be partly used)."""
    return -(-k // HIGH_SPAN[fmt]) * HIGH_BAND


def high_position(fmt, pairs):
    """For nibble rows `pairs` (int array): (row of the high-bit plane, bit offset of row 2p's bits)."""
    half = HIGH_SPAN[fmt] // 2
    run = (pairs % half) // HIGH_BAND
    return (pairs // half) * HIGH_BAND + pairs % HIGH_BAND, 2 * HIGH_BITS[fmt] * run


def unpack_int4(packed):
    """[K // 2, N] uint8 -> [K, N] uint8 in 0..15, low nibble = even row."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], packed.shape[1])


def pack_high_bits(q, fmt, xp=np):
    """q [K, N] integer codes in 0..2**bits - 1 (K a multiple of 128) -> int5/int6 `data`: on the
    host (numpy) when weights are loaded, or with `xp=jax.numpy` where the codes may be traced (a
    tensor-parallel split of a packed weight, `jaxinfer.tensor_parallel`; the codes are not checked)."""
    k, n = q.shape
    if k % 128:
        raise ValueError(f"{fmt} needs K a multiple of 128, got {k}")
    if xp is np:
        q = np.asarray(q, np.int64)
        if q.min() < 0 or q.max() >= 1 << (4 + HIGH_BITS[fmt]):
            raise ValueError(f"{fmt} codes must lie in 0..{(1 << (4 + HIGH_BITS[fmt])) - 1}")
    else:
        q = q.astype(jnp.int32)
    h, half = HIGH_BITS[fmt], HIGH_SPAN[fmt] // 2
    runs, bands = half // HIGH_BAND, -(-k // HIGH_SPAN[fmt])
    nibbles = (q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)
    high = xp.pad(xp.stack([q[0::2] >> 4, q[1::2] >> 4]), ((0, 0), (0, bands * half - k // 2), (0, 0)))
    high = high.reshape(2, bands, runs, HIGH_BAND, n)
    shift = xp.asarray(2 * h * np.arange(runs)).reshape(1, runs, 1, 1)
    # each run's bits sit at their own shift: the sum over runs is their bitwise or
    plane = ((high[0] << shift) | (high[1] << (shift + h))).sum(axis=1)  # [bands, 64, N]
    return xp.concatenate([nibbles, plane.reshape(bands * HIGH_BAND, n)]).astype(xp.uint8)


def unpack_high_bits(data, fmt, k):
    """int5/int6 `data` -> codes [K, N] int32."""
    packed = data[:k // 2].astype(jnp.int32)
    row, shift = high_position(fmt, jnp.arange(k // 2))
    band = data[k // 2:].astype(jnp.int32)[row]  # [K // 2, N]
    h = HIGH_BITS[fmt]
    mask = (1 << h) - 1
    low = (packed & 0xF) | (((band >> shift[:, None]) & mask) << 4)
    high = (packed >> 4) | (((band >> (shift + h)[:, None]) & mask) << 4)
    return jnp.stack([low, high], axis=1).reshape(k, data.shape[1])


def weight_rows(data, fmt, scales, group_size):
    """K of W from its packed `data` [rows, N] (and, int5/int6, its grouped `scales`)."""
    if fmt in HIGH_BITS:
        return scales.shape[-2] * group_size
    return 2 * data.shape[-2] if fmt == "int4" else data.shape[-2]


def dequantize_reference(data, scales, mins=None, *, fmt, group_size, dtype=jnp.float32):
    """The full-precision W[K, N] (the reference path; the kernel never builds it)."""
    if fmt == "int4":
        q = unpack_int4(data).astype(jnp.float32)
        if mins is None:
            q = q - 8.0
    elif fmt in HIGH_BITS:
        q = unpack_high_bits(data, fmt, weight_rows(data, fmt, scales, group_size)).astype(jnp.float32)
        if mins is None:
            q = q - SYMMETRIC_OFFSET[fmt]
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

    def group_rows(ref, w_rows):  # [len(w_rows), block_n]: each row's scale (or min), any group size
        return plgpu.load(ref.at[(jnp.minimum(w_rows, k - 1) // group_size)[:, None], cols_in],
                          mask=col_ok[None, :], other=0).astype(jnp.float32)

    def body(i, acc):
        first_k = i * block_k
        if fmt in HIGH_BITS:  # nibbles as int4's, high bits from their band; scales row by row
            pairs = first_k // 2 + jnp.arange(block_k // 2, dtype=jnp.int32)
            packed = load_w(data_ref, pairs, k // 2).astype(jnp.int32)
            row, shift = high_position(fmt, pairs)
            band = load_w(data_ref, jnp.where(pairs < k // 2, k // 2 + row, data_ref.shape[0]),
                          data_ref.shape[0]).astype(jnp.int32)
            h = HIGH_BITS[fmt]
            for nibble, q in ((0, packed & 0xF), (1, packed >> 4)):
                q = q | (((band >> (shift + nibble * h)[:, None]) & ((1 << h) - 1)) << 4)
                scale = group_rows(scales_ref, 2 * pairs + nibble)
                shift_w = (-float(SYMMETRIC_OFFSET[fmt]) * scale if mins_ref is None
                           else group_rows(mins_ref, 2 * pairs + nibble))
                w = (q.astype(jnp.float32) * scale + shift_w).astype(dtype)
                acc += plgpu.dot(load_x(2 * pairs + nibble), w).astype(jnp.float32)
            return acc
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
    n = data.shape[1]
    if fmt in HIGH_BITS:
        if not group_size or k % 128 or data.shape[0] != k // 2 + high_rows(fmt, k) or scales.shape[0] * group_size != k:
            raise ValueError(f"x is [{m}, {k}] but the {fmt} W data is {data.shape} with scales {scales.shape} "
                             f"in groups of {group_size} (K must be a multiple of 128)")
    elif weight_rows(data, fmt, scales, group_size) != k:
        raise ValueError(f"x is [{m}, {k}] but the {fmt} W data is {data.shape}")
    block_m = min(block_m, max(16, _next_power_of_2(m)))
    if group_size and fmt not in HIGH_BITS:  # int5/int6 read a scale per row: any block_k
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
