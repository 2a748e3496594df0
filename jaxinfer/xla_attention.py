"""Ragged paged attention for XLA (the CPU path without the native kernel): the reference's math
(`kernels_pallas.paged_attention.ragged_paged_attention_reference`, the specification) in blocks of
rows and chunks of context.

Like the reference, the query rows are cut into blocks of consecutive rows of one sequence, and a
block gathers its sequence's pages once for all its rows. Unlike it, the context is walked in chunks
of `pages_per_chunk` pages with an online softmax. Each block starts at the chunk holding its first
row's sliding-window start (chunks wholly outside the window are not read) and stops at its own
length; the walk runs as many chunks as the longest block needs (a `while` loop with a run-time trip
count): a step's cost follows the real context lengths, not the block table's width (max_model_len),
so that width needs no compile buckets.
"""

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention import MASK_VALUE, in_window, window_start, work_table


def ragged_paged_attention_xla(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables, *, sm_scale,
                               sliding_window=None, soft_cap=None, pages_per_chunk=8):
    """Same contract as `paged_attention.ragged_paged_attention_reference`.

    q: [T, heads, head_dim]; k_cache, v_cache: [layers, kv_heads, pages, page_size, head_dim];
    block_tables: [S, max_pages]. Returns [T, heads, head_dim] in q's dtype; padding rows are zeros.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = block_tables.shape[0]
    # Blocks of block_q rows (see the reference): decode rows are blocks of one; a prefill chunk
    # gathers its pages once per block_q rows instead of once per row.
    block_q = max(1, num_tokens // num_seqs)
    num_blocks = min(num_tokens // block_q + num_seqs, num_tokens)
    seq, first_row, num_rows, first_pos, kv_len = work_table(
        query_start_loc, seq_lens, num_tokens, block_q, num_blocks).T  # each [num_blocks]
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    row_valid = offsets[None, :] < num_rows[:, None]  # [num_blocks, block_q]
    rows = jnp.where(row_valid, first_row[:, None] + offsets, num_tokens)  # past the end: dropped
    positions = first_pos[:, None] + offsets  # [num_blocks, block_q]
    qb = q.at[rows].get(mode="clip").astype(jnp.float32) * sm_scale
    qb = qb.reshape(num_blocks, block_q, num_kv_heads, group, head_dim)

    chunk_pages = min(pages_per_chunk, block_tables.shape[1])
    chunk = chunk_pages * page_size
    tables = block_tables[seq]  # [num_blocks, max_pages]
    tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % chunk_pages)))
    # Block b walks chunks first_chunk[b] .. cdiv(kv_len[b], chunk) - 1; past its last one, its pages
    # are clipped to the table and its keys masked (key_pos >= kv_len).
    first_chunk = window_start(first_pos, sliding_window) // chunk  # [num_blocks]
    num_chunks = (kv_len + chunk - 1) // chunk - first_chunk  # padding blocks: kv_len 0, first_chunk 0

    def body(c, carry):
        m, l, acc = carry  # [B, kv_heads, group, block_q] twice, then [..., head_dim]
        chunk_index = first_chunk + c  # [B]
        page_index = chunk_index[:, None] * chunk_pages + jnp.arange(chunk_pages, dtype=jnp.int32)
        pages = jnp.take_along_axis(tables, page_index, axis=1, mode="clip")  # [B, chunk_pages]
        # One gather straight from the whole cache reads only these pages:
        # [B, chunk_pages, kv_heads, page_size, head_dim] -> [B, kv_heads, chunk, head_dim]
        k = k_cache[layer, :, pages].swapaxes(1, 2).reshape(num_blocks, num_kv_heads, chunk, head_dim)
        v = v_cache[layer, :, pages].swapaxes(1, 2).reshape(num_blocks, num_kv_heads, chunk, head_dim)
        s = jnp.einsum("bqkgd,bkcd->bkgqc", qb, k.astype(jnp.float32))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = (chunk_index * chunk)[:, None, None] + jnp.arange(chunk, dtype=jnp.int32)  # [B, 1, chunk]
        mask = key_pos <= positions[..., None]  # [B, block_q, chunk]
        mask &= in_window(key_pos, positions[..., None], sliding_window)
        mask &= (key_pos < kv_len[:, None, None]) & row_valid[..., None]
        mask = mask[:, None, None]  # [B, 1, 1, block_q, chunk]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("bkgqc,bkcd->bkgqd", p, v.astype(jnp.float32))
        return m_new, l, acc

    shape = (num_blocks, num_kv_heads, group, block_q)
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, jnp.max(num_chunks), body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)  # [B, kvh, g, block_q, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_blocks, block_q, num_heads, head_dim).astype(q.dtype)
    # Every real row belongs to exactly one block; rows in no block (padding) stay zero.
    return jnp.zeros_like(q).at[rows].set(out, mode="drop")
