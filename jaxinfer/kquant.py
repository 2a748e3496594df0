"""GGUF's quantized blocks kept as stored, a type per layer: K-quants (Q4_K, Q5_K, Q6_K) and the
blocks of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), rearranged bit for bit.

A K-quant stores 256 weights of a row (a super-block) as small integer codes with a 6- or 8-bit
scale per sub-block of 32 (Q6_K: 16) and float16 factors per super-block:
  Q4_K, Q5_K: w = (d * sc) * code - dmin * m    code 4 / 5 bits, sc and m 6 bits, per 32;
  Q6_K:       w = (d * sc) * (code - 32)        code 6 bits, sc int8, per 16.
Here each layer of a projection W[K, N] keeps exactly those codes and factors, laid out by columns
for the native kernel (`kernels_cpu/kquant_matmul.cc` states the layout), in blocks of 64 columns:
the 4 low bits of every code as nibbles, the high bits as bit planes, the sub-block scales as bytes
and d/dmin as float16.
That costs 4.625 / 5.625 / 6.5625 bits a weight, against the file's 4.5 / 5.5 / 6.5625 (the file
packs Q4_K's and Q5_K's 6-bit scales tighter). `dequantize_layer` is the reference: it equals
`gguf.quants.dequantize` bitwise, d * sc being exact in float32.

The blocks of 32 store a float16 d (and m) per 32 weights of a row:
  Q8_0, Q4_0, Q5_0: w = d * (code - zero)    code 8 / 4 / 5 bits, zero 128 / 8 / 16 (Q8_0's code: value + 128);
  Q4_1, Q5_1:       w = d * code + m         code 4 / 5 bits.
Their codes take the same nibbles and bit plane (Q8_0: group_matmul.cc's 8-bit layout), d and m
float16 [K / 32] per column: exactly the file's bits (8.5, 4.5, 5, 5.5, 6 a weight).

A projection's layers may differ in type (Q4_K_M files make some layers' ffn_down Q6_K, and where
K is not a multiple of 256, some attn_v Q8_0 among Q5_0): every layer's bytes lie one after another
in one uint8 array, and an index [L, 2] gives each layer's type id and offset, so no layer pays for
a wider type (docs/QUANTIZATION.md).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from gguf.quants import Q4_K as GGUF_Q4_K

from kernels_cpu import native

SUPER = 256  # rows per K-quant super-block
BLOCK = 32  # rows per block of the other types
COLS = native.VNNI_BLOCK  # columns per block of the layout
ALIGN = 64  # each layer's bytes start at a multiple of 64: the index stores offset / 64 in int32
LAYOUT_VERSION = 3  # part of the converted-weight cache key


@dataclasses.dataclass(frozen=True)
class KQuantType:
    name: str
    type_id: int  # the kernel's: 0 Q4_K, 1 Q5_K, 2 Q6_K, 3 Q8_0, 4 Q4_0, 5 Q4_1, 6 Q5_0, 7 Q5_1
    bits: int
    sub_block: int  # rows per scale
    has_min: bool
    block: int = SUPER  # rows per block of the file: K must be a multiple
    zero: int = 0  # blocks of 32 without a min: w = d * (code - zero)

    def sections(self, k: int, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """One layer's arrays in byte order: name -> (shape, dtype)."""
        nb, groups = -(-n // COLS), k // 32
        if self.block == BLOCK:
            return {"nibbles": ((nb, groups, 4, COLS, 4) if self.bits < 8 else (0,), np.uint8),
                    "high": ((nb, groups, 1, COLS, 4) if self.bits == 5 else (0,), np.uint8),
                    "codes": ((nb, k // 4, COLS, 4) if self.bits == 8 else (0,), np.uint8),
                    "d": ((nb, groups, COLS), np.float16),
                    "m": ((nb, groups if self.has_min else 0, COLS), np.float16)}
        return {"nibbles": ((nb, groups, 4, COLS, 4), np.uint8),
                "high": ((nb, groups, self.bits - 4, COLS, 4), np.uint8),
                "sc": ((nb, k // self.sub_block, COLS), np.uint8),
                "m": ((nb, groups if self.has_min else 0, COLS), np.uint8),
                "d": ((nb, k // SUPER, COLS), np.float16),
                "dmin": ((nb, k // SUPER if self.has_min else 0, COLS), np.float16)}

    def layer_bytes(self, k: int, n: int) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.sections(k, n).values())


TYPES = {"Q4_K": KQuantType("Q4_K", 0, 4, 32, True), "Q5_K": KQuantType("Q5_K", 1, 5, 32, True),
         "Q6_K": KQuantType("Q6_K", 2, 6, 16, False),
         "Q8_0": KQuantType("Q8_0", 3, 8, 32, False, BLOCK, 128), "Q4_0": KQuantType("Q4_0", 4, 4, 32, False, BLOCK, 8),
         "Q4_1": KQuantType("Q4_1", 5, 4, 32, True, BLOCK), "Q5_0": KQuantType("Q5_0", 6, 5, 32, False, BLOCK, 16),
         "Q5_1": KQuantType("Q5_1", 7, 5, 32, True, BLOCK)}
BY_ID = tuple(TYPES.values())
# GGUF's bytes per block of each type (a block: 256 rows for K-quants, else 32)
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}


def fits(k: int, n: int, types) -> bool:
    """Whether W[K, N] of these types can take this layout (K a multiple of each type's block, as
    GGUF itself needs; N of 16)."""
    return all(k % TYPES[t].block == 0 for t in types) and n % 16 == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KQuantWeight:
    """A stack of weights W[L, K, N] in GGUF's blocks, each layer of its own type (`TYPES`)."""

    data: jax.Array  # [bytes] uint8: every layer's sections, each layer at a multiple of ALIGN
    index: jax.Array  # [L, 2] int32: (type id, byte offset / ALIGN) of each layer
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    types: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))  # each layer's type name

    @property
    def stacked(self) -> bool:
        """A stack of one is a single weight (a model of one layer, or an LM head): layer 0."""
        return len(self.types) > 1


# --- from the file's blocks -------------------------------------------------------------------

def decode_blocks(raw: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """A matrix's bytes [rows, K / block * block bytes] -> its integers and factors, rows first:
    codes [rows, K] (0..2^bits - 1; Q8_0: value + 128), sc [rows, K / sub_block] (Q6_K: int8 bits),
    m [rows, K / 32] (Q4_K, Q5_K: uint8; Q4_1, Q5_1: float16), d [rows, K / block] and dmin
    [rows, K / 256] (Q4_K, Q5_K) float16. Unpacked as `gguf.quants` does."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, BLOCK_BYTES[kind])  # [rows * K / block, bytes]
    n = blocks.shape[0]
    if TYPES[kind].block == BLOCK:
        return _decode_blocks_of_32(blocks, kind, rows)
    if kind == "Q6_K":
        ql, qh, sc, d = np.split(blocks, [128, 192, 208], axis=1)
        low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        codes = low.reshape(n, 256) | (high.reshape(n, 256) << 4)
        parts = {"codes": codes, "sc": sc, "d": d.copy().view(np.float16)}
    else:
        d, dmin, scales, rest = np.split(blocks, [2, 4, 16], axis=1)
        qh, qs = np.split(rest, [32 if kind == "Q5_K" else 0], axis=1)
        sc, m = GGUF_Q4_K.get_scale_min(scales)
        codes = ((qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(n, 256)
        if kind == "Q5_K":
            codes = codes | (((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1)
                             .reshape(n, 256) << 4)
        parts = {"codes": codes, "sc": sc, "m": m, "d": d.copy().view(np.float16),
                 "dmin": dmin.copy().view(np.float16)}
    return {name: a.astype(np.float16 if a.dtype == np.float16 else np.uint8).reshape(rows, -1)
            for name, a in parts.items()}


def _decode_blocks_of_32(blocks: np.ndarray, kind: str, rows: int) -> dict[str, np.ndarray]:
    n = blocks.shape[0]
    d, rest = np.split(blocks, [2], axis=1)
    parts = {"d": d.copy().view(np.float16).reshape(rows, -1)}
    if kind == "Q8_0":
        codes = rest.view(np.int8).astype(np.int16) + 128
    else:
        if TYPES[kind].has_min:
            m, rest = np.split(rest, [2], axis=1)
            parts["m"] = m.copy().view(np.float16).reshape(rows, -1)
        qh, qs = np.split(rest, [4 if TYPES[kind].bits == 5 else 0], axis=1)
        # element j in the low nibble of byte j, element j + 16 in its high nibble; its 5th bit at bit j of qh
        codes = ((qs.reshape(n, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 0xF).reshape(n, 32)
        if TYPES[kind].bits == 5:
            qh32 = qh.copy().view("<u4")  # [n, 1]
            codes = codes | (((qh32 >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4)
    return {"codes": codes.astype(np.uint8).reshape(rows, -1), **parts}


def pack_layer(parts: dict[str, np.ndarray], kind: str) -> np.ndarray:
    """`decode_blocks`' arrays (rows = output channels) -> one layer's bytes, padded to ALIGN."""
    t = TYPES[kind]
    codes = jnp.asarray(parts["codes"].T)  # [K, N]
    low = codes & 0xF
    if t.bits == 8:  # Q8_0: group_matmul.cc's 8-bit layout, which takes the value
        sections = {"codes": native.to_group_codes((codes.astype(jnp.int16) - 128).astype(jnp.int8), 8)}
    else:
        sections = {"nibbles": native.to_group_codes(low[0::2] | (low[1::2] << 4), 4),
                    "high": _to_high_planes(codes >> 4, t.bits - 4)}
    # The factors by blocks of columns too, [NB, rows, COLS]: a block's are one sequential stream.
    sections |= {name: native.to_blocked(jnp.asarray(parts[name].T), block=COLS)
                 for name in ("sc", "m", "d", "dmin") if name in parts}
    out = np.concatenate([np.ascontiguousarray(np.asarray(sections[name])).view(np.uint8).reshape(-1)
                          for name in t.sections(*codes.shape) if name in sections])
    assert out.size == t.layer_bytes(*codes.shape)
    return np.pad(out, (0, -out.size % ALIGN))


def _to_high_planes(high, width: int):
    """The codes' high bits [K, N] -> [NB, K / 32, width, COLS, 4]: value j = 4 * half + p of the
    (k = 32 g + 16 half + 4 p + i, column c) at bits j * width of byte (j * width) / 8."""
    k, _ = high.shape
    if width == 0:
        return jnp.zeros((0,), jnp.uint8)
    blocked = native.to_blocked(high.astype(jnp.uint8), block=COLS)  # [NB, K, COLS]
    nb = blocked.shape[0]
    per_byte = 8 // width
    values = blocked.reshape(nb, k // 32, width, per_byte, 4, COLS)  # (j = byte * per_byte + v, i, c)
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * width).reshape(1, 1, 1, per_byte, 1, 1)
    packed = jnp.bitwise_or.reduce(values << shifts, axis=3)  # [NB, K / 32, width, 4, COLS]
    return jnp.swapaxes(packed, -1, -2)


def stack_layers(layers: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """[(type name, `pack_layer` bytes)] -> (data [bytes] uint8, index [L, 2] int32)."""
    offsets = np.cumsum([0] + [b.size for _, b in layers[:-1]]) // ALIGN
    index = np.array([[TYPES[kind].type_id, off] for (kind, _), off in zip(layers, offsets)], np.int32)
    return np.concatenate([b for _, b in layers]), index


def stack_bytes(types: tuple[str, ...], k: int, n: int) -> int:
    """Bytes of `stack_layers`' data for layers of these types."""
    return sum(-(-TYPES[t].layer_bytes(k, n) // ALIGN) * ALIGN for t in types)


# --- the reference, in jax.numpy ---------------------------------------------------------------

def unpack_layer(layer, kind: str, k: int, n: int) -> dict[str, jax.Array]:
    """One layer's bytes -> codes [K, N] int32 and the float32 factors sc, (m,) d, (dmin); blocks
    of 32: d (and m)."""
    t = TYPES[kind]
    arrays, at = {}, 0
    for name, (shape, dtype) in t.sections(k, n).items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = layer[at:at + size]
        at += size
        if dtype == np.float16:
            arrays[name] = jax.lax.bitcast_convert_type(raw.reshape(*shape, 2), jnp.float16).astype(jnp.float32)
        else:
            arrays[name] = raw.reshape(shape)
        if name in ("sc", "m", "d", "dmin"):  # [NB, rows, COLS] -> [rows, N]
            arrays[name] = native.from_blocked(arrays[name], n)
    nibbles, high, codes8 = arrays.pop("nibbles"), arrays.pop("high"), arrays.pop("codes", None)
    if t.bits == 8:
        return {"codes": native.from_group_codes(codes8, 8, n).astype(jnp.int32) + 128, "d": arrays["d"]}
    packed = native.from_group_codes(nibbles, 4, n)  # [K / 2, N], low nibble = even row
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(k, n).astype(jnp.int32)
    if t.bits > 4:
        codes = codes | (_from_high_planes(high, t.bits - 4, k, n) << 4)
    if t.block == BLOCK:
        return {"codes": codes, "d": arrays["d"], **({"m": arrays["m"]} if t.has_min else {})}
    arrays["sc"] = (arrays["sc"].view(jnp.int8) if kind == "Q6_K" else arrays["sc"]).astype(jnp.float32)
    if t.has_min:
        arrays["m"] = arrays["m"].astype(jnp.float32)
    else:
        del arrays["m"], arrays["dmin"]
    return {"codes": codes, **arrays}


def _from_high_planes(planes, width: int, k: int, n: int):
    """The inverse of `_to_high_planes`: [NB, K / 32, width, COLS, 4] -> [K, N] int32."""
    nb = planes.shape[0]
    per_byte = 8 // width
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * width).reshape(1, 1, 1, per_byte, 1, 1)
    values = (jnp.swapaxes(planes, -1, -2)[:, :, :, None] >> shifts) & ((1 << width) - 1)
    return native.from_blocked(values.reshape(nb, k, COLS), n).astype(jnp.int32)


def dequantize_layer(layer, kind: str, k: int, n: int):
    """One layer's bytes -> W[K, N] float32, bitwise `gguf.quants.dequantize` (same products, same order)."""
    a = unpack_layer(layer, kind, k, n)
    t = TYPES[kind]
    if t.block == BLOCK:
        d = jnp.repeat(a["d"], BLOCK, axis=0)  # [K, N]
        if not t.has_min:
            return d * (a["codes"] - t.zero).astype(jnp.float32)
        product = jax.lax.optimization_barrier(d * a["codes"].astype(jnp.float32))  # no fused multiply-add
        return product + jnp.repeat(a["m"], BLOCK, axis=0)
    d = jnp.repeat(a["d"], SUPER // t.sub_block, axis=0)  # [K / sub_block, N]
    scale = jnp.repeat(d * a["sc"], t.sub_block, axis=0)  # [K, N], exact: 11 x 8 significant bits
    if not t.has_min:
        return scale * (a["codes"] - 32).astype(jnp.float32)
    low = jnp.repeat(jnp.repeat(a["dmin"], SUPER // 32, axis=0) * a["m"], 32, axis=0)
    # XLA is free to contract a product and a difference into one fused multiply-add, which rounds
    # once where gguf rounds twice; the CPU backend does not today, the barrier makes sure no backend does.
    product = jax.lax.optimization_barrier(scale * a["codes"].astype(jnp.float32))
    return product - low


def dequantize(w: KQuantWeight, layer):
    """W[layer] [K, N] float32 of a stack; `layer` may be traced (a switch over the types present).
    The byte offset is int32 here (jax's default), so a stack past 2 GiB needs the native kernel,
    which widens it to 64 bits."""
    present = sorted(set(w.types), key=lambda name: TYPES[name].type_id)
    offset = w.index[layer, 1] * ALIGN

    def branch(kind):
        size = TYPES[kind].layer_bytes(w.k, w.n)
        return lambda: dequantize_layer(jax.lax.dynamic_slice(w.data, (offset,), (size,)), kind, w.k, w.n)

    if len(present) == 1:
        return branch(present[0])()
    which = jnp.asarray([present.index(t.name) if t.name in present else 0 for t in BY_ID], jnp.int32)
    return jax.lax.switch(which[w.index[layer, 0]], [branch(kind) for kind in present])


def dequantize_rows(rows, kind: str):
    """Rows of a matrix of a block type of 32 in the file's own bytes [T, K / 32 * block bytes] uint8
    -> [T, K] float32, bitwise `gguf.quants.dequantize` (an embedding kept as stored: rows gathered,
    then dequantized here)."""
    t = TYPES[kind]
    blocks = rows.reshape(rows.shape[0], -1, BLOCK_BYTES[kind])  # [T, K / 32, bytes]

    def half(at):  # the float16 at bytes [at, at + 2) of each block -> float32 [T, K / 32, 1]
        return jax.lax.bitcast_convert_type(blocks[..., at:at + 2], jnp.float16).astype(jnp.float32)[..., None]

    d = half(0)
    if kind == "Q8_0":
        values = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
        return (values * d).reshape(rows.shape[0], -1)
    at = 4 if t.has_min else 2
    qs = blocks[..., at + (4 if t.bits == 5 else 0):]  # [T, K / 32, 16]: element j low nibble, j + 16 high
    codes = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(jnp.int32)  # [T, K / 32, 32]
    if t.bits == 5:  # the 5th bits: bit j of a little-endian uint32
        qh = jax.lax.bitcast_convert_type(blocks[..., at:at + 4], jnp.uint32)[..., None]
        codes = codes | (((qh >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.int32) << 4)
    if t.has_min:
        w = jax.lax.optimization_barrier(d * codes.astype(jnp.float32)) + half(2)  # no fused multiply-add
    else:
        w = d * (codes - t.zero).astype(jnp.float32)
    return w.reshape(rows.shape[0], -1)


def matmul_reference(x, w: KQuantWeight, layer):
    """x[M, K] @ W[layer] -> [M, N] in x's dtype: dequantize, then one float32 dot."""
    y = jnp.dot(x.astype(jnp.float32), dequantize(w, layer), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
