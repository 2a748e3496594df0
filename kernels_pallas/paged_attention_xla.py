"""Ragged paged attention for XLA (the CPU path): the reference's math, chunked over the context.

The reference gathers each row's whole block table, so its cost follows the block table's width
(max_model_len), not the sequences' real lengths. This variant walks the context in chunks of
`pages_per_chunk` pages with an online softmax, and the loop stops at the longest sequence of the
batch (a `while` loop with a run-time trip count): a step's cost follows the real context, and the
block-table width no longer needs its own compile buckets.
"""

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention import MASK_VALUE, token_metadata


def ragged_paged_attention_xla(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables, *, sm_scale,
                               sliding_window=None, soft_cap=None, pages_per_chunk=8):
    """Same contract as `paged_attention.ragged_paged_attention_reference`.

    q: [T, heads, head_dim]; k_cache, v_cache: [layers, kv_heads, pages, page_size, head_dim];
    block_tables: [S, max_pages]. Returns [T, heads, head_dim] in q's dtype; padding rows are zeros.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    seq_ids, positions, valid = token_metadata(query_start_loc, seq_lens, num_tokens)
    chunk_pages = min(pages_per_chunk, block_tables.shape[1])
    chunk = chunk_pages * page_size
    tables = block_tables[seq_ids]  # [T, max_pages]
    pad = -tables.shape[1] % chunk_pages
    tables = jnp.pad(tables, ((0, 0), (0, pad)))
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale

    def body(c, carry):
        m, l, acc = carry  # [T, kv_heads, group], [T, kv_heads, group], [T, kv_heads, group, head_dim]
        pages = jax.lax.dynamic_slice_in_dim(tables, c * chunk_pages, chunk_pages, axis=1)  # [T, chunk_pages]
        # One gather per chunk straight from the whole cache: only these pages are read.
        # [T, chunk_pages, kv_heads, page_size, head_dim] -> [T, kv_heads, chunk, head_dim]
        k = k_cache[layer, :, pages].swapaxes(1, 2).reshape(num_tokens, num_kv_heads, chunk, head_dim)
        v = v_cache[layer, :, pages].swapaxes(1, 2).reshape(num_tokens, num_kv_heads, chunk, head_dim)
        s = jnp.einsum("tkgd,tkcd->tkgc", qg, k.astype(jnp.float32))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        mask = (key_pos[None, :] <= positions[:, None]) & valid[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > positions[:, None] - sliding_window
        mask = mask[:, None, None, :]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("tkgc,tkcd->tkgd", p, v.astype(jnp.float32))
        return m_new, l, acc

    num_chunks = (jnp.max(seq_lens) + chunk - 1) // chunk
    init = (jnp.full((num_tokens, num_kv_heads, group), MASK_VALUE, jnp.float32),
            jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
            jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
