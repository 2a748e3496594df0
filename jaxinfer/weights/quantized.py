"""Checkpoints that are quantized already: their `quantization_config`, and each projection's
tensors read into the engine's in-memory formats (`jaxinfer.quant`), one layer at a time, with no
full-precision copy at any point.

What each format becomes (docs/QUANTIZATION.md, "Quantized checkpoints"); HF stores W as [out, in],
the engine as [in (K), out (N)]:
- compressed-tensors `pack-quantized` int4 (W4A16): nibbles of `weight_packed` int32 [N, K / 8],
  value + 8, low nibble first: read as bytes and transposed they are int4's [K / 2, N] layout as
  they are. Symmetric: w = scale * (q - 8), int4 "-sym". Asymmetric: the `weight_zero_point`
  (packed the same way along N) folded into int4's min: w = scale * (q - z) = scale * q + min,
  min = -scale * z. Per channel or per tensor: the scale repeated over groups of 128 (exact).
- compressed-tensors int8 (`pack-quantized` 8 bits, `int-quantized`): int8 per channel, or in
  groups; symmetric only (int8 has no zero point).
- compressed-tensors `float-quantized` and HF "fp8" (DeepSeek/Qwen): fp8 per channel; a per-tensor
  scale repeated per channel; 128x128 blocks (`weight_scale` / `weight_scale_inv`) as fp8 with one
  scale per group of 128 rows (K) and column, the block's scale repeated over its 128 columns:
  exact, 2 bytes of scale per 128 weights.
- GPTQ (v1 and v2 packing) and AWQ (GEMM): int4 asymmetric (GPTQ symmetric: int4 "-sym"), GPTQ
  8-bit symmetric: int8. GPTQ act-order (`desc_act`: `g_idx` puts a group's rows anywhere in K): the
  rows are stored sorted by group, and the layer gathers the activations' columns into that order
  at each step (`WeightFormat.act_order`, `input_perm`), as vLLM's GPTQ kernels do with g_idx
  (down_proj's order is absorbed into gate/up's columns instead: `models.params.load_stacked`);
  compressed-tensors' act-order groups (`weight_g_idx`, releases before 0.19) the same way.
Scales and mins are kept in float16 (`quant.SCALE_DTYPE`): a checkpoint's bf16 scales convert
exactly where they are float16 normals, which weight scales are.
"""

import dataclasses
import logging

import numpy as np

from jaxinfer.quant import INT4_GROUP_SIZES, WeightFormat

logger = logging.getLogger("jaxinfer")

METHODS = ("compressed-tensors", "fp8", "gptq", "awq")
AWQ_REVERSE_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # AWQ stores column 8w + [0,2,4,6,1,3,5,7][i] in nibble i


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization the engine cannot serve; the message names what is unsupported."""


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    method: str  # a `METHODS` name: quantization_config's quant_method
    description: str  # what the config says, for messages and the log
    kind: str  # how the tensors are stored: "ct-int" | "ct-float" | "fp8" | "gptq" | "awq"
    bits: int  # 4 or 8 (8 for fp8)
    strategy: str  # "group" | "channel" | "tensor" | "block"
    group_size: int = 0  # rows (K) per scale for "group"; block columns (K) for "block"
    symmetric: bool = True
    packed: bool = True  # ct-int: "pack-quantized" (int32 words) or "int-quantized" (int8)
    gptq_zero_offset: int = 0  # GPTQ v1 stores zero - 1
    act_order: bool = False  # GPTQ desc_act, compressed-tensors actorder "group": a group's rows anywhere in K

    def weight_format(self, in_features: int) -> WeightFormat:
        """The engine's format for a projection with `in_features` rows (K)."""
        if self.bits == 4:
            group = self.group_size if self.strategy == "group" else _largest_group(in_features)
            return WeightFormat("int4", group, symmetric=self.symmetric, act_order=self.act_order)
        kind = "int8" if self.kind in ("ct-int", "gptq") else "fp8"
        return WeightFormat(kind, self.group_size if self.strategy in ("group", "block") else 0)

    def stored_names(self, prefix: str) -> tuple[str, ...]:
        """The tensors that hold the quantized weight of the projection `prefix` (its first one
        tells whether a projection is quantized at all: ignored modules keep `.weight`)."""
        return {"ct-int": ("weight_packed" if self.packed else "weight",), "ct-float": ("weight", "weight_scale"),
                "fp8": ("weight", "weight_scale_inv"), "gptq": ("qweight",), "awq": ("qweight",)}[self.kind]


def _largest_group(k: int) -> int:
    """int4 per channel or per tensor as groups: the largest int4 group size dividing K."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if k % g == 0:
            return g
    raise UnsupportedQuantization(f"int4 per channel with in_features={k}: not a multiple of 32")


def detect(config: dict | None) -> CheckpointQuantization | None:
    """The checkpoint's quantization from config.json's `quantization_config` (None: none)."""
    if not config:
        return None
    method = config.get("quant_method")
    readers = {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "gptq": _gptq, "awq": _awq}
    if method not in readers:
        raise UnsupportedQuantization(
            f"quantization_config quant_method {method!r} is not supported (jaxinfer loads {', '.join(METHODS)})")
    return readers[method](config)


def _compressed_tensors(config: dict) -> CheckpointQuantization:
    def refuse(what):
        return UnsupportedQuantization(f"compressed-tensors checkpoint: {what} is not supported")

    fmt = config.get("format")
    if config.get("sparsity_config") or config.get("transform_config"):
        raise refuse("a sparsity or transform config (sparse-24, SpinQuant/QuIP rotations)")
    if config.get("kv_cache_scheme"):
        raise refuse("a quantized KV cache (kv_cache_scheme)")
    groups = list((config.get("config_groups") or {}).values())
    schemes = {repr(sorted((g.get("weights") or {}).items())) for g in groups}
    if len(schemes) != 1:
        raise refuse(f"{len(schemes)} different weight schemes in config_groups (mixed precision)")
    group = groups[0]
    fmt = group.get("format") or fmt
    w = group.get("weights") or {}
    if group.get("input_activations"):
        logger.info("compressed-tensors checkpoint: its activation quantization (%s) is not applied; activations "
                    "stay in the model dtype (weight-only)", group["input_activations"].get("type"))
    if w.get("dynamic"):
        raise refuse("dynamic weight quantization")
    strategy, bits, kind = w.get("strategy"), w.get("num_bits"), w.get("type")
    symmetric = w.get("symmetric", True)
    description = (f"compressed-tensors {fmt} {kind}{bits} {strategy}"
                   + (f" {w.get('group_size')}" if strategy == "group" else "")
                   + (f" {w.get('block_structure')}" if strategy == "block" else "")
                   + ("" if symmetric else " asymmetric"))
    if fmt in ("pack-quantized", "int-quantized", "naive-quantized") and kind == "int":
        if bits not in (4, 8) or (bits == 4 and fmt != "pack-quantized"):
            raise refuse(f"{description}: int{bits} weights")
        if strategy not in ("group", "channel", "tensor"):
            raise refuse(f"{description}: int weights by {strategy}")
        if bits == 8 and not symmetric:
            raise refuse(f"{description}: int8 with a zero point")
        group_size = w.get("group_size") if strategy == "group" else 0
        if bits == 4 and strategy == "group" and group_size not in INT4_GROUP_SIZES:
            raise refuse(f"{description}: int4 group size {group_size} (jaxinfer's: {INT4_GROUP_SIZES})")
        # actorder "group" (compressed-tensors < 0.19): weight_g_idx as GPTQ's g_idx; "weight": groups in order
        act_order = w.get("actorder") in ("group", "dynamic") and strategy == "group"
        if act_order and bits != 4:
            raise refuse(f"{description}: act-order groups (weight_g_idx) with int8")
        return CheckpointQuantization("compressed-tensors", description + (", act-order groups" if act_order else ""),
                                      "ct-int", bits, strategy, group_size or 0, symmetric,
                                      packed=fmt == "pack-quantized", act_order=act_order)
    if fmt in ("float-quantized", "naive-quantized") and kind == "float" and bits == 8:
        if strategy not in ("channel", "tensor", "block", "group"):
            raise refuse(f"{description}: fp8 weights by {strategy}")
        if strategy == "block":
            group_size = w["block_structure"][1]
        else:
            group_size = w.get("group_size") if strategy == "group" else 0
        return CheckpointQuantization("compressed-tensors", description, "ct-float", 8, strategy, group_size or 0)
    raise refuse(description)


def _fp8(config: dict) -> CheckpointQuantization:
    if config.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedQuantization(f"fp8 checkpoint: fmt {config.get('fmt')!r} is not supported (e4m3 is)")
    block = config.get("weight_block_size")
    description = f"fp8 e4m3, {'blocks ' + 'x'.join(map(str, block)) if block else 'per tensor'} (weight_scale_inv)"
    if block:
        return CheckpointQuantization("fp8", description, "fp8", 8, "block", block[1])
    return CheckpointQuantization("fp8", description, "fp8", 8, "tensor")


def _gptq(config: dict) -> CheckpointQuantization:
    bits, group, sym = config.get("bits"), config.get("group_size", -1), config.get("sym", True)
    packing = config.get("checkpoint_format") or config.get("format") or "gptq"
    description = (f"GPTQ {bits}-bit, {'per channel' if group == -1 else f'group {group}'}, "
                   f"{'symmetric' if sym else 'asymmetric'}{', act-order' if config.get('desc_act') else ''}, "
                   f"{packing} packing")
    if config.get("lm_head"):
        raise UnsupportedQuantization(f"{description}: a quantized LM head (lm_head: true) is not supported")
    if packing not in ("gptq", "gptq_v2"):
        raise UnsupportedQuantization(f"{description}: the {packing!r} packing is not supported (gptq, gptq_v2 are)")
    if bits not in (4, 8) or (bits == 8 and not sym):
        raise UnsupportedQuantization(f"{description}: only 4-bit, and 8-bit symmetric, GPTQ are supported")
    if bits == 4 and group != -1 and group not in INT4_GROUP_SIZES:
        raise UnsupportedQuantization(f"{description}: group size {group} (jaxinfer's int4: {INT4_GROUP_SIZES})")
    act_order = bool(config.get("desc_act")) and group != -1  # per channel, g_idx is all one group
    if act_order and bits != 4:
        raise UnsupportedQuantization(f"{description}: act-order is supported for 4-bit GPTQ only")
    return CheckpointQuantization("gptq", description, "gptq", bits, "channel" if group == -1 else "group",
                                  0 if group == -1 else group, symmetric=bool(sym),
                                  gptq_zero_offset=1 if packing == "gptq" else 0, act_order=act_order)


def _awq(config: dict) -> CheckpointQuantization:
    bits, group = config.get("w_bit", config.get("bits")), config.get("q_group_size", config.get("group_size"))
    version = str(config.get("version") or config.get("format") or "gemm").lower()
    description = f"AWQ {bits}-bit, group {group}, {version}"
    if version != "gemm" or bits != 4:
        raise UnsupportedQuantization(f"{description}: only AWQ's 4-bit GEMM layout is supported")
    if group not in INT4_GROUP_SIZES:
        raise UnsupportedQuantization(f"{description}: group size {group} (jaxinfer's int4: {INT4_GROUP_SIZES})")
    return CheckpointQuantization("awq", description, "awq", 4, "group", group, symmetric=False)


# --- reading one projection ---------------------------------------------------------------------

def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 words [..., W] -> uint8 [..., 8 W]: each word's 4-bit fields, lowest first."""
    b = np.ascontiguousarray(words).astype("<i4", copy=False).view(np.uint8)
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(*words.shape[:-1], -1)


def _nibbles_rows(packed: np.ndarray) -> np.ndarray:
    """int4's [K / 2, N] uint8 -> [K, N] 0..15 (`quant_matmul.unpack_int4`)."""
    return np.stack([packed & 0xF, packed >> 4], axis=1).reshape(2 * packed.shape[0], packed.shape[1])


def _pack_rows(q: np.ndarray) -> np.ndarray:
    """[K, N] 0..15 -> [K / 2, N] uint8, low nibble = even row (`quant.pack_int4`)."""
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8)


def _f16(x) -> np.ndarray:
    """float16, as the engine keeps scales and mins; warns where that loses more than rounding."""
    x = np.asarray(x, np.float32)
    tiny = (x != 0) & (np.abs(x) < np.finfo(np.float16).tiny)
    if tiny.any() or np.any(np.abs(x) > np.finfo(np.float16).max):
        logger.warning("%d scales or mins are outside float16's normal range: stored with less precision, or "
                       "infinite", int(tiny.sum() + (np.abs(x) > np.finfo(np.float16).max).sum()))
    return x.astype(np.float16)


def projection_shape(q: CheckpointQuantization, shape, prefix: str) -> tuple[int, int]:
    """(K, N) of the projection `prefix` from its stored tensors' shapes (`shape(name)`)."""
    if q.kind in ("gptq", "awq"):
        rows, cols = shape(f"{prefix}.qweight")
        return (rows * 32 // q.bits, cols) if q.kind == "gptq" else (rows, shape(f"{prefix}.scales")[1])
    if q.kind == "ct-int" and q.packed:
        n, words = shape(f"{prefix}.weight_packed")
        return words * 32 // q.bits, n
    n, k = shape(f"{prefix}.weight")
    return k, n


def read_projection(q: CheckpointQuantization, read, shape, prefix: str) -> dict:
    """{"data", "scales"(, "mins")} of the projection `prefix` (W [K = in, N = out]) in
    `q.weight_format(K)`'s layout; `read(name)` gives a checkpoint tensor as stored, `shape(name)` its shape."""
    k, n = projection_shape(q, shape, prefix)
    fmt = q.weight_format(k)
    if q.kind in ("ct-int", "ct-float", "fp8"):
        return _read_compressed(q, fmt, read, prefix, k, n)
    return _read_gptq(q, fmt, read, prefix, k, n) if q.kind == "gptq" else _read_awq(fmt, read, prefix, k, n)


def _per_group(scale: np.ndarray, q: CheckpointQuantization, fmt: WeightFormat, k: int, n: int) -> np.ndarray:
    """A stored scale (HF orientation: [N, groups], [N, 1], [1] or [N / bn, K / bk] blocks) as the
    engine's [K / group_size, N] (or [N] per channel)."""
    scale = np.asarray(scale, np.float32)
    if q.strategy == "block":  # [ceil(N / bn), K / bk]: each block's scale over its bn columns
        bn = -(-n // scale.shape[0])
        return _f16(np.repeat(scale.T, bn, axis=1)[:, :n])
    if q.strategy == "group":
        return _f16(scale.reshape(n, -1).T)
    per_channel = np.broadcast_to(scale.reshape(-1), (n,))  # "channel" [N, 1], "tensor" [1] or []
    return _f16(np.broadcast_to(per_channel, (k // fmt.group_size, n))) if fmt.group_size else _f16(per_channel)


def _read_compressed(q, fmt, read, prefix, k, n) -> dict:
    scale = read(f"{prefix}.weight_scale_inv" if q.kind == "fp8" else f"{prefix}.weight_scale")
    if q.strategy == "block" and k % fmt.group_size:
        raise UnsupportedQuantization(f"{prefix}: fp8 blocks of {fmt.group_size} columns with in_features={k}")
    scales = _per_group(scale, q, fmt, k, n)
    if q.kind != "ct-int":  # float8_e4m3fn [N, K]
        return {"data": np.ascontiguousarray(read(f"{prefix}.weight").T), "scales": scales}
    if q.bits == 8:
        stored = read(f"{prefix}.weight_packed" if q.packed else f"{prefix}.weight")
        values = (stored.astype("<i4").view(np.uint8).astype(np.int16) - 128).astype(np.int8) if q.packed else stored
        return {"data": np.ascontiguousarray(values.reshape(n, k).T), "scales": scales}
    # int4: bytes of [N, K / 8] words are [N, K / 2], row 2i in the low nibble: transposed, int4's layout
    data = np.ascontiguousarray(np.ascontiguousarray(read(f"{prefix}.weight_packed")).astype("<i4", copy=False)
                                .view(np.uint8).reshape(n, k // 2).T)
    out = {"data": data, "scales": scales}
    if q.act_order:
        out["data"], out["input_perm"] = _sort_rows_by_group(data, read(f"{prefix}.weight_g_idx"), q.group_size, prefix)
    if not q.symmetric:  # zero points [N, groups] packed along N: [N / 8, groups] words, value + 8
        zp = read(f"{prefix}.weight_zero_point")
        if zp.shape[0] == n:  # as compressed-tensors stored them before it packed them: int8 [N, groups]
            zero = zp.T.astype(np.float32) + 8
        else:
            zero = _nibbles(np.ascontiguousarray(zp.T))[:, :n].astype(np.float32)  # [groups, N], 0..15
        zero = np.broadcast_to(zero, scales.shape) if zero.shape != scales.shape else zero
        out["mins"] = _f16(-scales.astype(np.float32) * zero)
    return out


def _sort_rows_by_group(data: np.ndarray, g_idx: np.ndarray, group_size: int, prefix: str):
    """Act-order: int4 [K / 2, N] with row k in group g_idx[k] -> (the rows sorted by group, stable,
    so that group j is rows j * group_size ...; perm [K] int32: the layer computes x[..., perm] @ W)."""
    g_idx = np.asarray(g_idx).astype(np.int64)
    k = 2 * data.shape[0]
    if g_idx.shape != (k,) or np.any(np.bincount(g_idx, minlength=k // group_size) != group_size):
        raise UnsupportedQuantization(f"{prefix}: act-order groups of unequal sizes (static groups?)")
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    return _pack_rows(_nibbles_rows(data)[perm]), perm


def _read_gptq(q, fmt, read, prefix, k, n) -> dict:
    """qweight int32 [K / (32 / bits), N] packed along K; qzeros [groups, N / (32 / bits)] packed
    along N; scales [groups, N]; g_idx [K] (checked to be in row order)."""
    g_idx = read(f"{prefix}.g_idx") if q.strategy == "group" else None
    in_order = g_idx is None or np.array_equal(g_idx, np.arange(k) // q.group_size)
    if not in_order and not q.act_order:
        raise UnsupportedQuantization(f"{prefix}: g_idx is not in row order, and the config says no act-order")
    scales_stored = np.asarray(read(f"{prefix}.scales"), np.float32)  # [groups, N]
    words = read(f"{prefix}.qweight")
    zwords = read(f"{prefix}.qzeros")
    if q.bits == 8:
        values = words.astype("<i4").view(np.uint8).reshape(k // 4, n, 4).transpose(0, 2, 1).reshape(k, n)
        zeros = zwords.astype("<i4").view(np.uint8).reshape(zwords.shape[0], -1)[:, :n].astype(np.int32)
        if np.any(zeros + q.gptq_zero_offset != 128):
            raise UnsupportedQuantization(f"{prefix}: 8-bit GPTQ with zero points other than 128")
        scales = scales_stored[0] if q.strategy == "channel" else scales_stored
        return {"data": (values.astype(np.int16) - 128).astype(np.int8), "scales": _f16(scales)}
    # 4-bit: word w, byte b holds rows 8w + 2b (low nibble) and 8w + 2b + 1: int4's row pair 4w + b
    data = np.ascontiguousarray(words.astype("<i4").view(np.uint8).reshape(k // 8, n, 4)
                                .transpose(0, 2, 1).reshape(k // 2, n))
    perm = None
    if q.act_order:
        data, perm = _sort_rows_by_group(data, g_idx, q.group_size, prefix)
    zeros = _nibbles(zwords)[:, :n].astype(np.float32) + q.gptq_zero_offset  # [groups, N]
    if q.strategy == "channel":
        scales_stored = np.broadcast_to(scales_stored[:1], (k // fmt.group_size, n))
        zeros = np.broadcast_to(zeros[:1], (k // fmt.group_size, n))
    scales = _f16(scales_stored)
    out = {"data": data, "scales": scales} if perm is None else {"data": data, "scales": scales, "input_perm": perm}
    if fmt.symmetric:  # w = scale * (q - 8): int4 "-sym"
        if np.any(zeros != 8):
            raise UnsupportedQuantization(f"{prefix}: a symmetric GPTQ checkpoint with zero points other than 8")
        return out
    return out | {"mins": _f16(-scales.astype(np.float32) * zeros)}


def _read_awq(fmt, read, prefix, k, n) -> dict:
    """qweight int32 [K, N / 8] and qzeros [groups, N / 8] packed along N in AWQ's nibble order;
    scales [groups, N]: w = scale * (q - zero)."""
    def columns(words):
        x = _nibbles(words)  # [rows, N] in stored nibble order
        return x.reshape(x.shape[0], -1, 8)[:, :, AWQ_REVERSE_ORDER].reshape(x.shape[0], -1)[:, :n]

    q = columns(read(f"{prefix}.qweight"))  # [K, N] 0..15
    zeros = columns(read(f"{prefix}.qzeros")).astype(np.float32)  # [groups, N]
    scales = _f16(np.asarray(read(f"{prefix}.scales"), np.float32))
    return {"data": _pack_rows(q), "scales": scales, "mins": _f16(-scales.astype(np.float32) * zeros)}


def resolve_requested(requested: str, q: CheckpointQuantization) -> str:
    """The engine's quantization for a quantized checkpoint: its own formats ("native"), when
    `requested` ("auto", "native", the checkpoint's method, or fp8 for an fp8 checkpoint) agrees."""
    fp8_checkpoint = q.kind in ("ct-float", "fp8")
    if requested in ("auto", "native", q.method) or (requested == "fp8" and fp8_checkpoint):
        return "native"
    raise UnsupportedQuantization(
        f"--quantization {requested} contradicts the checkpoint's quantization_config ({q.description}): a "
        f"quantized checkpoint is served in its own format; pass --quantization {q.method} or leave it out")
