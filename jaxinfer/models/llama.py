"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) as Flax NNX modules over a paged KV cache.

One forward serves prefill and decode: it takes a ragged flat batch (every sequence's new tokens one
after another; `AttentionMetadata` says where each sequence's rows are), writes the new tokens' K/V
into their pages and attends over pages. The decoder layers hold their parameters
stacked on a leading `[num_layers]` axis and run under `lax.scan`: one layer is traced and compiled,
and only one layer's temporaries are alive at a time. Each projection's weight is full precision or
quantized (`jaxinfer.quant`), one format per projection across the layers.
"""

import dataclasses
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer import kquant, ops, quant
from jaxinfer.config import ModelConfig
from jaxinfer.quant import Linear, WeightFormat, project
from jaxinfer.weights.cache import WeightCache

logger = logging.getLogger("jaxinfer")


class AttentionMetadata(NamedTuple):
    """Where the batch's tokens go in the cache and what each sequence attends to."""

    slot_mapping: jax.Array  # [T] int32: page * page_size + offset of each new K/V; -1 for padding
    query_start_loc: jax.Array  # [S + 1] int32: sequence s owns query rows [qsl[s], qsl[s+1])
    seq_lens: jax.Array  # [S] int32: tokens of each sequence in the cache, the new ones included
    block_tables: jax.Array  # [S, max_pages] int32: pages of each sequence, in order
    logits_indices: jax.Array  # [S] int32: the row whose logits each sequence needs (its last)


def row_sum(x):
    """Sum over the last axis in one fixed order, a pairwise tree, whatever the other dimensions.

    XLA's own reduction vectorizes across rows once there are several (8+ on this CPU), which adds a
    row's values in a different order than for a lone row: a 1-ulp difference that int8 activations can
    turn into a different token. Elementwise adds of halves leave XLA no order to choose.
    """
    n = x.shape[-1]
    width = 1 << (n - 1).bit_length()
    if width != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x  # [..., 1]


def rms_norm(x, weight, eps):
    """Each row's result is bitwise the same whatever else is in the batch (`row_sum`)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(row_sum(x32 * x32) / x.shape[-1] + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, with the checkpoint's scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is not None and scaling[0] == "linear":
        inv_freq = inv_freq / scaling[1]
    elif scaling is not None and scaling[0] == "llama3":
        _, factor, low_freq_factor, high_freq_factor, old_len = scaling
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low_freq_factor, old_len / high_freq_factor
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, dtype=np.float64)
    return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [T, heads, head_dim]; positions: [T] int32."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, head_dim // 2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def all_reduce(partial, tp_axis):
    """A row-parallel projection's output: each tensor-parallel device holds the partial sum over its
    rows (heads, MLP columns); the sum over devices is the whole. Without tensor parallelism (`tp_axis`
    None) the output is already whole."""
    return partial if tp_axis is None else jax.lax.psum(partial, tp_axis)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")  # tensor parallelism splits their input rows, the others' columns


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, stack=(), formats=None, quant_backend="auto"):
        c = config
        hidden, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        formats = formats or {}  # projection name -> WeightFormat; missing: full precision

        def linear(name, in_features, out_features, bias=False):
            return Linear(in_features, out_features, dtype=dtype, bias=bias, stack=stack, fmt=formats.get(name),
                          backend=quant_backend)

        self.input_norm = nnx.Param(jnp.zeros((*stack, hidden), dtype))
        self.q_proj = linear("q_proj", hidden, q_dim, bias=c.attention_bias)
        self.k_proj = linear("k_proj", hidden, kv_dim, bias=c.attention_bias)
        self.v_proj = linear("v_proj", hidden, kv_dim, bias=c.attention_bias)
        self.o_proj = linear("o_proj", q_dim, hidden)
        self.post_attention_norm = nnx.Param(jnp.zeros((*stack, hidden), dtype))
        self.gate_proj = linear("gate_proj", hidden, c.intermediate_size)
        self.up_proj = linear("up_proj", hidden, c.intermediate_size)
        self.down_proj = linear("down_proj", c.intermediate_size, hidden)

    def __call__(self, x, positions, k_cache, v_cache, layer, meta: AttentionMetadata, *, config, inv_freq,
                 attention_backend, tp_axis=None):
        """Under tensor parallelism `config` counts this device's heads and MLP columns, and the two
        row-parallel projections' outputs are summed over the `tp_axis` devices (`all_reduce`)."""
        c = config
        num_tokens = x.shape[0]
        h = rms_norm(x, self.input_norm[...], c.rms_norm_eps)
        q, k, v = project(h, (self.q_proj, self.k_proj, self.v_proj), layer)
        q = q.reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = (t.reshape(num_tokens, c.num_kv_heads, c.head_dim) for t in (k, v))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_cache, v_cache = ops.write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping, backend=attention_backend)
        attn = ops.ragged_paged_attention(
            q, k_cache, v_cache, layer, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sm_scale=c.head_dim ** -0.5, sliding_window=c.sliding_window, backend=attention_backend)
        x = x + all_reduce(self.o_proj(attn.reshape(num_tokens, c.num_heads * c.head_dim), layer), tp_axis)
        h = rms_norm(x, self.post_attention_norm[...], c.rms_norm_eps)
        gate, up = project(h, (self.gate_proj, self.up_proj), layer)
        x = x + all_reduce(self.down_proj(jax.nn.silu(gate) * up, layer), tp_axis)
        return x, k_cache, v_cache


class Llama(nnx.Module):
    LAYER = DecoderLayer  # built once, every parameter stacked on a leading [num_layers] axis
    # The mesh axis a tensor-parallel shard of the model runs under (`jaxinfer.tensor_parallel` sets it
    # on the per-device copy, whose `config` then counts one device's heads); None: the whole model.
    tp_axis = None
    vocab_parallel = False  # under `tp_axis`: this device holds its range of the vocabulary (`embed_tokens`)

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, attention_backend="auto", formats=None,
                 quant_backend="auto", head_format: WeightFormat | None = None, embed_type: str | None = None):
        c = config
        self.config = config
        self.embed_type = embed_type  # a block type of 32: the embedding's rows as the file stores them
        self.attention_backend = attention_backend
        self.layers = self.LAYER(config, dtype=dtype, stack=(c.num_layers,), formats=formats,
                                 quant_backend=quant_backend)
        self.norm = nnx.Param(jnp.zeros((c.hidden_size,), dtype))
        if head_format is None:
            self.embed = nnx.Param(jnp.zeros((c.vocab_size, c.hidden_size), dtype))  # [vocab, hidden]
            # [vocab, hidden], like the embedding it may share
            self.lm_head = None if c.tie_word_embeddings else nnx.Param(jnp.zeros((c.vocab_size, c.hidden_size), dtype))
        else:
            # A quantized LM head is a Linear [hidden, vocab] with one scale per vocabulary entry. A tied
            # embedding reads its rows from it (a row's scale is the entry's scale): no full-precision copy.
            self.lm_head = Linear(c.hidden_size, c.vocab_size, dtype=dtype, fmt=head_format, backend=quant_backend)
            self.embed = nnx.Param(jnp.zeros((c.vocab_size, c.hidden_size), dtype)) if not c.tie_word_embeddings else None
        if embed_type is not None:  # only untied: [vocab, hidden / 32 * block bytes] uint8
            row_bytes = c.hidden_size // kquant.BLOCK * kquant.BLOCK_BYTES[embed_type]
            self.embed = nnx.Param(jnp.zeros((c.vocab_size, row_bytes), jnp.uint8))

    def embed_tokens(self, token_ids):
        """[T] int32 -> [T, hidden]. Vocab-parallel, this device's table holds entries [start, start +
        config.vocab_size): it looks up the tokens in that range, zeros elsewhere, and the sum over
        devices gives every row (exactly: one term is not zero)."""
        if not self.vocab_parallel:
            return self.lookup(token_ids)
        start = jax.lax.axis_index(self.tp_axis) * self.config.vocab_size
        local = token_ids - start
        inside = (local >= 0) & (local < self.config.vocab_size)
        rows = self.lookup(jnp.where(inside, local, 0))
        return jax.lax.psum(jnp.where(inside[:, None], rows, 0), self.tp_axis)

    def lookup(self, token_ids):
        """[T] int32 -> [T, hidden]: rows of this model's table."""
        if self.embed_type is not None:
            return kquant.dequantize_rows(self.embed[...][token_ids], self.embed_type).astype(self.norm[...].dtype)
        if self.embed is not None:
            return self.embed[...][token_ids]
        w = self.lm_head.quantized_weight()  # int8 [hidden, vocab] (or a CPU layout), per entry or per 32 rows
        if w.layout == "blocked":  # [vocab / B, hidden, B]
            block = w.data.shape[-1]
            rows = w.data[token_ids // block, :, token_ids % block]
        elif w.layout in ("vnni", "codes"):  # [vocab / B, hidden / 4, B, 4]; codes: value + 128
            block = w.data.shape[-2]
            rows = w.data[token_ids // block, :, token_ids % block, :].reshape(len(token_ids), -1)
            rows = rows.astype(jnp.int16) - 128 if w.layout == "codes" else rows
        else:
            rows = jnp.take(w.data, token_ids, axis=1).T
        if w.group_size:  # scales [hidden / 32, vocab]
            scales = jnp.repeat(jnp.take(w.scales, token_ids, axis=1).T.astype(jnp.float32), w.group_size, axis=1)
        else:
            scales = w.scales[token_ids].astype(jnp.float32)[:, None]
        return (rows.astype(jnp.float32) * scales).astype(self.norm[...].dtype)

    def __call__(self, token_ids, positions, k_cache, v_cache, meta: AttentionMetadata):
        """token_ids, positions: [T] int32; k_cache, v_cache: [layers, kv_heads, pages, page_size, head_dim].

        Returns logits [S, vocab] float32 at `meta.logits_indices`, and the updated caches.
        """
        x = self.embed_tokens(token_ids)  # [T, hidden]
        inv_freq = jnp.asarray(rope_inv_freq(self.config))  # a trace-time constant
        x, k_cache, v_cache = self.run_layers(x, positions, k_cache, v_cache, meta, inv_freq=inv_freq)
        x = rms_norm(x[meta.logits_indices], self.norm[...], self.config.rms_norm_eps)
        return self.head(x), k_cache, v_cache

    def run_layers(self, x, positions, k_cache, v_cache, meta: AttentionMetadata, per_layer=None, **constants):
        """The decoder layers under one `lax.scan`: x [T, hidden] -> [T, hidden], and the updated caches.

        `per_layer`: a dict of [num_layers, ...] arrays scanned beside the layers' parameters, each layer
        getting its own row as a keyword (Gemma 3's window and RoPE frequencies differ by layer);
        `constants` go to every layer as they are.
        """
        # Quantized projection weights stay whole and each projection reads its layer's slice itself
        # (in place, for the native CPU kernel); everything else is sliced by the scan.
        quantized = {name for name in PROJECTIONS if getattr(self.layers, name).fmt is not None}
        layer_def, whole, layer_state = nnx.split(
            self.layers, lambda path, _: path[0] in quantized and path[-1] in ("w", "scales", "mins", "kquant_index",
                                                                             "input_perm"),
            ...)

        def body(carry, xs):
            x, k_cache, v_cache, layer = carry
            state, values = xs
            x, k_cache, v_cache = nnx.merge(layer_def, whole, state)(
                x, positions, k_cache, v_cache, layer, meta, config=self.config,
                attention_backend=self.attention_backend, tp_axis=self.tp_axis, **constants, **values)
            return (x, k_cache, v_cache, layer + 1), None

        # The caches ride in the carry (not xs/ys): with the step's caches donated, XLA updates them in place.
        (x, k_cache, v_cache, _), _ = jax.lax.scan(
            body, (x, k_cache, v_cache, jnp.int32(0)), (layer_state, per_layer or {}))
        return x, k_cache, v_cache

    def head(self, x):
        """The LM head: x [S, hidden], final-normed -> logits [S, vocab] float32."""
        if isinstance(self.lm_head, Linear):
            return self.lm_head(x).astype(jnp.float32)
        head = self.embed[...] if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("sh,vh->sv", x, head, preferred_element_type=jnp.float32)


# Our parameter path -> (HF tensor name template, transpose to [in, out])
_LAYER_TENSORS = {
    ("input_norm",): ("model.layers.{}.input_layernorm.weight", False),
    ("post_attention_norm",): ("model.layers.{}.post_attention_layernorm.weight", False),
    ("q_proj", "w"): ("model.layers.{}.self_attn.q_proj.weight", True),
    ("k_proj", "w"): ("model.layers.{}.self_attn.k_proj.weight", True),
    ("v_proj", "w"): ("model.layers.{}.self_attn.v_proj.weight", True),
    ("o_proj", "w"): ("model.layers.{}.self_attn.o_proj.weight", True),
    ("q_proj", "b"): ("model.layers.{}.self_attn.q_proj.bias", False),
    ("k_proj", "b"): ("model.layers.{}.self_attn.k_proj.bias", False),
    ("v_proj", "b"): ("model.layers.{}.self_attn.v_proj.bias", False),
    ("gate_proj", "w"): ("model.layers.{}.mlp.gate_proj.weight", True),
    ("up_proj", "w"): ("model.layers.{}.mlp.up_proj.weight", True),
    ("down_proj", "w"): ("model.layers.{}.mlp.down_proj.weight", True),
}


def projection_formats(config: ModelConfig, checkpoint, quantization: str = "none",
                       group_size: int | None = None, kquants: bool = False,
                       grouped: bool = False, row_split: int = 1) -> dict[str, tuple[WeightFormat, bool]]:
    """projection -> (its format, whether the checkpoint holds it in that format already).

    `quantization`: "none" (empty: all full precision), "native" (what a GGUF file carries: its
    Q8_0/Q4_0/Q4_1 blocks as they are, with `kquants` also its Q4_K/Q5_K/Q6_K, Q5_0/Q5_1 and
    projections mixing types (`kquant_formats`), with `grouped` instead those in the narrowest
    grouped format that holds them exactly (`weights.gguf.group_format`: int5/int6/int8 groups, for
    the paths without byte stacks, a GPU's), float tensors in full precision, other types requantized
    to int8), or a format of `quant.QUANTIZATIONS`, which GGUF blocks of the same kind and group
    satisfy without requantization. `row_split`: tensor parallelism's size, over which the row-parallel
    projections' input rows are split (a stored format is kept where its groups fit each piece).
    """
    if quantization == "none":
        return {}
    requested = None if quantization == "native" else quant.weight_format(quantization, group_size)
    native_format = getattr(checkpoint, "native_format", lambda name: None)  # HF checkpoints: never native
    formats = {}
    kept = kquant_formats(config, checkpoint) if quantization == "native" and kquants else {}
    if kept:
        logger.info("GGUF blocks kept as stored (native byte-stack kernel): %s", "; ".join(
            f"{proj} " + ", ".join(f"{t} x{fmt.layer_types.count(t)}" for t in sorted(set(fmt.layer_types)))
            for proj, fmt in kept.items()))
    for proj in PROJECTIONS:
        if proj in kept:
            formats[proj] = (kept[proj], True)
            continue
        template = _LAYER_TENSORS[(proj, "w")][0]
        names = [template.format(layer) for layer in range(config.num_layers)]
        if hasattr(checkpoint, "stack_format"):
            stored = checkpoint.stack_format(names, grouped, row_split if proj in ROW_PARALLEL else 1)
        else:
            found = {native_format(name) for name in names}
            stored = found.pop() if len(found) == 1 else None
        if stored is not None and (requested is None or (
                stored.kind, stored.symmetric) == (requested.kind, requested.symmetric) and
                (group_size is None or group_size == stored.group_size)):
            formats[proj] = (stored, True)
            continue
        types = sorted({checkpoint.tensor_type(name) for name in names}) if hasattr(checkpoint, "tensor_type") else []
        stored_quantized = any(t not in ("F32", "F16", "BF16") for t in types)
        if requested is None and not stored_quantized:
            continue  # "native" of a full-precision tensor: full precision
        fmt = requested or quant.weight_format("int8")
        if stored_quantized:
            logger.info("%s: %s weights are dequantized and requantized to %s", proj, "/".join(types), fmt.name)
        formats[proj] = (fmt, False)
    return formats


def kquant_formats(config: ModelConfig, checkpoint) -> dict[str, WeightFormat]:
    """The projections kept as the file stores them in a byte stack (`jaxinfer.kquant`), as "kquant"
    formats: those whose layers are all of its types and hold a K-quant, a Q5_0/Q5_1, or a mix of
    types. A stack of one of Q8_0/Q4_0/Q4_1 throughout stays with `group_matmul` (`native_format`)."""
    if not hasattr(checkpoint, "kquant_tensor"):
        return {}
    c = config
    shapes = {"q_proj": (c.hidden_size, c.num_heads * c.head_dim), "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
              "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim), "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
              "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
              "down_proj": (c.intermediate_size, c.hidden_size)}
    formats = {}
    for proj in PROJECTIONS:
        template = _LAYER_TENSORS[(proj, "w")][0]
        types = tuple(checkpoint.tensor_type(template.format(layer)) for layer in range(c.num_layers))
        group_matmul_runs = len(set(types)) == 1 and types[0] in ("Q8_0", "Q4_0", "Q4_1")
        if all(t in kquant.TYPES for t in types) and not group_matmul_runs and kquant.fits(*shapes[proj], types):
            formats[proj] = WeightFormat("kquant", layer_types=types)
    return formats


def head_tensor_name(config: ModelConfig) -> str:
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def load_llama(config: ModelConfig, checkpoint, **options) -> Llama:
    """A Llama-family model with the checkpoint's weights (`load_stacked`'s options)."""
    return load_stacked(Llama, _LAYER_TENSORS, config, checkpoint, **options)


def load_stacked(model_cls, layer_tensors, config: ModelConfig, checkpoint, *, dtype=jnp.float32,
                 attention_backend="auto", quantization="none", group_size=None, quant_backend="auto",
                 cache_dir=None, lm_head_quantization="none", kquants=False, grouped=False, row_split=1):
    """Builds `model_cls` (Llama or a model built like it) with the checkpoint's weights, one stacked
    parameter at a time. `layer_tensors`: parameter path in the layer -> (HF name template, transpose).

    The module is created abstractly (no memory), then each parameter is read layer by layer into
    one host buffer and moved to the device, so at most one parameter has a second copy at a time.
    Quantized projections (see `projection_formats`) are quantized one layer at a time: no
    full-precision copy of them reaches the device. With `cache_dir`, converted weights are kept
    there (orbax) and read back by later loads of the same file in the same formats.
    `lm_head_quantization` "int8" quantizes the LM head per vocabulary entry, "native" keeps a GGUF's
    Q8_0 head as stored (a tied embedding then reads its rows from it); "none" keeps it in `dtype`.
    `kquants`: "native" keeps the file's K-quant, Q5_0/Q5_1 and mixed-type projections as stored
    (where their kernel runs: `kquant_formats`); `grouped`: else in grouped formats that hold them
    exactly (`projection_formats`, with `row_split`).
    """
    formats = projection_formats(config, checkpoint, quantization, group_size, kquants, grouped, row_split)
    down_order_absorbed = _absorbs_down_proj_order(formats)
    if down_order_absorbed:  # down_proj's act-order goes into gate/up's columns at load: no gather
        formats["down_proj"] = (dataclasses.replace(formats["down_proj"][0], act_order=False), True)
    if lm_head_quantization not in ("none", "int8", "native"):
        raise ValueError(f"lm_head_quantization must be none, int8 or native, got {lm_head_quantization!r}")
    head_format = quant.weight_format("int8") if lm_head_quantization == "int8" else None
    if lm_head_quantization == "native":
        head_format = _native_head_format(config, checkpoint)
    embed_type = _stored_embed_type(config, checkpoint) if quantization == "native" and kquants else None
    model = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, attention_backend=attention_backend,
                                             formats={p: f for p, (f, _) in formats.items()},
                                             quant_backend=quant_backend, head_format=head_format,
                                             embed_type=embed_type))
    graphdef, state = nnx.split(model)
    shapes = nnx.to_pure_dict(state)
    cache = None
    if cache_dir and (formats or head_format):
        key_fields = {"dtype": jnp.dtype(dtype).name,
                      "formats": {p: [f.name, native] + ([list(f.layer_types), kquant.LAYOUT_VERSION] if f.layer_types
                                                         else []) for p, (f, native) in sorted(formats.items())}}
        if head_format is not None:
            key_fields["lm_head"] = head_format.name
        if getattr(checkpoint, "quantization", None) is not None:  # the reader of the producer's format
            key_fields["checkpoint_quantization"] = checkpoint.quantization.description
        if embed_type is not None:
            key_fields["embed"] = [embed_type, kquant.LAYOUT_VERSION]
        cache = WeightCache(cache_dir, checkpoint.path, **key_fields)
        params = cache.load(shapes)
        if params is not None:
            nnx.replace_by_pure_dict(state, params)
            return nnx.merge(graphdef, state)
    params = _read_params(config, checkpoint, shapes, formats, dtype, layer_tensors, head_format, embed_type,
                          down_order_absorbed)
    if cache is not None:
        cache.save(params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _native_head_format(config: ModelConfig, checkpoint) -> WeightFormat:
    """The LM head as stored: Q8_0 blocks, or (a head not tied to the embedding) a byte-stack type."""
    name = head_tensor_name(config)
    head_format = getattr(checkpoint, "native_format", lambda name: None)(name)
    if head_format is not None and head_format.kind == "int8":
        return head_format
    stored = checkpoint.tensor_type(name) if hasattr(checkpoint, "tensor_type") else None
    if (stored in kquant.TYPES and not config.tie_word_embeddings
            and kquant.fits(config.hidden_size, config.vocab_size, (stored,))):
        return WeightFormat("kquant", layer_types=(stored,))
    raise ValueError("lm_head_quantization='native' needs a checkpoint whose LM head is stored as Q8_0, or as a "
                     "K-quant and not tied to the embedding")


def _stored_embed_type(config: ModelConfig, checkpoint) -> str | None:
    """The embedding's type where it is kept as the file stores it: a block type of 32 (Qwen2.5-0.5B's
    Q5_0), not tied to the LM head (which reads it by columns). Else None: dequantized to `dtype`."""
    name = "model.embed_tokens.weight"
    stored = checkpoint.tensor_type(name) if hasattr(checkpoint, "raw_rows") else None
    if config.tie_word_embeddings or stored not in kquant.TYPES or kquant.TYPES[stored].block != kquant.BLOCK:
        return None
    return stored if config.hidden_size % kquant.BLOCK == 0 else None


def _absorbs_down_proj_order(formats) -> bool:
    """Whether down_proj's act-order permutation moves into gate/up's output columns: its input is
    act(gate(h)) * up(h), elementwise, so x[..., perm] is act(h @ Wg[:, perm]) * (h @ Wu[:, perm]).
    Not through K-quant byte stacks (their columns are not addressable one by one)."""
    down = formats.get("down_proj")
    return (down is not None and down[0].act_order
            and all(formats.get(p) is None or formats[p][0].kind != "kquant" for p in ("gate_proj", "up_proj")))


def _permute_columns(x, perms):
    """x [L, ..., N] with each layer's columns in `perms` [L, N] order."""
    index = jnp.asarray(perms).reshape(perms.shape[0], *([1] * (x.ndim - 2)), perms.shape[1])
    return jnp.take_along_axis(x, index, axis=-1)


def _read_params(config, checkpoint, shapes, formats, dtype, layer_tensors, head_format=None,
                 embed_type=None, down_order_absorbed=False) -> dict:
    params = {"norm": jnp.asarray(checkpoint.tensor("model.norm.weight"), dtype), "layers": {}}
    if embed_type is not None:
        params["embed"] = jnp.asarray(checkpoint.raw_rows("model.embed_tokens.weight"))
    elif head_format is None or not config.tie_word_embeddings:
        params["embed"] = jnp.asarray(checkpoint.tensor("model.embed_tokens.weight"), dtype)
    if head_format is not None and head_format.kind == "kquant":  # the file's own super-blocks
        params["lm_head"] = _read_quantized(checkpoint, head_tensor_name(config), 1, head_format, True, None)
    elif head_format is not None and head_format.group_size:  # the file's own blocks
        arrays = checkpoint.quantized_tensor(head_tensor_name(config))
        params["lm_head"] = {"w": jnp.asarray(arrays["data"]), "scales": jnp.asarray(arrays["scales"])}
    elif head_format is not None:
        qw = quant.quantize(jnp.asarray(checkpoint.tensor(head_tensor_name(config)).T, jnp.float32), head_format)
        params["lm_head"] = {"w": qw.data, "scales": qw.scales}
    elif not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(checkpoint.tensor("lm_head.weight"), dtype)
    layer_items = [(path, spec) for path, spec in layer_tensors.items() if _get(shapes["layers"], path) is not None]
    # down_proj first: with its act-order absorbed, its permutation reorders gate/up's columns
    layer_items.sort(key=lambda item: item[0] != ("down_proj", "w"))
    down_perms = None  # [L, intermediate] int32
    for path, (template, transpose) in tqdm(layer_items, desc="Loading weights", unit="tensor", leave=False):
        if path[-1] == "w" and path[0] in formats:
            arrays = _read_quantized(checkpoint, template, config.num_layers, *formats[path[0]],
                                     shapes["layers"][path[0]])
            if path[0] == "down_proj" and down_order_absorbed:
                down_perms = arrays.pop("input_perm")
            elif path[0] in ("gate_proj", "up_proj") and down_perms is not None:
                arrays = {key: value if key == "input_perm" else _permute_columns(value, down_perms)
                          for key, value in arrays.items()}
            params["layers"].setdefault(path[0], {}).update(arrays)
            continue
        target = _get(shapes["layers"], path)
        host = np.empty(target.shape, dtype=np.float32)
        for layer in range(config.num_layers):
            w = checkpoint.tensor(template.format(layer))
            host[layer] = w.T if transpose else w
        value = jnp.asarray(host, dtype)
        if path[0] in ("gate_proj", "up_proj") and down_perms is not None:  # full precision, or a bias
            value = _permute_columns(value, down_perms)
        _set(params["layers"], path, value)
        del host
    return params


def _read_quantized(checkpoint, template, num_layers, fmt: WeightFormat, native: bool, targets) -> dict:
    """{"w", "scales"(, "mins")} of one stacked projection: the checkpoint's blocks as stored
    (`native`), or each layer's full-precision weight quantized on its own. K-quants: {"w",
    "kquant_index"}, every layer's super-blocks rearranged (`kquant.stack_layers`)."""
    if fmt.kind == "kquant":
        data, index = kquant.stack_layers([
            (kind, kquant.pack_layer(checkpoint.kquant_tensor(template.format(layer)), kind))
            for layer, kind in enumerate(fmt.layer_types)])
        return {"w": jnp.asarray(data), "kquant_index": jnp.asarray(index)}
    parts = {"w": "data", "scales": "scales", "mins": "mins", "input_perm": "input_perm"}
    host = {key: np.empty(targets[key].shape, targets[key].dtype) for key in parts if key in targets}
    absorbed_perms = []  # act-order stored, absorbed by the previous projection (`_read_params`)
    for layer in range(num_layers):
        name = template.format(layer)
        if native and hasattr(checkpoint, "stack_format"):  # GGUF: each layer's type in the stack's format
            arrays = checkpoint.quantized_tensor(name, fmt)
        elif native:
            arrays = checkpoint.quantized_tensor(name)
        else:
            qw = quant.quantize(jnp.asarray(checkpoint.tensor(name).T, jnp.float32), fmt)
            arrays = {"data": qw.data, "scales": qw.scales, "mins": qw.mins}
        for key in host:
            host[key][layer] = np.asarray(arrays[parts[key]])
        if "input_perm" in arrays and "input_perm" not in host:
            absorbed_perms.append(np.asarray(arrays["input_perm"]))
    out = {key: jnp.asarray(value) for key, value in host.items()}
    return out | ({"input_perm": np.stack(absorbed_perms)} if absorbed_perms else {})


def _get(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
