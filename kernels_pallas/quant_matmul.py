"""Weight-only quantized matmul `x[M, K] @ W[K, N]`: the formats, their quantizers, the `jax.numpy`
reference (the XLA path on CPU) and the Pallas kernel (Triton GPU backend).

Formats of a `QuantizedWeight` (W is [K, N]: K input features, N output features):
- "int8": `data` int8 [K, N], `scales` [N]: w[k, n] = scales[n] * data[k, n] (symmetric,
  per output channel; GGUF Q8_0 maps onto it with one scale per 32 rows only after
  requantization, so Q8_0 is better stored as int8 groups: see `group_size`).
- "int4": `data` uint8 [K // 2, N], two values per byte: the low nibble is row 2i, the high
  nibble row 2i + 1 (q in 0..15). `scales` and `mins` are [K // group_size, N], one per group of
  `group_size` consecutive rows (32, 64 or 128). Symmetric (`mins` is None, GGUF Q4_0):
  w = scale * (q - 8). Asymmetric (GGUF Q4_1): w = scale * q + min.
- "fp8": `data` float8_e4m3fn [K, N], `scales` [N]: w[k, n] = scales[n] * data[k, n].

int8 and fp8 may also be group-wise (`group_size` > 0, `scales` [K // group_size, N]); the
per-channel form (`group_size` 0) applies the scale once to the accumulator, after the dot.

The kernel loads packed tiles and dequantizes them in registers right before the dot,
accumulating in float32: W is never materialised in full precision. int4 tiles are not
interleaved back into [K, N] order: the even and odd rows of W meet the even and odd columns of
x in two dots, so the nibbles need no shuffling.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FORMATS = ("int8", "int4", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized W[K, N] (see the module docstring for the layouts). A pytree: under
    `lax.scan` over layers a stacked [num_layers, ...] weight slices like any array."""

    data: jax.Array
    scales: jax.Array
    mins: jax.Array | None = None
    format: str = dataclasses.field(default="int8", metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    # "kn": data as above. "blocked" (per-channel int8 on the CPU): data [NB, K, B], each block of B
    # columns contiguous for the native CPU kernel (`kernels_cpu.native.to_blocked`); "vnni": data
    # [NB, K / 4, B, 4] for its integer path (`kernels_cpu.native.to_vnni`).
    layout: str = dataclasses.field(default="kn", metadata=dict(static=True))

    @property
    def stacked(self) -> bool:
        """Whether this is a stack of weights (a leading layer axis)."""
        return self.scales.ndim > (2 if self.group_size else 1)

    @property
    def shape(self):
        if self.layout == "blocked":
            return (self.data.shape[-2], self.scales.shape[-1])
        if self.layout == "vnni":
            return (self.data.shape[-3] * 4, self.scales.shape[-1])
        rows, n = self.data.shape[-2:]
        return (2 * rows if self.format == "int4" else rows, n)


# ------------------------------------------------------------------------------------------
# Quantizers: round to nearest, from a full-precision W[K, N].
# ------------------------------------------------------------------------------------------

def _safe_divide(w, scale):
    return w / jnp.where(scale == 0, 1, scale)


def quantize_int8(w, *, group_size=0, scale_dtype=jnp.float32):
    """Symmetric int8, per output channel (group_size 0) or per group of rows (GGUF Q8_0: 32)."""
    k, n = w.shape
    w = w.astype(jnp.float32)
    groups = w.reshape(k // group_size, group_size, n) if group_size else w[None]
    scales = jnp.abs(groups).max(axis=1) / 127.0  # [K // group_size or 1, N]
    q = jnp.clip(jnp.round(_safe_divide(groups, scales[:, None])), -127, 127).astype(jnp.int8)
    scales = scales if group_size else scales[0]
    return QuantizedWeight(q.reshape(k, n), scales.astype(scale_dtype), None, "int8", group_size)


def pack_int4(q):
    """q: [K, N] integers in 0..15 -> [K // 2, N] uint8, low nibble = even row."""
    q = q.astype(jnp.uint8)
    return q[0::2] | (q[1::2] << 4)


def unpack_int4(packed):
    """[K // 2, N] uint8 -> [K, N] uint8 in 0..15 (inverse of `pack_int4`)."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], packed.shape[1])


def quantize_int4(w, *, group_size=32, symmetric=True, scale_dtype=jnp.float32):
    """int4 with one scale (and, asymmetric, one min) per group of `group_size` rows.

    Symmetric is GGUF Q4_0's rule: scale = (the value of largest magnitude) / -8, so that value
    maps exactly to q = 0. Asymmetric is Q4_1's: scale = (max - min) / 15, min = min.
    """
    k, n = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size} (and even)")
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    if symmetric:
        biggest = jnp.take_along_axis(groups, jnp.abs(groups).argmax(axis=1)[:, None], axis=1)[:, 0]
        scales, mins = biggest / -8.0, None
        q = jnp.round(_safe_divide(groups, scales[:, None])) + 8
    else:
        lo, hi = groups.min(axis=1), groups.max(axis=1)
        scales, mins = (hi - lo) / 15.0, lo
        q = jnp.round(_safe_divide(groups - lo[:, None], scales[:, None]))
    q = jnp.clip(q, 0, 15).reshape(k, n)
    return QuantizedWeight(pack_int4(q), scales.astype(scale_dtype),
                           None if mins is None else mins.astype(scale_dtype), "int4", group_size)


def quantize_fp8(w, *, scale_dtype=jnp.float32):
    """float8_e4m3fn with one scale per output channel (the channel's max maps to 448)."""
    w = w.astype(jnp.float32)
    scales = jnp.abs(w).max(axis=0) / FP8_MAX  # [N]
    q = jnp.clip(_safe_divide(w, scales), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return QuantizedWeight(q, scales.astype(scale_dtype), None, "fp8", 0)


def dequantize(w: QuantizedWeight, dtype=jnp.float32):
    """The full-precision W[K, N] (the reference path; the kernel never builds it)."""
    k, n = w.shape
    if w.format == "int4":
        q = unpack_int4(w.data).astype(jnp.float32)
        if w.mins is None:
            q = q - 8.0
    elif w.layout in ("blocked", "vnni"):
        from kernels_cpu import native

        q = (native.from_blocked if w.layout == "blocked" else native.from_vnni)(w.data, n).astype(jnp.float32)
    else:
        q = w.data.astype(jnp.float32)
    if w.group_size:
        q = q.reshape(k // w.group_size, w.group_size, n)
        out = q * w.scales.astype(jnp.float32)[:, None]
        if w.mins is not None:
            out = out + w.mins.astype(jnp.float32)[:, None]
    else:
        out = q * w.scales.astype(jnp.float32)
    return out.reshape(k, n).astype(dtype)


def quant_matmul_reference(x, w: QuantizedWeight):
    """x: [M, K] -> [M, N] in x's dtype: dequantize W, then one dot accumulating in float32."""
    return jnp.dot(x, dequantize(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


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
    "block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret"))
def quant_matmul(x, w: QuantizedWeight, *, block_m=64, block_n=64, block_k=64, num_warps=4,
                 num_stages=3, interpret=False):
    """Pallas version of `quant_matmul_reference`. x: [M, K] -> [M, N] in x's dtype.

    Grid: (M blocks, N blocks); each program walks K `block_k` rows at a time. block_m shrinks
    to the smallest power of two >= M (at least 16, the smallest tensor-core tile); with groups,
    block_k shrinks to divide group_size so that a tile has one scale row.
    """
    if w.format not in FORMATS:
        raise ValueError(f"unknown weight format {w.format!r}; expected one of {FORMATS}")
    m, k = x.shape
    n = w.shape[1]
    if w.shape[0] != k:
        raise ValueError(f"x is [{m}, {k}] but W is {w.shape}")
    block_m = min(block_m, max(16, _next_power_of_2(m)))
    if w.group_size:
        block_k = min(block_k, w.group_size)
        if w.group_size % block_k:
            raise ValueError(f"block_k={block_k} must divide group_size={w.group_size}")
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if size != _next_power_of_2(size) or size < 16 or (name == "block_k" and size < 32):
            raise ValueError(f"{name}={size} must be a power of two >= 16 (block_k >= 32)")
    kernel = functools.partial(_quant_matmul_kernel, fmt=w.format, group_size=w.group_size,
                               block_m=block_m, block_n=block_n, block_k=block_k)
    operands = (x, w.data, w.scales) + (() if w.mins is None else (w.mins,))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"quant_matmul_{w.format}",
    )(*operands)
