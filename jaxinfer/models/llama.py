"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as Flax NNX modules over a paged KV cache.

One forward serves prefill and decode: it takes a ragged flat batch (every sequence's new tokens one
after another; `AttentionMetadata` says where each sequence's rows are), writes the new tokens' K/V
into their pages and attends over pages. The decoder layers hold their parameters
stacked on a leading `[num_layers]` axis and run under `lax.scan`: one layer is traced and compiled,
and only one layer's temporaries are alive at a time. Each projection's weight is full precision or
quantized (`jaxinfer.quant`), one format per projection across the layers.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import kquant, ops
from jaxinfer.config import ModelConfig
from jaxinfer.quant import Linear, WeightFormat, project


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
        if c.qk_norm:  # Qwen3
            self.q_norm = nnx.Param(jnp.zeros((*stack, c.head_dim), dtype))
            self.k_norm = nnx.Param(jnp.zeros((*stack, c.head_dim), dtype))

    def __call__(self, x, positions, k_cache, v_cache, layer, meta: AttentionMetadata, *, config, inv_freq,
                 attention_backend, tp_axis=None, sliding_window=None):
        """Under tensor parallelism `config` counts this device's heads and MLP columns, and the two
        row-parallel projections' outputs are summed over the `tp_axis` devices (`all_reduce`).
        `sliding_window`: this layer's (an int32 scalar, 0: none) where layers differ, else None: the
        config's, for every layer."""
        c = config
        num_tokens = x.shape[0]
        h = rms_norm(x, self.input_norm[...], c.rms_norm_eps)
        q, k, v = project(h, (self.q_proj, self.k_proj, self.v_proj), layer)
        q = q.reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = (t.reshape(num_tokens, c.num_kv_heads, c.head_dim) for t in (k, v))
        if c.qk_norm:
            q, k = rms_norm(q, self.q_norm[...], c.rms_norm_eps), rms_norm(k, self.k_norm[...], c.rms_norm_eps)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_cache, v_cache = ops.write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping, backend=attention_backend)
        attn = ops.ragged_paged_attention(
            q, k_cache, v_cache, layer, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sm_scale=c.head_dim ** -0.5, sliding_window=c.sliding_window if sliding_window is None else sliding_window,
            backend=attention_backend)
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
        # A window on some layers only (Qwen2's max_window_layers): each layer's, scanned with it
        per_layer = None
        if self.config.layer_types:
            per_layer = dict(sliding_window=jnp.asarray(self.config.layer_windows(), jnp.int32))
        x, k_cache, v_cache = self.run_layers(x, positions, k_cache, v_cache, meta, per_layer, inv_freq=inv_freq)
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
    ("q_norm",): ("model.layers.{}.self_attn.q_norm.weight", False),  # Qwen3 and Gemma 3
    ("k_norm",): ("model.layers.{}.self_attn.k_norm.weight", False),
}
