"""Weight-only quantized matmul `x[M, K] @ W[K, N]` for Hopper (sm_90a) as a Mosaic GPU kernel.

Same packed layouts and the same specification as `kernels_pallas.quant_matmul`: its
`quant_matmul_reference` (dequantize W to x's dtype, one dot accumulating in float32) is what
this kernel is tested against. Formats: "int8" (per channel or grouped), "int4" (groups of
32/64/128, with a min or symmetric), "int5"/"int6" (GGUF's 5- and 6-bit codes: int4's nibbles plus
a plane of high bits, groups of 16 or more) and "fp8" (e4m3, converted by Hopper's own instruction).

Design, per output tile [block_m, block_n] (one CUDA block of one warpgroup, 128 threads):
- `plgpu.emit_pipeline` walks K `block_k` rows at a time, `max_concurrent_steps` stages deep:
  TMA brings x's tile [block_m, block_k] (bf16, swizzled for wgmma), W's packed tile
  ([block_k, block_n] int8 or [block_k // 2, block_n] uint8) and that step's scale (and min)
  row [1, block_n] into shared memory. W crosses HBM only in its packed form.
- The warpgroup loads the packed tile into registers 64 x 64 codes at a time, dequantizes them
  (`_dequantize_tile`: q * scale + min in float32, rounded to bf16, exactly as the reference
  rounds; codes become floats through their exponent bits, `_codes_to_float32`) and stores the
  bf16 tile to a swizzled shared-memory buffer. When a step spans several groups, each chunk
  picks its rows' scale and min by row band.
- `wgmma` multiplies x's tile by the bf16 tile into a float32 accumulator [block_m, block_n]
  (Hopper's wgmma takes B from shared memory only: W is B here).
- int5/int6 (block_k 128): the step's nibbles as int4's, and the band of the high-bit plane that
  holds their high bits ([64, block_n], the same band for HIGH_SPAN // 128 steps: re-read from L2);
  the step's run of the band is a shift, the same for the whole tile, ORed above the nibbles.
- int4 nibbles are not interleaved back into row order: the low nibbles (rows 2i) fill the top
  half of the bf16 tile and the high nibbles (rows 2i + 1) the bottom half, and x's columns are
  permuted the same way per block_k by the wrapper (`_deinterleave_k`), so the dot is unchanged.
- The epilogue rounds the accumulator to x's dtype, stores it to shared memory and TMA-copies it
  to the output tile.

Two shapes of the same kernel (`default_blocks` picks):
- prefill (M > 16): M padded to a multiple of block_m = 64 or 128 (wgmma's M is 64 a warpgroup);
- decode (M <= 16, `swap_ab`): y^T = W^T x^T. The dequantized tile, read transposed, is wgmma's
  A (its M = block_n) and x's tile, read transposed, is its B with N = block_m = 16: M is padded
  to 16, not 64, and the kernel writes y^T [N, M], transposed back by the wrapper (M x N, small).
N must be a multiple of block_n and K of block_k; block_k and group_size must divide one another.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.quant_matmul import HIGH_BAND, HIGH_BITS, HIGH_SPAN, SYMMETRIC_OFFSET, high_rows

FORMATS = ("int8", "int4", "fp8", "int5", "int6")
CHUNK = 64  # packed rows (and columns) dequantized at once: register tiles come in 64 rows


def _codes_to_float32(q, offset):
    """int32 codes in [-offset, 256 - offset) -> float32, exactly, without a conversion instruction.

    2**23 + c for 0 <= c < 2**23 is a float32 whose mantissa bits are c: add the bits of 2**23 and
    `offset` to q, reinterpret, subtract. (sm_90 converts integers to floats at a quarter of the
    rate it adds: docs/KERNELS.md.)
    """
    bits = q + (0x4B000000 + offset)
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - (8388608.0 + offset)


def _dequantize_tile(q, scale, shift, dtype, offset):
    """Packed codes -> W's tile in `dtype` by the reference's arithmetic.

    q: [CHUNK, CHUNK] int32 codes (offset: 0 for int4's 0..15, 128 for int8's -128..127); scale,
    shift: [CHUNK, CHUNK] float32 (shift: the min, -8 * scale for symmetric int4, or None). The
    reference computes q * scale (+ min) in float32 and rounds once to x's dtype; so does this.
    """
    w = _codes_to_float32(q, offset) * scale
    return (w if shift is None else w + shift).astype(dtype)


def _quant_matmul_kernel(x_gmem, data_gmem, scales_gmem, *rest, fmt, group_size, symmetric, block_m,
                         block_n, block_k, max_concurrent_steps, x_transforms, swap_ab):
    mins_gmem = rest[0] if len(rest) == 4 else None
    o_gmem, w_smem, o_smem = rest[-3:]
    n_idx, m_idx = jax.lax.axis_index("n"), jax.lax.axis_index("m")
    k = x_gmem.shape[1]
    nibbles = fmt == "int4" or fmt in HIGH_BITS
    rows = block_k // 2 if nibbles else block_k  # packed rows of W per step
    # Scale (and min) rows per step: one when a group spans whole steps (or per channel), else
    # block_k // group_size, each covering `band` consecutive packed rows of the step's tile.
    groups_per_step = block_k // group_size if group_size and group_size < block_k else 1
    band = rows // groups_per_step
    if not group_size:
        group_block = lambda i: (0, 0)  # noqa: E731 - per channel: the one row, every step
    elif groups_per_step == 1:
        group_block = lambda i: (i * block_k // group_size, 0)  # noqa: E731
    else:
        group_block = lambda i: (i, 0)  # noqa: E731
    row_spec = plgpu.BlockSpec((groups_per_step, block_n), group_block)
    in_specs = [plgpu.BlockSpec((block_m, block_k), lambda i: (0, i), transforms=x_transforms),
                plgpu.BlockSpec((rows, block_n), lambda i: (i, 0))]
    operands = [x_gmem.at[pl.ds(m_idx * block_m, block_m), :],
                data_gmem.at[pl.ds(0, k // 2 if nibbles else k), pl.ds(n_idx * block_n, block_n)]]
    if fmt in HIGH_BITS:  # the band of high bits of this step's nibble rows: one per HIGH_SPAN rows of W
        steps_per_band = HIGH_SPAN[fmt] // block_k
        in_specs.append(plgpu.BlockSpec((HIGH_BAND, block_n), lambda i: (i // steps_per_band, 0)))
        operands.append(data_gmem.at[pl.ds(k // 2, high_rows(fmt, k)), pl.ds(n_idx * block_n, block_n)])
    in_specs.append(row_spec)
    operands.append(scales_gmem.at[:, pl.ds(n_idx * block_n, block_n)])
    if mins_gmem is not None:
        in_specs.append(row_spec)
        operands.append(mins_gmem.at[:, pl.ds(n_idx * block_n, block_n)])

    def per_row(group_smem, first_row, cols, dtype=jnp.float32):
        """[groups_per_step, block_n] -> [CHUNK, CHUNK] float32: the value of the group of each
        packed row first_row + r, columns `cols`. A chunk inside one group is a broadcast; a chunk
        spanning groups (int4 g32/g64, int8 g32) selects by row band."""
        first, last = first_row // band, (first_row + CHUNK - 1) // band
        def row_of(g):
            return jnp.broadcast_to(group_smem[g, cols].astype(dtype)[None, :], (CHUNK, CHUNK))
        full = row_of(first)
        if last > first:
            row = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=plgpu.Layout.WGMMA)
            for g in range(first + 1, last + 1):
                full = jnp.where(row >= g * band - first_row, row_of(g), full)
        return full

    def compute(acc_ref):
        def step(indices, x_smem, data_smem, *rest_smem):
            high_smem, scale_smem, *min_smem = rest_smem if fmt in HIGH_BITS else (None, *rest_smem)
            # Dequantize [CHUNK, CHUNK] packed codes at a time: a float32 chunk is 32 registers a
            # thread, beside the accumulator's block_m * block_n / 128.
            for first_row, first_col in itertools.product(range(0, rows, CHUNK), range(0, block_n, CHUNK)):
                chunk_rows, cols = pl.ds(first_row, CHUNK), pl.ds(first_col, CHUNK)
                if fmt in HIGH_BITS:  # one step is one run of its band (block_k 128): a shift per step
                    # scale and min tiles held as float16 (as stored; widened exactly where used): with
                    # Q6_K's groups of 16 (8 bands a chunk) float32 tiles of both spilled (ptxas).
                    scale = per_row(scale_smem, first_row, cols, jnp.float16)
                    shift = per_row(min_smem[0], first_row, cols, jnp.float16) if min_smem else None
                    packed = data_smem[chunk_rows, cols].astype(jnp.int32)  # [CHUNK, CHUNK]
                    h, high_band = HIGH_BITS[fmt], high_smem[:, cols].astype(jnp.int32)
                    at = (indices[0] % steps_per_band) * (2 * h)
                    for nibble, target in ((0, chunk_rows), (1, pl.ds(rows + first_row, CHUNK))):
                        q = ((packed >> (4 * nibble)) & 0xF) | (((high_band >> (at + h * nibble)) & ((1 << h) - 1)) << 4)
                        s32 = scale.astype(jnp.float32)
                        m32 = s32 * -float(SYMMETRIC_OFFSET[fmt]) if shift is None else shift.astype(jnp.float32)
                        w_smem[target, cols] = _dequantize_tile(q, s32, m32, w_smem.dtype, offset=0)
                    continue
                scale = per_row(scale_smem, first_row, cols)
                if min_smem:
                    shift = per_row(min_smem[0], first_row, cols)
                elif symmetric:
                    shift = scale * -float(SYMMETRIC_OFFSET[fmt])
                else:
                    shift = None
                if fmt == "fp8":  # float8_e4m3fn -> float32 by Mosaic GPU's own conversion
                    q = data_smem[chunk_rows, cols].astype(jnp.float32)
                    w = q * scale if shift is None else q * scale + shift
                    w_smem[chunk_rows, cols] = w.astype(w_smem.dtype)
                    continue
                # Mosaic GPU does arithmetic on 8-bit types only bitwise: widen first.
                packed = data_smem[chunk_rows, cols].astype(jnp.int32)  # [CHUNK, CHUNK]
                if nibbles:
                    dequantize = functools.partial(_dequantize_tile, scale=scale, shift=shift, dtype=w_smem.dtype,
                                                   offset=0)
                    w_smem[chunk_rows, cols] = dequantize(packed & 0xF)
                    w_smem[pl.ds(rows + first_row, CHUNK), cols] = dequantize(packed >> 4)
                else:
                    w_smem[chunk_rows, cols] = _dequantize_tile(packed, scale, shift, w_smem.dtype, offset=128)
            plgpu.commit_smem()  # the bf16 tile is visible to the async proxy (wgmma)
            if swap_ab:  # y^T tile [block_n, block_m] = W^T [block_n, block_k] @ x^T [block_k, block_m]
                plgpu.wgmma(acc_ref, w_smem.transpose((1, 0)), x_smem.transpose((1, 0)))
            else:
                plgpu.wgmma(acc_ref, x_smem, w_smem)
            plgpu.wgmma_wait(0)  # w_smem is rewritten next step, x_smem released

        plgpu.emit_pipeline(step, grid=(k // block_k,), in_specs=in_specs,
                            max_concurrent_steps=max_concurrent_steps)(*operands)
        return acc_ref[...]

    acc_shape = (block_n, block_m) if swap_ab else (block_m, block_n)
    acc = pl.run_scoped(compute, plgpu.ACC(acc_shape, jnp.float32))
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    tile = (pl.ds(m_idx * block_m, block_m), pl.ds(n_idx * block_n, block_n))
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[tile[::-1] if swap_ab else tile])
    plgpu.wait_smem_to_gmem(0)


def _swizzled(block_minor, dtype):
    """Tiling + swizzle transforms for a shared-memory operand of wgmma whose minor dim is
    `block_minor` elements of `dtype`."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(block_minor * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _interpret_params(interpret):
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams(uninitialized_memory="nan") if interpret else None


def _deinterleave_k(x, block_k):
    """x[M, K] with each block_k columns reordered: even columns first, then odd ones (the order
    in which the kernel lays out an int4 tile's low and high nibbles)."""
    m, k = x.shape
    return x.reshape(m, k // block_k, block_k // 2, 2).swapaxes(-1, -2).reshape(m, k)


def default_blocks(fmt, group_size, m, k, n, dtype):
    """Block sizes for an [M, K] x [K, N] call (the swapped decode variant for M <= 16, M tiles of 64
    or 128 above), or None where this kernel does not apply (float32 x, N not a multiple of 64, K
    not of 64 (int8, fp8) or 128 (int4, int5, int6: block_k 128 there, one run of a high-bit band a step))."""
    if fmt not in FORMATS or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return None
    block_n = next((b for b in (128, 64) if n % b == 0), None)
    block_k = next((b for b in (128, 2 * CHUNK if fmt == "int4" else CHUNK) if k % b == 0), None)
    if fmt in HIGH_BITS and k % 128:
        block_k = None
    if block_n is None or block_k is None or group_size and group_size % block_k and block_k % group_size:
        return None
    if m <= 16:  # decode: W^T as wgmma's M side, x^T as a 16-wide N side
        return dict(block_m=16, block_n=block_n, block_k=block_k, swap_ab=True)
    # Groups of 16 (Q6_K) select among 8 scale (and min) rows a chunk: beside a 128-row accumulator
    # that spilled registers (ptxas, int6 g16 with mins), so their M tiles are 64 rows.
    small_groups = fmt in HIGH_BITS and group_size < 32
    return dict(block_m=64 if m <= 64 or small_groups else 128, block_n=block_n, block_k=block_k)


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "block_m", "block_n", "block_k", "max_concurrent_steps", "swap_ab", "interpret"))
def quant_matmul(x, data, scales, mins=None, *, fmt, group_size, block_m=64, block_n=128, block_k=128,
                 max_concurrent_steps=2, swap_ab=False, interpret=False):
    """Mosaic GPU version of `quant_matmul.quant_matmul_reference`. x: [M, K] bf16 -> [M, N] bf16.

    `swap_ab`: the decode shape (y^T = W^T x^T; block_m is then wgmma's N, a multiple of 8).
    `interpret`: True, or a `plgpu.InterpretGPUParams`: run in Mosaic GPU's interpret mode on any
    platform (True: every buffer, the output included, starts as NaN).
    """
    if fmt not in FORMATS:
        raise ValueError(f"the Mosaic GPU matmul has no {fmt!r} path; it has {FORMATS}")
    m, k = x.shape
    w_rows, n = data.shape
    if fmt in HIGH_BITS:
        if not group_size or k % 128 or w_rows != k // 2 + high_rows(fmt, k) or scales.shape[0] * group_size != k:
            raise ValueError(f"x is [{m}, {k}] but the {fmt} W data is {data.shape} with scales {scales.shape} in "
                             f"groups of {group_size} (K must be a multiple of 128)")
        if block_k != 128:
            raise ValueError(f"{fmt} takes block_k=128 (one run of a high-bit band a step), got {block_k}")
    elif (2 * w_rows if fmt == "int4" else w_rows) != k:
        raise ValueError(f"x is [{m}, {k}] but the {fmt} W data is {data.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x must be bfloat16 or float16 (wgmma operands), not {x.dtype}")
    # W's packed tile (block_k rows, or block_k // 2 for int4) is dequantized CHUNK x CHUNK at a
    # time: register tiles come in 64 rows.
    k_unit = 2 * CHUNK if fmt == "int4" or fmt in HIGH_BITS else CHUNK
    # swap_ab: block_n is wgmma's M (64 per warpgroup) and block_m its N (a multiple of 8).
    if block_m % (8 if swap_ab else 64) or n % block_n or block_n % 64 or k % block_k or block_k % k_unit:
        raise ValueError(f"need block_m a multiple of {8 if swap_ab else 64}, block_n of 64 and block_k of "
                         f"{k_unit} ({fmt}), dividing N={n}, K={k}: got {block_m}, {block_n}, {block_k}")
    if group_size and group_size % block_k and block_k % group_size:
        raise ValueError(f"block_k={block_k} and group_size={group_size}: one must divide the other")
    symmetric = fmt in SYMMETRIC_OFFSET and mins is None
    scales = scales.reshape(-1, n)  # per channel: [1, N]
    if fmt in SYMMETRIC_OFFSET:  # the nibble formats
        x = _deinterleave_k(x, block_k)
    m_pad = pl.cdiv(m, block_m) * block_m
    x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    out_shape, out_block = ((n, m_pad), (block_n, block_m)) if swap_ab else ((m_pad, n), (block_m, block_n))
    kernel = functools.partial(
        _quant_matmul_kernel, fmt=fmt, group_size=group_size, symmetric=symmetric, block_m=block_m,
        block_n=block_n, block_k=block_k, max_concurrent_steps=max_concurrent_steps,
        x_transforms=_swizzled(block_k, x.dtype), swap_ab=swap_ab)
    operands = (x, data, scales) + (() if mins is None else (mins,))
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(out_shape, x.dtype),
        grid=(n // block_n, m_pad // block_m),
        grid_names=("n", "m"),
        scratch_types=[plgpu.SMEM((block_k, block_n), x.dtype, transforms=_swizzled(block_n, x.dtype)),  # bf16 W
                       plgpu.SMEM(out_block, x.dtype, transforms=_swizzled(out_block[1], x.dtype))],  # y tile
        interpret=_interpret_params(interpret),
    )(*operands)
    return (out.T if swap_ab else out)[:m]
