"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) as Flax NNX modules over a paged KV cache.

One forward serves prefill and decode: it takes the ragged flat batch of DESIGN.md, writes the new
tokens' K/V into their pages and attends over pages. The decoder layers hold their parameters
stacked on a leading `[num_layers]` axis and run under `lax.scan`: one layer is traced and compiled,
and only one layer's temporaries are alive at a time.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from kernels_pallas import dispatch


class AttentionMetadata(NamedTuple):
    """Where the batch's tokens go in the cache and what each sequence attends to."""

    slot_mapping: jax.Array  # [T] int32: page * page_size + offset of each new K/V; -1 for padding
    query_start_loc: jax.Array  # [S + 1] int32: sequence s owns query rows [qsl[s], qsl[s+1])
    seq_lens: jax.Array  # [S] int32: tokens of each sequence in the cache, the new ones included
    block_tables: jax.Array  # [S, max_pages] int32: pages of each sequence, in order
    logits_indices: jax.Array  # [S] int32: the row whose logits each sequence needs (its last)


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
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


class Linear(nnx.Module):
    """y = x @ w (+ b). w: [*stack, in_features, out_features]."""

    def __init__(self, in_features, out_features, *, dtype, bias=False, stack=()):
        self.w = nnx.Param(jnp.zeros((*stack, in_features, out_features), dtype))
        self.b = nnx.Param(jnp.zeros((*stack, out_features), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.w[...]
        return y if self.b is None else y + self.b[...]


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, stack=()):
        c = config
        hidden, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_norm = nnx.Param(jnp.zeros((*stack, hidden), dtype))
        self.q_proj = Linear(hidden, q_dim, dtype=dtype, bias=c.attention_bias, stack=stack)
        self.k_proj = Linear(hidden, kv_dim, dtype=dtype, bias=c.attention_bias, stack=stack)
        self.v_proj = Linear(hidden, kv_dim, dtype=dtype, bias=c.attention_bias, stack=stack)
        self.o_proj = Linear(q_dim, hidden, dtype=dtype, stack=stack)
        self.post_attention_norm = nnx.Param(jnp.zeros((*stack, hidden), dtype))
        self.gate_proj = Linear(hidden, c.intermediate_size, dtype=dtype, stack=stack)
        self.up_proj = Linear(hidden, c.intermediate_size, dtype=dtype, stack=stack)
        self.down_proj = Linear(c.intermediate_size, hidden, dtype=dtype, stack=stack)

    def __call__(self, x, positions, k_cache, v_cache, layer, meta: AttentionMetadata, *, config, inv_freq,
                 attention_backend):
        c = config
        num_tokens = x.shape[0]
        h = rms_norm(x, self.input_norm[...], c.rms_norm_eps)
        q = self.q_proj(h).reshape(num_tokens, c.num_heads, c.head_dim)
        k = self.k_proj(h).reshape(num_tokens, c.num_kv_heads, c.head_dim)
        v = self.v_proj(h).reshape(num_tokens, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_cache, v_cache = dispatch.write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping,
                                             backend=attention_backend)
        attn = dispatch.ragged_paged_attention(
            q, k_cache, v_cache, layer, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sm_scale=c.head_dim ** -0.5, sliding_window=c.sliding_window, backend=attention_backend)
        x = x + self.o_proj(attn.reshape(num_tokens, c.num_heads * c.head_dim))
        h = rms_norm(x, self.post_attention_norm[...], c.rms_norm_eps)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, k_cache, v_cache


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, attention_backend="auto"):
        c = config
        self.config = config
        self.attention_backend = attention_backend
        self.embed = nnx.Param(jnp.zeros((c.vocab_size, c.hidden_size), dtype))  # [vocab, hidden]
        self.layers = DecoderLayer(config, dtype=dtype, stack=(c.num_layers,))
        self.norm = nnx.Param(jnp.zeros((c.hidden_size,), dtype))
        # [vocab, hidden], like the embedding it may share
        self.lm_head = None if c.tie_word_embeddings else nnx.Param(jnp.zeros((c.vocab_size, c.hidden_size), dtype))

    def __call__(self, token_ids, positions, k_cache, v_cache, meta: AttentionMetadata):
        """token_ids, positions: [T] int32; k_cache, v_cache: [layers, kv_heads, pages, page_size, head_dim].

        Returns logits [S, vocab] float32 at `meta.logits_indices`, and the updated caches.
        """
        x = self.embed[...][token_ids]  # [T, hidden]
        layer_def, layer_state = nnx.split(self.layers)
        inv_freq = jnp.asarray(rope_inv_freq(self.config))  # a trace-time constant

        def body(carry, state):
            x, k_cache, v_cache, layer = carry
            x, k_cache, v_cache = nnx.merge(layer_def, state)(
                x, positions, k_cache, v_cache, layer, meta, config=self.config, inv_freq=inv_freq,
                attention_backend=self.attention_backend)
            return (x, k_cache, v_cache, layer + 1), None

        # The caches ride in the carry (not xs/ys): with the step's caches donated, XLA updates them in place.
        (x, k_cache, v_cache, _), _ = jax.lax.scan(body, (x, k_cache, v_cache, jnp.int32(0)), layer_state)
        x = rms_norm(x[meta.logits_indices], self.norm[...], self.config.rms_norm_eps)
        head = self.embed[...] if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("sh,vh->sv", x, head, preferred_element_type=jnp.float32)
        return logits, k_cache, v_cache


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


def load_llama(config: ModelConfig, checkpoint, *, dtype=jnp.float32, attention_backend="auto") -> Llama:
    """Builds the model with the checkpoint's weights, one stacked parameter at a time.

    The module is created abstractly (no memory), then each parameter is read layer by layer into
    one host buffer and moved to the device, so at most one parameter has a second copy at a time.
    """
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, attention_backend=attention_backend))
    graphdef, state = nnx.split(model)
    shapes = nnx.to_pure_dict(state)
    params = {"embed": jnp.asarray(checkpoint.tensor("model.embed_tokens.weight"), dtype),
              "norm": jnp.asarray(checkpoint.tensor("model.norm.weight"), dtype), "layers": {}}
    if not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(checkpoint.tensor("lm_head.weight"), dtype)
    layer_items = [(path, spec) for path, spec in _LAYER_TENSORS.items() if _get(shapes["layers"], path) is not None]
    for path, (template, transpose) in tqdm(layer_items, desc="Loading weights", unit="tensor", leave=False):
        target = _get(shapes["layers"], path)
        host = np.empty(target.shape, dtype=np.float32)
        for layer in range(config.num_layers):
            w = checkpoint.tensor(template.format(layer))
            host[layer] = w.T if transpose else w
        _set(params["layers"], path, jnp.asarray(host, dtype))
        del host
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


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
