"""Weight formats in memory, their quantizers, and the linear layer every projection of the model uses.

A projection's weight W[*stack, in, out] is either full precision (the model's dtype) or a
`QuantizedWeight` in one `WeightFormat` (the packed layouts are specified, with their reference
dequantization, in `kernels_pallas.quant_matmul`):
- int8: symmetric, one scale per output channel (group_size 0) or per group of 32 rows (GGUF Q8_0);
- int4: two values per byte, one scale (and, asymmetric, one min) per group of 32/64/128 rows;
- int5, int6: int4's nibbles and a plane of the codes' high bits, in groups of 16 or 32 rows: GGUF's
  5- and 6-bit blocks as stored where no byte stack runs them (a GPU: `weights.gguf.group_format`);
- fp8: float8_e4m3fn, one scale per output channel;
- kquant: GGUF's blocks as stored in one byte stack, a type per layer (`jaxinfer.kquant`): K-quants,
  Q5_0/Q5_1, and Q8_0/Q4_0/Q4_1 where a projection mixes types.
Quantized weights stay quantized in device memory: the layer hands them to `ops.quant_matmul`
(Pallas kernel with in-register dequant on GPU, the native or XLA path on CPU).
The norms and biases stay in full precision; the LM head (with a tied embedding) is int8 per
vocabulary entry when asked or when the checkpoint stores it quantized (`resolve_lm_head_quantization`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer import kquant, ops
from kernels_pallas import quant_matmul as qmm

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized W[K, N] (layouts: `kernels_pallas.quant_matmul`). A pytree: under `lax.scan`
    over layers a stacked [num_layers, ...] weight slices like any array."""

    data: jax.Array
    scales: jax.Array
    mins: jax.Array | None = None
    format: str = dataclasses.field(default="int8", metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    # "kn": data as specified. "blocked" (per-channel int8 and fp8 on the CPU): data [NB, K, B], each
    # block of B columns contiguous for the native CPU kernel (`kernels_cpu.native.to_blocked`); "vnni":
    # data [NB, K / 4, B, 4] for its integer path (`kernels_cpu.native.to_vnni`); "codes" (int8 and int4
    # in groups of 32, 64 or 128 on the CPU): unsigned codes for the native grouped kernel
    # (`native.to_group_codes`).
    layout: str = dataclasses.field(default="kn", metadata=dict(static=True))

    @property
    def stacked(self) -> bool:
        """Whether this is a stack of weights (a leading layer axis)."""
        return self.scales.ndim > (2 if self.group_size else 1)

    @property
    def shape(self):
        if self.layout == "blocked":
            return (self.data.shape[-2], self.scales.shape[-1])
        if self.layout == "vnni" or self.layout == "codes" and self.format == "int8":
            return (self.data.shape[-3] * 4, self.scales.shape[-1])
        if self.layout == "codes":  # int4: [NB, K / 32, 4, B, 4]
            return (self.data.shape[-4] * 32, self.scales.shape[-1])
        return (qmm.weight_rows(self.data, self.format, self.scales, self.group_size), self.data.shape[-1])

    def kn_data(self):
        """`data` in the "kn" layout the reference and the Pallas kernel read."""
        if self.layout == "kn":
            return self.data
        from kernels_cpu import native

        if self.layout == "codes":
            return native.from_group_codes(self.data, self.bits, self.shape[1])
        return (native.from_blocked if self.layout == "blocked" else native.from_vnni)(self.data, self.shape[1])

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4, "fp8": 8, "int5": 5, "int6": 6}[self.format]


def _safe_divide(w, scale):
    return w / jnp.where(scale == 0, 1, scale)


def quantize_int8(w, *, group_size=0, scale_dtype=jnp.float32) -> QuantizedWeight:
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


def quantize_int4(w, *, group_size=32, symmetric=True, scale_dtype=jnp.float32) -> QuantizedWeight:
    """int4 with one scale (and, asymmetric, one min) per group of `group_size` rows.

    Symmetric is GGUF Q4_0's rule: scale = (the value of largest magnitude) / -8, so that value
    maps exactly to q = 0. Asymmetric is Q4_1's: scale = (max - min) / 15, min = min.
    """
    return quantize_nibbles(w, "int4", group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)


def quantize_nibbles(w, kind: str, *, group_size=32, symmetric=True, scale_dtype=jnp.float32) -> QuantizedWeight:
    """int4, int5 or int6 (`kind`, b bits) by `quantize_int4`'s rules with 2^b levels: symmetric,
    scale = (the value of largest magnitude) / -2^(b-1) (GGUF Q5_0's rule for b = 5); else
    scale = (max - min) / (2^b - 1), min = min (Q5_1's). int5/int6 need K a multiple of 128 (their
    high-bit bands); GGUF files bring their own codes (`weights.gguf`): this is for random weights."""
    k, n = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size} (and even)")
    bits = {"int4": 4, "int5": 5, "int6": 6}[kind]
    half, top = 2 ** (bits - 1), 2 ** bits - 1
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    if symmetric:
        biggest = jnp.take_along_axis(groups, jnp.abs(groups).argmax(axis=1)[:, None], axis=1)[:, 0]
        scales, mins = biggest / -float(half), None
        q = jnp.round(_safe_divide(groups, scales[:, None])) + half
    else:
        lo, hi = groups.min(axis=1), groups.max(axis=1)
        scales, mins = (hi - lo) / float(top), lo
        q = jnp.round(_safe_divide(groups - lo[:, None], scales[:, None]))
    q = jnp.clip(q, 0, top).reshape(k, n).astype(jnp.int32)
    data = pack_int4(q) if kind == "int4" else qmm.pack_high_bits(q, kind, xp=jnp)
    return QuantizedWeight(data, scales.astype(scale_dtype), None if mins is None else mins.astype(scale_dtype),
                           kind, group_size)


def quantize_fp8(w, *, scale_dtype=jnp.float32) -> QuantizedWeight:
    """float8_e4m3fn with one scale per output channel (the channel's max maps to 448)."""
    w = w.astype(jnp.float32)
    scales = jnp.abs(w).max(axis=0) / FP8_MAX  # [N]
    q = jnp.clip(_safe_divide(w, scales), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return QuantizedWeight(q, scales.astype(scale_dtype), None, "fp8", 0)


def dequantize(w: QuantizedWeight, dtype=jnp.float32):
    """The full-precision W[K, N], by the formats' reference (`kernels_pallas.quant_matmul`)."""
    return qmm.dequantize_reference(w.kn_data(), w.scales, w.mins, fmt=w.format, group_size=w.group_size,
                                    dtype=dtype)


def quant_matmul_reference(x, w: QuantizedWeight):
    """x: [M, K] -> [M, N] in x's dtype: dequantize W, then one dot accumulating in float32."""
    return qmm.quant_matmul_reference(x, w.kn_data(), w.scales, w.mins, fmt=w.format, group_size=w.group_size)


# `quantization` values: "none" keeps the checkpoint's weights in full precision; "native" keeps a
# GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are (and, where the native CPU kernel runs them, its
# K-quants, Q5_0/Q5_1 and projections mixing types: `jaxinfer.kquant`); "int4" has a min per group
# (GGUF Q4_1's rule), "int4_sym" none (Q4_0's); "auto" is `resolve_quantization`'s choice.
# "compressed-tensors", "gptq", "awq" (and "fp8" for an FP8 checkpoint) name a checkpoint quantized by
# its producer: it is served in its own format (`jaxinfer.weights.quantized`), and they are an error
# for any other checkpoint; vLLM's `--quantization` names.
CHECKPOINT_QUANTIZATIONS = ("compressed-tensors", "gptq", "awq")
QUANTIZATIONS = ("auto", "none", "native", "int8", "int4", "int4_sym", "fp8") + CHECKPOINT_QUANTIZATIONS
INT4_GROUP_SIZES = (32, 64, 128)
NIBBLE_KINDS = ("int4", "int5", "int6")  # symmetric or with a min
# Scales and mins in float16 (as GGUF stores them): int4 g32 with a min costs 20 bytes per 32 weights.
SCALE_DTYPE = jnp.float16


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    kind: str  # "int8" | "int4" | "fp8" | "int5" | "int6" | "kquant"
    group_size: int = 0  # rows per scale; 0: one scale per output channel
    symmetric: bool = True  # int4, int5, int6: False adds a min per group
    layer_types: tuple[str, ...] = ()  # kquant only: each layer's GGUF type (`jaxinfer.kquant`)
    # Act-order (GPTQ desc_act, compressed-tensors actorder "group"): W's rows are stored sorted by
    # group, and the layer gathers x's columns into that order (`input_perm` [*stack, in]) before the
    # matmul: y = x[..., perm] @ W_sorted.
    act_order: bool = False

    @property
    def name(self) -> str:
        if self.kind == "kquant":
            return "+".join(sorted(set(self.layer_types)))
        group = f"-g{self.group_size}" if self.group_size else ""
        return (f"{self.kind}{group}{'-sym' if self.kind in NIBBLE_KINDS and self.symmetric else ''}"
                f"{'-actorder' if self.act_order else ''}")


def weight_format(quantization: str, group_size: int | None = None) -> WeightFormat | None:
    """The format a load-time quantizer writes for `quantization` (None: full precision)."""
    if quantization in CHECKPOINT_QUANTIZATIONS:
        raise ValueError(f"--quantization {quantization} names a {quantization} checkpoint, and this one has no "
                         "quantization_config: it is full precision (round-to-nearest: int8, int4, int4_sym, fp8)")
    if quantization not in QUANTIZATIONS or quantization in ("auto", "native"):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS[3:7]} or none, got {quantization!r}")
    if quantization == "none":
        return None
    if quantization.startswith("int4"):
        group_size = group_size or 32
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        return WeightFormat("int4", group_size, symmetric=quantization == "int4_sym")
    if group_size:
        raise ValueError(f"{quantization} is per output channel; a group size applies to int4 only")
    return WeightFormat(quantization)


def resolve_quantization(quantization: str, platform: str, is_gguf: bool, cpu_runs_blocks: bool = False
                         ) -> tuple[str, str]:
    """("auto" resolved, why). On GPU: what the checkpoint carries. On CPU (docs/QUANTIZATION.md): a
    GGUF file's own Q8_0/Q4_0/Q4_1 blocks and K-quants where the native grouped kernels run them
    (`cpu_runs_blocks`), which adds only the activations' rounding to the file's weights, as
    llama.cpp does; else int8 per channel, run by the native int8 kernel's integer path."""
    if quantization != "auto":
        return quantization, "requested"
    if platform == "cpu" and is_gguf and cpu_runs_blocks:
        return "native", ("the file's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 blocks and Q4_K/Q5_K/Q6_K super-blocks as stored "
                          "(other types requantized to int8), run by the native grouped kernels on int8 activations: "
                          "docs/QUANTIZATION.md")
    if platform == "cpu":
        return "int8", "int8 per channel on CPU, run by the native int8 kernel: docs/QUANTIZATION.md"
    if is_gguf:
        return "native", "the GGUF file's own formats"
    return "none", "the checkpoint's own precision"


def resolve_lm_head_quantization(value: str, quantization: str, stored_type: str | None,
                                 native_head: bool = False, tied: bool = True) -> str:
    """The LM head's format ("none", "int8" or "native"). "auto": the file's own Q8_0 blocks, or
    K-quant super-blocks of a head not `tied` to the embedding (no row lookup reads that layout),
    when the projections are "native" and the platform runs them (`native_head`); else int8 (per
    vocabulary entry) when the projections are quantized and the checkpoint stores the head
    quantized itself (`stored_type`), which is the file asking for it; a full-precision head stays so."""
    if value != "auto":
        return value
    if quantization == "native" and native_head and (stored_type == "Q8_0" or stored_type in kquant.TYPES and not tied):
        return "native"
    stored_quantized = stored_type is not None and stored_type not in ("F32", "F16", "BF16")
    return "int8" if quantization != "none" and stored_quantized else "none"


def quantized_shapes(fmt: WeightFormat, in_features: int, out_features: int, stack=()):
    """{"data"|"scales"|"mins": (shape, dtype)} of W[*stack, in, out] in `fmt`; for "kquant"
    {"data"|"kquant_index"}: every layer's bytes in one array, and each layer's type and offset."""
    k, n = in_features, out_features
    if fmt.kind == "kquant":
        return {"data": ((kquant.stack_bytes(fmt.layer_types, k, n),), jnp.uint8),
                "kquant_index": ((len(fmt.layer_types), 2), jnp.int32)}
    if fmt.group_size and k % fmt.group_size:
        raise ValueError(f"in_features={k} is not a multiple of the group size {fmt.group_size}")
    scales = (*stack, k // fmt.group_size, n) if fmt.group_size else (*stack, n)
    if fmt.kind == "int4":
        data = ((*stack, k // 2, n), jnp.uint8)
    elif fmt.kind in qmm.HIGH_BITS:
        data = ((*stack, k // 2 + qmm.high_rows(fmt.kind, k), n), jnp.uint8)
    else:
        data = ((*stack, k, n), jnp.int8 if fmt.kind == "int8" else jnp.float8_e4m3fn)
    shapes = {"data": data, "scales": (scales, SCALE_DTYPE)}
    if fmt.kind in NIBBLE_KINDS and not fmt.symmetric:
        shapes["mins"] = (scales, SCALE_DTYPE)
    if fmt.act_order:
        shapes["input_perm"] = ((*stack, k), jnp.int32)
    return shapes


@functools.partial(jax.jit, static_argnames="fmt")
def quantize(w, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a full-precision W[in, out]."""
    if fmt.kind == "int8":
        return quantize_int8(w, group_size=fmt.group_size, scale_dtype=SCALE_DTYPE)
    if fmt.kind in NIBBLE_KINDS:
        return quantize_nibbles(w, fmt.kind, group_size=fmt.group_size, symmetric=fmt.symmetric,
                                scale_dtype=SCALE_DTYPE)
    if fmt.kind == "fp8":
        return quantize_fp8(w, scale_dtype=SCALE_DTYPE)
    raise ValueError(f"no round-to-nearest quantizer for {fmt.name}")


class Linear(nnx.Module):
    """y = x @ W (+ b). W: [*stack, in_features, out_features], full precision (`fmt` None) or quantized."""

    def __init__(self, in_features, out_features, *, dtype, bias=False, stack=(), fmt: WeightFormat | None = None,
                 backend="auto"):
        self.fmt, self.backend = fmt, backend  # static: part of the graph, not of the state
        self.layout = "kn"  # "blocked" and others: see `use_blocked_layout`; "kquant": `jaxinfer.kquant`
        self.in_features, self.out_features = in_features, out_features
        if fmt is None:
            self.w = nnx.Param(jnp.zeros((*stack, in_features, out_features), dtype))
        elif fmt.kind == "kquant":
            self.layout = "kquant"
            shapes = quantized_shapes(fmt, in_features, out_features, stack)
            self.w = nnx.Param(jnp.zeros(*shapes["data"]))
            self.kquant_index = nnx.Param(jnp.zeros(*shapes["kquant_index"]))
            self.input_perm = None
        else:
            shapes = quantized_shapes(fmt, in_features, out_features, stack)
            self.w = nnx.Param(jnp.zeros(*shapes["data"]))
            self.scales = nnx.Param(jnp.zeros(*shapes["scales"]))
            self.mins = nnx.Param(jnp.zeros(*shapes["mins"])) if "mins" in shapes else None
            # act-order (`WeightFormat.act_order`): [*stack, in] int32
            self.input_perm = nnx.Param(jnp.zeros(*shapes["input_perm"])) if "input_perm" in shapes else None
        self.b = nnx.Param(jnp.zeros((*stack, out_features), dtype)) if bias else None

    def quantized_weight(self) -> "QuantizedWeight | kquant.KQuantWeight":
        if self.layout == "kquant":
            return kquant.KQuantWeight(self.w[...], self.kquant_index[...], self.in_features, self.out_features,
                                       self.fmt.layer_types)
        mins = None if self.mins is None else self.mins[...]
        return QuantizedWeight(self.w[...], self.scales[...], mins, self.fmt.kind, self.fmt.group_size, self.layout)

    def weight_params(self) -> list[nnx.Param]:
        """W's parameters: the weight, and when quantized its scales (and mins); not the bias."""
        if self.fmt is None:
            return [self.w]
        if self.layout == "kquant":
            return [self.w, self.kquant_index]
        return ([self.w, self.scales] + ([] if self.mins is None else [self.mins])
                + ([] if self.input_perm is None else [self.input_perm]))

    def __call__(self, x, layer=None):
        """x[..., in] -> [..., out]. A quantized weight may be the whole layer stack
        ([num_layers, ...], see `Llama.__call__`): `layer` then picks the layer's own (a K-quant
        weight of one layer is a stack of one, `ops.quant_matmul` reads its layer 0)."""
        if self.fmt is None:
            y = x @ self.w[...]
        else:
            w = self.quantized_weight()
            stacked = w.stacked
            if stacked and layer is None:
                raise ValueError("a stacked quantized weight needs the layer index")
            if self.input_perm is not None:  # act-order: x's columns in W's row order
                perm = self.input_perm[...]
                x = jnp.take(x, perm[layer] if stacked else perm, axis=-1)
            y = ops.quant_matmul(x, w, backend=self.backend, layer=layer if stacked else None)
        return y if self.b is None else y + self.b[...]


def project(x, linears, layer=None) -> list:
    """[linear(x, layer) for linear in linears]: the projections of one input (a layer's q, k and v;
    its gate and up). Their quantized weights go to `ops.quant_matmuls` together, which runs those
    of one native CPU kernel in one call: x quantized once, one split of the work between the threads
    (on the CPU, fusing q/k/v made them 1.3-1.45x faster: docs/KERNELS.md). The same numbers as
    separate calls, bit for bit; full-precision and act-order projections go one by one."""
    together = [i for i, linear in enumerate(linears) if linear.fmt is not None and linear.input_perm is None]
    outs = [None] * len(linears)
    if len(together) > 1:
        weights = [linears[i].quantized_weight() for i in together]
        stacked = {w.stacked for w in weights}
        if stacked == {True} and layer is None:
            raise ValueError("a stacked quantized weight needs the layer index")
        if len(stacked) == 1 and len({linears[i].backend for i in together}) == 1:
            ys = ops.quant_matmuls(x, weights, backend=linears[together[0]].backend,
                                   layer=layer if stacked == {True} else None)
            for i, y in zip(together, ys):
                outs[i] = y if linears[i].b is None else y + linears[i].b[...]
    return [out if out is not None else linear(x, layer) for out, linear in zip(outs, linears)]


def use_blocked_layout(model: nnx.Module, integer: bool = True) -> dict[str, int]:
    """Re-lays the quantized weights of `model` for the native CPU kernels, in place. Per-channel
    int8: the "vnni" layout of the integer path where the build has it and K is a multiple of 32
    (`integer`), else "blocked"; fp8 (per channel, or in groups of 128 rows): "blocked" (the int8
    kernel's float path). int8 and int4 in groups of 32 (GGUF's Q8_0, Q4_0, Q4_1), 64 or 128 (AWQ,
    GPTQ, compressed-tensors), with `integer` and N a multiple of 16: "codes", for the grouped
    integer kernel; else they stay on the XLA path. Returns how many weights went to each layout. Only
    for a model that runs on the CPU with the native kernels available."""
    changed: dict[str, int] = {}
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, Linear) or node.fmt is None or node.layout != "kn":
            continue
        layout, data = native_layout(node.fmt, node.w[...], integer)
        if layout == "kn":
            continue
        node.layout, node.w = layout, nnx.Param(data)
        changed[node.layout] = changed.get(node.layout, 0) + 1
    return changed


def native_layout(fmt: WeightFormat, data, integer: bool = True):
    """(layout, data in it) of a quantized weight's "kn" `data` ([*stack, K, N]; int4 packed) for the
    native CPU kernels (`use_blocked_layout`'s rules); ("kn", data) where none of them takes it."""
    from kernels_cpu import native

    k, n = data.shape[-2] * (2 if fmt.kind == "int4" else 1), data.shape[-1]
    if fmt.kind == "int8" and not fmt.group_size:
        # A -128 (a checkpoint's int8 in the full [-128, 127] range: compressed-tensors W8A16) has no
        # negation on the AVX2 integer path (`native.to_vnni`): such a weight takes the float path.
        layout = ("vnni" if integer and native.has_integer_path() and k % 32 == 0 and not bool(jnp.any(data == -128))
                  else "blocked")
        return layout, (native.to_vnni if layout == "vnni" else native.to_blocked)(data)
    if fmt.kind == "fp8":  # the int8 kernel's float path, e4m3 widened in registers
        return "blocked", native.to_blocked(data)
    if (fmt.kind in ("int8", "int4") and fmt.group_size in native.GROUP_SIZES and integer
            and native.has_group_path() and n % 16 == 0):
        return "codes", native.to_group_codes(data, 8 if fmt.kind == "int8" else 4)
    return "kn", data


def weight_bytes_by_format(model: nnx.Module) -> dict[str, int]:
    """Bytes of the model's parameters on device, by format: each quantized projection (data,
    scales and mins) under its format's name, everything else under its dtype's name."""
    format_of = {}  # id(param) -> format name
    if getattr(model, "embed_type", None) is not None:  # the embedding's rows as stored (`Llama.embed_type`)
        format_of[id(model.embed)] = f"{model.embed_type} embedding"
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.fmt is not None:
            format_of.update((id(p), node.fmt.name) for p in node.weight_params())
    totals: dict[str, int] = {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            name = format_of.get(id(node)) or jnp.dtype(node[...].dtype).name
            totals[name] = totals.get(name, 0) + node[...].nbytes
    return totals


def linear_weight_bytes(model: nnx.Module) -> int:
    """Bytes of the projections' weights alone (W with its scales and mins; no biases)."""
    return sum(p[...].nbytes for _, node in nnx.iter_graph(model) if isinstance(node, Linear)
               for p in node.weight_params())
