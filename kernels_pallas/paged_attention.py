"""Ragged paged attention: the `jax.numpy` reference (the XLA path on CPU).

The batch is ragged and flat, as the runner builds it: the query tokens of all scheduled sequences
are concatenated, decode rows (one token) and prefill chunks (many) side by side. Sequence `s` owns
query rows `query_start_loc[s]:query_start_loc[s+1]`, has `seq_lens[s]` tokens in the cache in all
(the new ones included: their K/V are written before attention runs), and its pages are listed in
`block_tables[s]`. The query rows of a sequence are its last positions, so row `i` of a chunk of
`q_len` rows sits at position `seq_lens[s] - q_len + i` and sees the keys at positions `<= ` that.

KV cache layout, shared by every kernel of this package: one array per K and V,
`[num_layers, num_kv_heads, num_pages, page_size, head_dim]`. A page of one head is contiguous
(`page_size x head_dim`), which is what a GPU kernel wants to load per block-table entry, and the
layer axis lets one array be threaded through `lax.scan` over layers and updated in place.
"""

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


def write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping):
    """Writes the new tokens' K/V into their cache slots.

    k_cache, v_cache: [num_layers, num_kv_heads, num_pages, page_size, head_dim]
    layer: int32 scalar (may be traced: the scan's layer index)
    k, v: [num_tokens, num_kv_heads, head_dim]
    slot_mapping: [num_tokens] int32, page * page_size + offset; negative for padding rows,
        which are dropped.
    """
    _, _, num_pages, page_size, _ = k_cache.shape
    # A padding row goes to page `num_pages`, out of bounds, and `mode="drop"` discards it.
    page = jnp.where(slot_mapping >= 0, slot_mapping // page_size, num_pages)
    offset = jnp.where(slot_mapping >= 0, slot_mapping % page_size, 0)
    # Advanced indices at axes 0, 2, 3 split by a slice: the update is indexed [num_tokens, num_kv_heads, head_dim].
    k_cache = k_cache.at[layer, :, page, offset].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, :, page, offset].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def token_metadata(query_start_loc, seq_lens, num_tokens):
    """For every query row: its sequence index, its position, and whether it is a real token.

    query_start_loc: [num_seqs + 1] int32; seq_lens: [num_seqs] int32.
    Returns seq_ids [T] (clamped to a valid index for padding rows), positions [T], valid [T].
    """
    num_seqs = seq_lens.shape[0]
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_ids = jnp.searchsorted(query_start_loc[1:], rows, side="right").astype(jnp.int32)
    valid = seq_ids < num_seqs
    seq_ids = jnp.minimum(seq_ids, num_seqs - 1)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    positions = seq_lens[seq_ids] - q_lens[seq_ids] + (rows - query_start_loc[seq_ids])
    return seq_ids, positions, valid


def ragged_paged_attention_reference(
    q,
    k_cache,
    v_cache,
    layer,
    query_start_loc,
    seq_lens,
    block_tables,
    *,
    sm_scale,
    sliding_window=None,
    soft_cap=None,
):
    """Attention of every query row over its own sequence's pages.

    q: [num_tokens, num_heads, head_dim]
    k_cache, v_cache: [num_layers, num_kv_heads, num_pages, page_size, head_dim]
    layer: int32 scalar; query_start_loc: [num_seqs + 1]; seq_lens: [num_seqs];
    block_tables: [num_seqs, max_pages_per_seq] int32 (entries past a sequence's pages are ignored).
    sliding_window: a query at position p sees keys at positions > p - sliding_window only.
    soft_cap: scores become soft_cap * tanh(scores / soft_cap) before the softmax.
    Returns [num_tokens, num_heads, head_dim] in q's dtype; padding rows are zeros.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_pages = block_tables.shape[1]
    seq_ids, positions, valid = token_metadata(query_start_loc, seq_lens, num_tokens)

    # Each row gathers its own sequence's pages: [kv_heads, T, max_pages, page_size, head_dim].
    # This is exact and simple; it reads a sequence's pages once per query row, which is the
    # ideal for decode rows and wasteful for long prefill chunks (the Pallas kernel is not).
    pages = block_tables[seq_ids]  # [T, max_pages]
    k = k_cache[layer][:, pages].reshape(num_kv_heads, num_tokens, max_pages * page_size, head_dim)
    v = v_cache[layer][:, pages].reshape(num_kv_heads, num_tokens, max_pages * page_size, head_dim)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,ktsd->tkgs", qg, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(max_pages * page_size, dtype=jnp.int32)
    mask = key_pos[None, :] <= positions[:, None]  # [T, S]
    if sliding_window is not None:
        mask &= key_pos[None, :] > positions[:, None] - sliding_window
    mask &= valid[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None, :], probs, 0.0)
    out = jnp.einsum("tkgs,ktsd->tkgd", probs, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
