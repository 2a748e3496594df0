"""Ragged paged attention and the K/V page write: `jax.numpy` references (the XLA path on CPU)
and Pallas kernels for the GPU (Triton backend), with the same signatures.

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

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -1e30


def in_window(keys, positions, sliding_window):
    """Whether a query at `positions` sees the keys at `keys` through its sliding window: the rule
    every kernel here and in `jaxinfer`/`kernels_cpu` follows (this function is its statement).

    `sliding_window` is None (no window), or an int32 scalar, a Python int or a traced value (a
    model with local and global layers scans one per layer): a query at position p sees keys at
    positions > p - sliding_window; a value <= 0 means no window, so one traced value can say "global".
    """
    if sliding_window is None:
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(keys), jnp.shape(positions)), bool)
    window = jnp.asarray(sliding_window, jnp.int32)
    return (window <= 0) | (keys > positions - window)


def window_start(first_pos, sliding_window):
    """The first key position a query at `first_pos` (or any later one) sees: 0 without a window.
    Pages wholly before it need not be read."""
    if sliding_window is None:
        return jnp.zeros_like(first_pos)
    window = jnp.asarray(sliding_window, jnp.int32)
    return jnp.where(window > 0, jnp.maximum(first_pos - window + 1, 0), 0)


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
    sliding_window: None, or an int32 scalar (static or traced; <= 0: none): a query at position
        p sees keys at positions > p - sliding_window only (`in_window`).
    soft_cap: scores become soft_cap * tanh(scores / soft_cap) before the softmax.
    Returns [num_tokens, num_heads, head_dim] in q's dtype; padding rows are zeros.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_seqs, max_pages = block_tables.shape
    num_keys = max_pages * page_size

    # The rows are cut into blocks of `block_q` consecutive rows of one sequence (the kernel's
    # work split), and each block gathers its sequence's pages once. block_q = T / S keeps the
    # blocks about as many as the sequences: a long prefill chunk reads its pages a few times
    # rather than once per row, and a decode-only batch (block_q 1) reads them once per row,
    # which is the minimum. Padding costs at most twice the rows' own compute.
    block_q = max(1, num_tokens // num_seqs)
    num_blocks = min(num_tokens // block_q + num_seqs, num_tokens)  # enough for any split
    work = work_table(query_start_loc, seq_lens, num_tokens, block_q, num_blocks)
    seq, first_row, num_rows, first_pos, kv_len = work.T  # each [num_blocks]
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    row_valid = offsets[None, :] < num_rows[:, None]  # [num_blocks, block_q]
    rows = jnp.where(row_valid, first_row[:, None] + offsets, num_tokens)  # past the end: dropped
    positions = first_pos[:, None] + offsets  # [num_blocks, block_q]

    qb = q.at[rows].get(mode="clip").astype(jnp.float32)  # [num_blocks, block_q, heads, head_dim]
    qb = qb.reshape(num_blocks, block_q, num_kv_heads, group, head_dim)
    pages = block_tables[seq]  # [num_blocks, max_pages]
    k = k_cache[layer][:, pages].reshape(num_kv_heads, num_blocks, num_keys, head_dim)
    v = v_cache[layer][:, pages].reshape(num_kv_heads, num_blocks, num_keys, head_dim)

    scores = jnp.einsum("bqkgd,kbsd->bkgqs", qb, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(num_keys, dtype=jnp.int32)
    mask = key_pos <= positions[..., None]  # [num_blocks, block_q, num_keys]
    mask &= in_window(key_pos, positions[..., None], sliding_window)
    mask &= (key_pos < kv_len[:, None, None]) & row_valid[..., None]
    mask = mask[:, None, None]  # [num_blocks, 1, 1, block_q, num_keys]
    probs = jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgqs,kbsd->bqkgd", probs, v.astype(jnp.float32))
    out = out.reshape(num_blocks, block_q, num_heads, head_dim).astype(q.dtype)
    # Every real row belongs to exactly one block; rows in no block (padding) stay zero.
    return jnp.zeros_like(q).at[rows].set(out, mode="drop")


def work_table(query_start_loc, seq_lens, num_tokens, block_q, num_programs):
    """What each attention program does: [num_programs, 5] int32 rows of
    (seq, first_row, num_rows, first_pos, kv_len).

    Sequence `s` gets cdiv(q_len, block_q) programs, each for up to `block_q` consecutive query
    rows. The padding rows past query_start_loc[num_seqs] form one more sequence with no keys
    (kv_len 0): its programs write zeros. Programs past the last block have num_rows 0.
    `num_programs = num_tokens // block_q + num_seqs + 1` is enough for any split of the rows.
    """
    num_seqs = seq_lens.shape[0]
    starts = jnp.append(query_start_loc.astype(jnp.int32), jnp.int32(num_tokens))  # [S + 2]
    q_lens = starts[1:] - starts[:-1]  # [S + 1], the last one is the padding
    first_block = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(pl.cdiv(q_lens, block_q))])
    programs = jnp.arange(num_programs, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(first_block[1:], programs, side="right"), num_seqs)
    first_row = starts[seq] + (programs - first_block[seq]) * block_q
    num_rows = jnp.clip(starts[seq + 1] - first_row, 0, block_q)
    is_real = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    first_pos = seq_lens[seq] - q_lens[seq] + (first_row - starts[seq])
    kv_len = jnp.where(is_real, first_pos + num_rows, 0)
    first_pos = jnp.where(is_real, first_pos, 0)
    return jnp.stack([seq, first_row, num_rows, first_pos, kv_len], axis=1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Pallas kernels (Triton GPU backend).
#
# Both kernels take the whole cache and the layer index, and address pages by pointer arithmetic:
# slicing the layer outside would copy it on the GPU. All in-kernel indexing is by integer arrays
# (gathers/scatters), never slices mixed with arrays, because that is the form both the Triton
# lowering and the interpreter (`interpret=True`, the CPU tests) support. Masked-off lanes of a
# store point one past the end of the array: the GPU never touches them (the store is masked) and
# the interpreter's scatter drops them, so they cannot clobber a real lane.
# ---------------------------------------------------------------------------------------------

def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _write_kv_kernel(layer_ref, slot_mapping_ref, k_ref, v_ref, _k_cache_in, _v_cache_in,
                     k_cache_ref, v_cache_ref, *, block_tokens):
    num_tokens, _, head_dim = k_ref.shape
    _, _, num_pages, page_size, _ = k_cache_ref.shape
    kv_head = pl.program_id(1)
    layer = layer_ref[0]
    tokens = pl.program_id(0) * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
    in_range = tokens < num_tokens
    slots = plgpu.load(slot_mapping_ref.at[jnp.minimum(tokens, num_tokens - 1)])
    write = in_range & (slots >= 0)
    page = jnp.where(write, slots // page_size, num_pages)[:, None]  # [block_tokens, 1]
    offset = jnp.where(write, slots % page_size, 0)[:, None]
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    rows = jnp.where(in_range, tokens, 0)[:, None]
    for new_ref, cache_ref in ((k_ref, k_cache_ref), (v_ref, v_cache_ref)):
        new = plgpu.load(new_ref.at[rows, kv_head, dims])  # [block_tokens, head_dim]
        plgpu.store(cache_ref.at[layer, kv_head, page, offset, dims],
                    new.astype(cache_ref.dtype), mask=write[:, None])


@functools.partial(jax.jit, static_argnames=("block_tokens", "num_warps", "interpret"))
def write_kv(k_cache, v_cache, layer, k, v, slot_mapping, *, block_tokens=16, num_warps=4,
             interpret=False):
    """Pallas version of `write_kv_reference`. The caches are aliased to the outputs, so
    inside a jitted step that donates the cache the write happens in place.

    Grid: (token blocks, kv heads); each program scatters `block_tokens` rows of one kv head.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_power_of_2(head_dim=head_dim, block_tokens=block_tokens)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return pl.pallas_call(
        functools.partial(_write_kv_kernel, block_tokens=block_tokens),
        grid=(pl.cdiv(num_tokens, block_tokens), num_kv_heads),
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={4: 0, 5: 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="write_kv",
    )(layer, slot_mapping.astype(jnp.int32), k, v, k_cache, v_cache)


def _check_power_of_2(**sizes):
    for name, size in sizes.items():
        if size != _next_power_of_2(size):
            raise ValueError(f"{name}={size} must be a power of two for the Triton backend")


def _attention_kernel(layer_ref, window_ref, work_ref, block_tables_ref, q_ref, k_cache_ref, v_cache_ref,
                      o_ref, *, sm_scale, soft_cap, block_m, block_kv):
    num_tokens, num_heads, head_dim = q_ref.shape
    _, num_kv_heads, _, page_size, _ = k_cache_ref.shape
    max_pages = block_tables_ref.shape[1]
    group = num_heads // num_kv_heads
    program, kv_head = pl.program_id(0), pl.program_id(1)
    layer, sliding_window = layer_ref[0], window_ref[0]  # window <= 0: none
    seq, first_row, num_rows, first_pos, kv_len = (work_ref[program, c] for c in range(5))

    # Row m of the tile is query token first_row + m // group, head kv_head * group + m % group:
    # all heads sharing this kv head read each K/V tile once.
    m = jnp.arange(block_m, dtype=jnp.int32)
    row_valid = m // group < num_rows
    tokens = jnp.where(row_valid, first_row + m // group, num_tokens)[:, None]  # [block_m, 1]
    heads = (kv_head * group + m % group)[:, None]
    positions = first_pos + m // group  # [block_m]
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    q = plgpu.load(q_ref.at[jnp.minimum(tokens, num_tokens - 1), heads, dims],
                   mask=row_valid[:, None], other=0)  # [block_m, head_dim]

    # Key tiles wholly before the first row's window are never loaded.
    kv_start = window_start(first_pos, sliding_window)

    def body(tile, carry):
        acc, m_prev, l_prev = carry
        keys = tile * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [block_kv]
        key_valid = keys < kv_len
        page_slot = jnp.minimum(keys // page_size, max_pages - 1)
        pages = plgpu.load(block_tables_ref.at[seq, page_slot])[:, None]  # [block_kv, 1]
        offsets = (keys % page_size)[:, None]
        index = (layer, kv_head, pages, offsets, dims)
        k = plgpu.load(k_cache_ref.at[index], mask=key_valid[:, None], other=0).astype(q.dtype)
        v = plgpu.load(v_cache_ref.at[index], mask=key_valid[:, None], other=0).astype(q.dtype)

        s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * sm_scale  # [block_m, block_kv]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = keys[None, :] <= positions[:, None]
        mask &= in_window(keys[None, :], positions[:, None], sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        l_next = l_prev * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_next, l_next

    acc = jnp.zeros((block_m, head_dim), jnp.float32)
    m_init = jnp.full((block_m,), MASK_VALUE, jnp.float32)
    l_init = jnp.zeros((block_m,), jnp.float32)
    acc, _, l = jax.lax.fori_loop(kv_start // block_kv, pl.cdiv(kv_len, block_kv), body,
                                  (acc, m_init, l_init))
    # A row that saw no key (a padding row) has l == 0 and acc == 0: it writes zeros.
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    plgpu.store(o_ref.at[tokens, heads, dims], out.astype(o_ref.dtype), mask=row_valid[:, None])


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "block_m", "block_kv", "num_warps", "num_stages",
    "interpret"))
def ragged_paged_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
                           *, sm_scale, sliding_window=None, soft_cap=None, block_m=16,
                           block_kv=32, num_warps=4, num_stages=2, interpret=False):
    """Pallas version of `ragged_paged_attention_reference` (same arguments and result).

    Grid: (query blocks, kv heads). A program takes `block_m` rows, i.e. up to
    `block_m // group` query tokens of one sequence times the `group` query heads that share
    one kv head, and walks that sequence's keys `block_kv` at a time (any page size: each key
    finds its page through the block table) with an online softmax in float32. Decode rows
    and prefill chunks mix freely; the keys a block needs stop at its last row's position
    (causal) and, with a sliding window, start at its first row's window. The window is an operand
    (not a compile-time constant), so one compiled kernel serves every layer of a scan.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    block_m = max(block_m, _next_power_of_2(group))
    _check_power_of_2(head_dim=head_dim, block_m=block_m, block_kv=block_kv)
    block_q = block_m // group  # query tokens per program
    num_seqs = seq_lens.shape[0]
    num_programs = num_tokens // block_q + num_seqs + 1
    work = work_table(query_start_loc, seq_lens.astype(jnp.int32), num_tokens, block_q,
                       num_programs)
    kernel = functools.partial(
        _attention_kernel, sm_scale=sm_scale, soft_cap=soft_cap, block_m=block_m, block_kv=block_kv)
    window = jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32).reshape(1)
    return pl.pallas_call(
        kernel,
        grid=(num_programs, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="ragged_paged_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), window, work, block_tables.astype(jnp.int32), q,
      k_cache, v_cache)
