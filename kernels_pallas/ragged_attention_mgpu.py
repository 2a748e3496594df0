"""Ragged paged attention for Hopper (sm_90a) as a Mosaic GPU kernel.

A drop-in alternative to `kernels_pallas.paged_attention.ragged_paged_attention` (same arguments,
same result): the specification is that module's `ragged_paged_attention_reference`, and the rules
it states once are used here as they are (`work_table` for the split of the rows into blocks,
`in_window` / `window_start` for the sliding window, `MASK_VALUE`). Inputs bf16 (or f16); float32
runs in the interpreter only (see `ragged_paged_attention`).

Design, per CUDA block (one warpgroup, 128 threads): grid (work item, kv head x head part, split).
- A work item is up to `block_q` consecutive query rows of one sequence (a row of `work_table`).
  Its tile has block_m = 64 rows (wgmma's M for one warpgroup): row m is query token m // group and
  query head kv_head * group + m % group, so the `group` heads sharing a kv head use each K/V tile
  once. The wrapper gathers q into these tiles, [kv_heads, items, BLOCK_M, head_dim], so a tile is
  one TMA copy (a TMA copy into a swizzled buffer needs its first row at a multiple of 8, which a
  ragged row offset times the group is not).
- Keys come `block_kv` at a time (a multiple of page_size): `block_kv / page_size` pages, each a TMA
  copy of one page `k_cache[layer, kv_head, block_tables[seq, i]]` into consecutive rows of a
  shared-memory buffer, double-buffered (the next block's pages are in flight while this one is
  computed). Key blocks wholly before the first row's window, or after the last row's position,
  are never loaded.
- S = Q K^T and O += P V by wgmma (float32 accumulators), the mask (causal within the chunk,
  window, sequence length) and the online softmax in float32 registers. P goes through shared
  memory (rounded to the inputs' dtype) as wgmma's A: the interpreter's wgmma takes its A operand
  from shared memory only (FlashAttention-3 keeps P in registers; not done here, so that the
  compiled kernel is the one the CPU tests run).
- head_dim 256: two CUDA blocks per tile ("head parts"), each computing all of S = Q K^T and half
  of O's columns (`MAX_PART_DIM`), so O fits in registers beside S.
- Flash-decoding: `num_splits` CUDA blocks share one work item's key blocks; each writes its tile
  normalized (float32; q's dtype when there is one split) with its log-sum-exp, and the wrapper combines the splits and scatters the
  tile rows back to [num_tokens, num_heads, head_dim] (XLA ops on [splits, items, heads, 64] rows).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.paged_attention import MASK_VALUE, in_window, window_start, work_table

BLOCK_M = 64  # tile rows: wgmma's M for one warpgroup
# O's columns per P @ V wgmma. The accumulator lives in registers as head_dim / PV_CHUNK arrays:
# each chunk's product comes out of its own wgmma accumulator and is added to the rescaled running
# sum, so only one chunk's product is live beside O (and the interpreter has no rule for wgmma into a
# pre-initialized accumulator, `pl.run_state`).
PV_CHUNK = 64
# O's columns per CUDA block: head_dim 256 is computed by two CUDA blocks per tile, each with all
# of Q K^T (K read by both) and half of V and O; with all 256 columns of O (128 registers a thread)
# beside S, ptxas spilled.
MAX_PART_DIM = 128
NUM_SMS = 132  # H100 SXM; only the default split count depends on it


def _attention_kernel(scalars_gmem, work_gmem, block_tables_gmem, q_gmem, k_cache_gmem, v_cache_gmem,
                      o_gmem, lse_gmem, q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_barrier, k_barriers,
                      v_barriers, *, sm_scale, soft_cap, group, block_kv, num_splits, head_parts):
    _, _, num_pages, page_size, head_dim = k_cache_gmem.shape
    max_pages = block_tables_gmem.shape[1]
    pages_per_block = block_kv // page_size
    item, split = jax.lax.axis_index("item"), jax.lax.axis_index("split")
    head = jax.lax.axis_index("head")  # kv_head * head_parts + part
    kv_head, part = jax.lax.div(head, head_parts), jax.lax.rem(head, head_parts)
    part_dim = head_dim // head_parts  # O's (and V's) columns this CUDA block computes
    part_cols = pl.ds(part * part_dim, part_dim)
    layer, sliding_window = scalars_gmem[0], scalars_gmem[1]  # window <= 0: none
    seq, _, num_rows, first_pos, kv_len = (work_gmem[item, c] for c in range(5))

    plgpu.copy_gmem_to_smem(q_gmem.at[kv_head, item], q_smem, q_barrier)

    # This split's key blocks: an even share of the item's [first block, last block).
    first_block = window_start(first_pos, sliding_window) // block_kv
    num_blocks = jnp.maximum(pl.cdiv(kv_len, block_kv) - first_block, 0)
    share = pl.cdiv(num_blocks, num_splits)
    lo = first_block + split * share
    steps = jnp.clip(first_block + num_blocks - lo, 0, share)
    last_page = jnp.clip(pl.cdiv(kv_len, page_size) - 1, 0, max_pages - 1)

    def fetch(step, slot):
        """TMA copies of key block lo + step's pages into buffer `slot`. Page slots past the
        sequence's last page load its last page again (masked off below; never an unread page)."""
        for j in range(pages_per_block):
            page_slot = jnp.minimum((lo + step) * pages_per_block + j, last_page)
            page = jnp.clip(block_tables_gmem[seq, page_slot], 0, num_pages - 1)
            rows = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_cache_gmem.at[layer, kv_head, page], k_smem.at[slot, rows],
                                    k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_cache_gmem.at[layer, kv_head, page, :, part_cols], v_smem.at[slot, rows],
                                    v_barriers.at[slot])

    @pl.when(steps > 0)
    def _():
        fetch(0, 0)

    shape = (BLOCK_M, block_kv)
    rows_layout, cols_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    token = jax.lax.div(plgpu.broadcasted_iota(jnp.int32, (BLOCK_M,), 0, layout=rows_layout), jnp.int32(group))
    positions = first_pos + token  # [BLOCK_M]
    # Causal (key <= position) and inside the sequence (key < kv_len, implied for a real row);
    # -1 (no key) for tile rows past the item's rows.
    last_key = jnp.where(token < num_rows, jnp.minimum(positions, kv_len - 1), -1)

    def body(step, carry):
        acc, m_prev, l_prev = carry
        slot = jax.lax.rem(step, 2)

        @pl.when(step + 1 < steps)
        def _():  # the other buffer's last reader (step - 1) finished with wgmma_wait(0)
            fetch(step + 1, 1 - slot)

        plgpu.barrier_wait(k_barriers.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32)) * sm_scale  # [BLOCK_M, block_kv]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        # The reference's mask from a row vector and a column vector broadcast to the tile: a
        # [BLOCK_M, block_kv] int32 array of distinct values would be 32 registers a thread.
        keys = (lo + step) * block_kv + plgpu.broadcasted_iota(jnp.int32, (block_kv,), 0, layout=cols_layout)
        keys = jax.lax.broadcast_in_dim(keys, shape, [1])
        mask = (keys <= jax.lax.broadcast_in_dim(last_key, shape, [0]))
        mask &= in_window(keys, jax.lax.broadcast_in_dim(positions, shape, [0]), sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(mask, jnp.exp(s - jax.lax.broadcast_in_dim(m_next, shape, [0])), 0.0)
        l_next = l_prev * correction + p.sum(axis=1)
        p_smem[...] = p.astype(p_smem.dtype)
        plgpu.commit_smem()  # visible to wgmma (the async proxy)
        plgpu.barrier_wait(v_barriers.at[slot])
        new_acc = []
        for c, acc_c in enumerate(acc):  # O += P V, PV_CHUNK columns at a time (see PV_CHUNK)
            def pv(pv_ref):
                plgpu.wgmma(pv_ref, p_smem, v_smem.at[slot, :, pl.ds(c * PV_CHUNK, PV_CHUNK)])
                return pv_ref[...]

            pv_c = pl.run_scoped(pv, plgpu.ACC((BLOCK_M, PV_CHUNK), jnp.float32))
            new_acc.append(acc_c * jax.lax.broadcast_in_dim(correction, acc_c.shape, [0]) + pv_c)
        plgpu.wgmma_wait(0)  # this slot is refilled next step
        return tuple(new_acc), m_next, l_next

    acc = tuple(plgpu.layout_cast(jnp.zeros((BLOCK_M, PV_CHUNK), jnp.float32), plgpu.Layout.WGMMA)
                for _ in range(part_dim // PV_CHUNK))  # O, [BLOCK_M, part_dim] in column chunks
    m_init = plgpu.layout_cast(jnp.full((BLOCK_M,), MASK_VALUE, jnp.float32), rows_layout)
    l_init = plgpu.layout_cast(jnp.zeros((BLOCK_M,), jnp.float32), rows_layout)
    plgpu.barrier_wait(q_barrier)
    acc, m, l = jax.lax.fori_loop(0, steps, body, (acc, m_init, l_init))

    # A row that saw no key (padding, or a split with no blocks) writes zeros and a log-sum-exp of
    # MASK_VALUE, which weighs nothing when the splits are combined.
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    lse_smem[...] = jnp.where(seen, m + jnp.log(l_safe), MASK_VALUE)
    for c, acc_c in enumerate(acc):  # O out through one [BLOCK_M, PV_CHUNK] buffer
        if c:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk has left o_smem
        o_smem[...] = (acc_c / jax.lax.broadcast_in_dim(l_safe, acc_c.shape, [0])).astype(o_smem.dtype)
        plgpu.commit_smem()
        columns = pl.ds(part * part_dim + c * PV_CHUNK, PV_CHUNK)
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, item, kv_head, :, columns])
        if not c:
            plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[split, item, kv_head * head_parts + part])
    plgpu.wait_smem_to_gmem(0)


def _swizzled(minor, dtype):
    """Tiling + swizzle transforms for a wgmma operand in shared memory whose minor dim is `minor`."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _interpret_params(interpret):
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams(uninitialized_memory="nan") if interpret else None


def default_num_splits(num_tokens, num_seqs, num_kv_heads, group, max_keys, block_kv):
    """Splits per work item so that about two CUDA blocks per SM have work (decode batches), never
    more than the key blocks of the longest sequence, and 1 when the items alone fill the card."""
    items = max(num_seqs, pl.cdiv(num_tokens, max(1, BLOCK_M // group)))
    wanted = pl.cdiv(2 * NUM_SMS, items * num_kv_heads)
    return int(max(1, min(wanted, pl.cdiv(max_keys, block_kv), 16)))


def supports(num_heads, num_kv_heads, head_dim, page_size, dtype, interpret=False) -> bool:
    """Whether `ragged_paged_attention` takes this shape and dtype with the default block_kv (64)."""
    group = num_heads // num_kv_heads if num_kv_heads else 0
    return (group * num_kv_heads == num_heads and 0 < group <= BLOCK_M and head_dim % 64 == 0
            and page_size % 8 == 0 and 64 % page_size == 0
            and (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) or bool(interpret) and jnp.dtype(dtype) == jnp.float32))


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "block_kv", "num_splits", "interpret"))
def ragged_paged_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables, *, sm_scale,
                           sliding_window=None, soft_cap=None, block_kv=None, num_splits=None, interpret=False):
    """Mosaic GPU version of `paged_attention.ragged_paged_attention_reference` (same arguments and result).

    q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_layers, num_kv_heads, num_pages,
    page_size, head_dim]; layer: int32 scalar; query_start_loc: [num_seqs + 1]; seq_lens: [num_seqs];
    block_tables: [num_seqs, max_pages_per_seq]. Returns [num_tokens, num_heads, head_dim] in q's dtype.
    `block_kv`: keys per step, a multiple of 64 and of page_size (default 64).
    `num_splits`: CUDA blocks per work item along the keys (default: `default_num_splits`).
    `interpret`: True, or a `plgpu.InterpretGPUParams`: Mosaic GPU's interpret mode on any platform
    (True: every buffer, the outputs included, starts as NaN).
    float32 q and caches run in the interpreter only: wgmma's K^T operand (read transposed) must be
    16-bit, so float32 does not lower for the GPU (a ValueError without `interpret`).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    num_seqs, max_pages = block_tables.shape
    group = num_heads // num_kv_heads
    block_kv = block_kv or 64
    if group * num_kv_heads != num_heads or group > BLOCK_M:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}, "
                         f"at most {BLOCK_M} times it")
    # block_kv 32 runs in the interpreter but Mosaic GPU's layout inference finds no layout for it.
    if head_dim % 64 or block_kv % 64 or block_kv % page_size or page_size % 8:
        raise ValueError(f"need head_dim and block_kv multiples of 64, block_kv a multiple of page_size "
                         f"and page_size of 8: got {head_dim}, {block_kv}, {page_size}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share a dtype: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.dtype == jnp.float32 and not interpret:
        raise ValueError("float32 runs only in interpret mode: wgmma reads a transposed (keys-major) "
                         "operand in 16-bit types only")
    num_splits = num_splits or default_num_splits(num_tokens, num_seqs, num_kv_heads, group,
                                                  max_pages * page_size, block_kv)
    block_q = BLOCK_M // group  # query tokens per work item
    num_items = num_tokens // block_q + num_seqs + 1  # enough for any split of the rows (`work_table`)
    work = work_table(query_start_loc, seq_lens.astype(jnp.int32), num_tokens, block_q, num_items)

    rows = _item_rows(work, num_tokens, block_q)  # [items, block_q]
    q_tiles = q.at[rows].get(mode="clip").reshape(num_items, block_q, num_kv_heads, group, head_dim)
    q_tiles = q_tiles.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, num_items, block_q * group, head_dim)
    q_tiles = jnp.pad(q_tiles, ((0, 0), (0, 0), (0, BLOCK_M - block_q * group), (0, 0)))
    window = 0 if sliding_window is None else sliding_window
    scalars = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])  # [2]
    head_parts = max(1, head_dim // MAX_PART_DIM)
    kernel = functools.partial(_attention_kernel, sm_scale=sm_scale, soft_cap=soft_cap, group=group,
                               block_kv=block_kv, num_splits=num_splits, head_parts=head_parts)
    k_buffer = plgpu.SMEM((2, block_kv, head_dim), k_cache.dtype, transforms=_swizzled(head_dim, k_cache.dtype))
    part_dim = head_dim // head_parts
    v_buffer = plgpu.SMEM((2, block_kv, part_dim), v_cache.dtype, transforms=_swizzled(part_dim, v_cache.dtype))
    # One split: the tiles are final, rounded once to q's dtype as the reference rounds; several:
    # float32 until the splits are combined.
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((num_splits, num_items, num_kv_heads, BLOCK_M, head_dim), out_dtype),
                  jax.ShapeDtypeStruct((num_splits, num_items, num_kv_heads * head_parts, BLOCK_M), jnp.float32)),
        grid=(num_items, num_kv_heads * head_parts, num_splits),
        grid_names=("item", "head", "split"),
        scratch_types=[
            plgpu.SMEM((BLOCK_M, head_dim), q.dtype, transforms=_swizzled(head_dim, q.dtype)),  # Q tile
            k_buffer, v_buffer,  # K and V (V: this block's columns), two key blocks each
            plgpu.SMEM((BLOCK_M, block_kv), q.dtype, transforms=_swizzled(block_kv, q.dtype)),  # P
            plgpu.SMEM((BLOCK_M, PV_CHUNK), out_dtype),  # O, a column chunk at a time
            plgpu.SMEM((BLOCK_M,), jnp.float32),  # log-sum-exp per row
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=2),  # one arrival per page copy
            plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=2),
        ],
        interpret=_interpret_params(interpret),
    )(scalars, work, block_tables.astype(jnp.int32), q_tiles, k_cache, v_cache)
    # out: [splits, items, kv_heads, BLOCK_M, head_dim] normalized per split; lse: [splits, items,
    # kv_heads * head_parts, BLOCK_M], the same for every part of a kv head.
    lse = lse[:, :, ::head_parts]
    if num_splits == 1:
        out = out[0]
    else:
        weight = jnp.exp(lse - lse.max(axis=0))
        out = (out * weight[..., None]).sum(axis=0) / weight.sum(axis=0)[..., None]
    return _scatter_rows(out, work, num_tokens, group, block_q).astype(q.dtype)


def _item_rows(work, num_tokens, block_q):
    """[items, block_q]: the query row of each token slot of each work item; num_tokens (past the
    end) where the item has fewer rows."""
    _, first_row, num_rows, _, _ = work.T  # each [items]
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    return jnp.where(offsets[None, :] < num_rows[:, None], first_row[:, None] + offsets, num_tokens)


def _scatter_rows(out, work, num_tokens, group, block_q):
    """[items, kv_heads, BLOCK_M, head_dim] tiles -> [num_tokens, num_heads, head_dim]: each real row
    to its token (rows of no item, the padding, stay zero), as the reference writes its blocks."""
    num_items, num_kv_heads, _, head_dim = out.shape
    out = out[:, :, :block_q * group].reshape(num_items, num_kv_heads, block_q, group, head_dim)
    out = out.transpose(0, 2, 1, 3, 4).reshape(num_items, block_q, num_kv_heads * group, head_dim)
    rows = _item_rows(work, num_tokens, block_q)
    return jnp.zeros((num_tokens, num_kv_heads * group, head_dim), out.dtype).at[rows].set(out, mode="drop")
