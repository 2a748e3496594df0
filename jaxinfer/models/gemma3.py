"""Gemma 3 (text) as Flax NNX modules over the paged KV cache, built like `models/llama.py`.

What Gemma 3 changes against Llama, top to bottom:
- the embedding is scaled by sqrt(hidden_size), rounded to the model's dtype (as HF does);
- each layer normalizes four times, before and after attention and before and after the MLP, and
  normalizes q and k per head before RoPE; every Gemma RMSNorm multiplies by (1 + weight), with the
  weights kept as HF stores them;
- the MLP is GeGLU (tanh-approximated gelu);
- five sliding-window ("local") layers to one global layer: the local ones attend over the last
  `sliding_window` positions with RoPE base 10k, the global ones over everything with their own base
  (1M, and the checkpoint's rope scaling). The window and the RoPE frequencies are per-layer arrays
  scanned beside the stacked parameters, so the layers still run under one `lax.scan`;
- queries are scaled by query_pre_attn_scalar ** -1/2; scores and final logits are soft-capped
  when the config says so (Gemma 3 does not).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import ops
from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import (_LAYER_TENSORS, AttentionMetadata, all_reduce, DecoderLayer, Llama, apply_rope,
                                   rms_norm, rope_inv_freq)
from jaxinfer.models.params import load_stacked
from jaxinfer.quant import project


def gemma_norm(x, weight, eps):
    """Gemma's RMSNorm: the normalized x times (1 + weight), weight as HF stores it. Unlike Llama's,
    the product is taken in float32 and only then rounded to x's dtype (as HF's Gemma3RMSNorm does)."""
    return rms_norm(x.astype(jnp.float32), 1.0 + weight.astype(jnp.float32), eps).astype(x.dtype)


def layer_rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[num_layers, head_dim // 2] float32: each layer's RoPE inverse frequencies. Sliding-window
    layers use `rope_local_theta` unscaled; global layers `rope_theta` with the checkpoint's scaling."""
    local = rope_inv_freq(dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=None,
                                              rope_freq_factors=None))
    full = rope_inv_freq(config)
    return np.stack([local if window else full for window in config.layer_windows()])


class Gemma3DecoderLayer(DecoderLayer):
    """Llama's projections and norms (`post_attention_norm` here normalizes the attention output, as
    HF's `post_attention_layernorm` does in Gemma) plus Gemma's four other norms."""

    def __init__(self, config: ModelConfig, *, dtype, stack=(), formats=None, quant_backend="auto"):
        super().__init__(config, dtype=dtype, stack=stack, formats=formats, quant_backend=quant_backend)
        hidden, head_dim = config.hidden_size, config.head_dim
        self.pre_feedforward_norm = nnx.Param(jnp.zeros((*stack, hidden), dtype))
        self.post_feedforward_norm = nnx.Param(jnp.zeros((*stack, hidden), dtype))
        self.q_norm = nnx.Param(jnp.zeros((*stack, head_dim), dtype))
        self.k_norm = nnx.Param(jnp.zeros((*stack, head_dim), dtype))

    def __call__(self, x, positions, k_cache, v_cache, layer, meta: AttentionMetadata, *, config, inv_freq,
                 sliding_window, attention_backend, tp_axis=None):
        """inv_freq [head_dim // 2] and sliding_window (int32 scalar, 0: none) are this layer's own."""
        c, eps = config, config.rms_norm_eps
        num_tokens = x.shape[0]
        h = gemma_norm(x, self.input_norm[...], eps)
        q, k, v = project(h, (self.q_proj, self.k_proj, self.v_proj), layer)
        q = q.reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = (t.reshape(num_tokens, c.num_kv_heads, c.head_dim) for t in (k, v))
        q, k = gemma_norm(q, self.q_norm[...], eps), gemma_norm(k, self.k_norm[...], eps)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_cache, v_cache = ops.write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping, backend=attention_backend)
        attn = ops.ragged_paged_attention(
            q, k_cache, v_cache, layer, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sm_scale=c.query_pre_attn_scalar ** -0.5, sliding_window=sliding_window,
            soft_cap=c.attn_logit_softcap, backend=attention_backend)
        attn = all_reduce(self.o_proj(attn.reshape(num_tokens, c.num_heads * c.head_dim), layer), tp_axis)
        x = x + gemma_norm(attn, self.post_attention_norm[...], eps)
        h = gemma_norm(x, self.pre_feedforward_norm[...], eps)
        gate, up = project(h, (self.gate_proj, self.up_proj), layer)
        h = all_reduce(self.down_proj(jax.nn.gelu(gate, approximate=True) * up, layer), tp_axis)
        return x + gemma_norm(h, self.post_feedforward_norm[...], eps), k_cache, v_cache


class Gemma3(Llama):
    """Llama's embedding, LM head (tied: Gemma's is) and layer scan, with Gemma 3's layers."""

    LAYER = Gemma3DecoderLayer

    def __call__(self, token_ids, positions, k_cache, v_cache, meta: AttentionMetadata):
        """Same contract as `Llama.__call__`: logits [S, vocab] float32 at `meta.logits_indices`, and the caches."""
        c = self.config
        x = self.embed_tokens(token_ids)  # [T, hidden]
        x = x * jnp.asarray(math.sqrt(c.hidden_size), jnp.float32).astype(x.dtype)
        per_layer = dict(inv_freq=jnp.asarray(layer_rope_inv_freq(c)),  # [layers, head_dim // 2]
                         sliding_window=jnp.asarray(c.layer_windows(), jnp.int32))  # [layers]
        x, k_cache, v_cache = self.run_layers(x, positions, k_cache, v_cache, meta, per_layer)
        logits = self.head(gemma_norm(x[meta.logits_indices], self.norm[...], c.rms_norm_eps))
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
        return logits, k_cache, v_cache


# Our parameter path -> (HF tensor name template, transpose to [in, out]); Gemma 3 has no biases (its
# q_norm and k_norm are Llama's entries, as Qwen3's).
LAYER_TENSORS = {path: spec for path, spec in _LAYER_TENSORS.items() if path[-1] != "b"} | {
    ("pre_feedforward_norm",): ("model.layers.{}.pre_feedforward_layernorm.weight", False),
    ("post_feedforward_norm",): ("model.layers.{}.post_feedforward_layernorm.weight", False),
}


def load_gemma3(config: ModelConfig, checkpoint, **options) -> Gemma3:
    """A Gemma 3 model with the checkpoint's weights (`params.load_stacked`'s options)."""
    return load_stacked(Gemma3, LAYER_TENSORS, config, checkpoint, **options)
