"""The Mosaic GPU ragged paged attention (`kernels_pallas.ragged_attention_mgpu`) against the reference.

The reference is `kernels_pallas.paged_attention.ragged_paged_attention_reference`: the specification
of the ragged batch, the KV cache layout, causal masking within a chunk, the sliding window and the
soft cap, shared with the Triton kernel. The kernel runs in Mosaic GPU's interpret mode
(`plgpu.InterpretGPUParams`): the block-table-driven TMA page copies, the double buffer's barriers,
both wgmmas and the online softmax are simulated on the CPU. The interpreter fills every buffer it
allocates, the kernel's outputs and shared memory included, with NaN (`uninitialized_memory="nan"`),
so a tile the kernel never writes, or a key buffer it reads before a copy filled it, fails.

One axis at a time from a small base case (bf16, 3 sequences: two decode rows and a 5-token prefill
chunk, GQA 4, head_dim 64, page size 16, a non-identity block table): GQA 1/4/8, head_dim
64/128/256, page sizes 16/32, float32, a sliding window, a soft cap, the flash-decoding split, a
long prefill chunk spanning several work items, padding rows, a traced layer index, the
interpreter's race detector. Then the lowering for
CUDA (Mosaic GPU's own passes) on this GPU-less machine; registers and spills need ptxas:
scripts/mgpu_compile_check.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # the race detector's flag (no public API)
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import ragged_attention_mgpu as ram
from kernels_pallas.paged_attention import ragged_paged_attention_reference
from tests.helpers import export_for_cuda

# bf16: probabilities are rounded to bf16 before the P @ V wgmma (the reference keeps float32), and
# the output is rounded once.
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}


def make_batch(seed, q_lens, kv_lens, *, num_kv_heads=2, group=4, head_dim=64, page_size=16, num_layers=2,
               dtype=jnp.bfloat16, num_padding_rows=0):
    """A random ragged batch: sequence s has q_lens[s] query rows (its last positions) and kv_lens[s]
    tokens in the cache, on pages drawn at random (a non-identity block table)."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    max_pages = max(-(-n // page_size) for n in kv_lens) + 1  # one unused slot at the end
    num_pages = num_seqs * max_pages + 3
    block_tables = rng.permutation(num_pages)[:num_seqs * max_pages].reshape(num_seqs, max_pages)
    num_tokens = sum(q_lens) + num_padding_rows
    cache_shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    return dict(
        q=jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads * group, head_dim)), dtype),
        k_cache=jnp.asarray(rng.standard_normal(cache_shape), dtype),
        v_cache=jnp.asarray(rng.standard_normal(cache_shape), dtype),
        layer=jnp.int32(1),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        seq_lens=jnp.asarray(kv_lens, jnp.int32),
        block_tables=jnp.asarray(block_tables, jnp.int32),
    )


def check_against_reference(batch, **options):
    kernel_options = {k: options.pop(k) for k in ("block_kv", "num_splits") if k in options}
    head_dim = batch["q"].shape[-1]
    options.setdefault("sm_scale", head_dim ** -0.5)
    out = ram.ragged_paged_attention(**batch, **options, **kernel_options, interpret=True)
    ref = ragged_paged_attention_reference(**batch, **options)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(out).any(), "an output element came from memory the kernel never wrote (NaN)"
    error = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert error <= TOLERANCE[batch["q"].dtype.type], error


# Two decode rows (at positions 20 and 37) and a 5-token prefill chunk ending at position 33.
BASE = dict(q_lens=[1, 5, 1], kv_lens=[21, 34, 38])


def test_mixed_decode_and_prefill_rows_match_reference():
    check_against_reference(make_batch(0, **BASE))


@pytest.mark.parametrize("group", [1, 8])
def test_gqa_group_sizes(group):
    check_against_reference(make_batch(1, **BASE, group=group, num_kv_heads=8 // group))


@pytest.mark.parametrize("head_dim", [128, 256])
def test_head_dims(head_dim):
    check_against_reference(make_batch(2, **BASE, head_dim=head_dim))


def test_page_size_32():
    check_against_reference(make_batch(3, **BASE, page_size=32))


@pytest.mark.parametrize("page_size", [16, 32])
def test_key_block_of_several_pages(page_size):
    # block_kv 128: 8 or 4 page copies signal one barrier per buffer.
    check_against_reference(make_batch(3, **BASE, page_size=page_size), block_kv=128)


def test_float32():
    check_against_reference(make_batch(4, **BASE, dtype=jnp.float32))


def test_sliding_window():
    # Window 8: the 38-token sequence's decode row sees keys 30..37 only; its first key block is skipped.
    check_against_reference(make_batch(5, **BASE), sliding_window=8)


def test_sliding_window_is_an_operand_and_nonpositive_means_none():
    batch = make_batch(5, **BASE)
    f = jax.jit(lambda w: ram.ragged_paged_attention(**batch, sm_scale=0.125, sliding_window=w, interpret=True))
    for window in (0, 12):
        ref = ragged_paged_attention_reference(**batch, sm_scale=0.125, sliding_window=window)
        assert np.allclose(np.asarray(f(jnp.int32(window)), np.float32), np.asarray(ref, np.float32),
                           atol=3e-2)


def test_soft_cap():
    check_against_reference(make_batch(6, **BASE), soft_cap=5.0, sm_scale=1.0)


@pytest.mark.parametrize("num_splits", [2, 3])
def test_decode_split_across_the_context(num_splits):
    # flash-decoding: each work item's key blocks shared by num_splits CUDA blocks (3: one split
    # of the short sequences has no block at all), combined by log-sum-exp.
    check_against_reference(make_batch(7, q_lens=[1, 1, 1], kv_lens=[40, 130, 7]), num_splits=num_splits)


def test_long_prefill_chunk_spans_several_work_items():
    # group 4: 16 tokens per 64-row tile, so a 40-token chunk is 3 items, the last one partial.
    check_against_reference(make_batch(8, q_lens=[40, 1], kv_lens=[70, 9]))


def test_padding_rows_are_zero():
    batch = make_batch(9, **BASE, num_padding_rows=3)
    check_against_reference(batch)
    out = ram.ragged_paged_attention(**batch, sm_scale=0.125, interpret=True)
    assert not np.asarray(out[-3:], np.float32).any()


def test_layer_index_is_traced():
    # The engine's path: one compiled kernel for every layer of a lax.scan (layer 0 here; the others use 1).
    batch = make_batch(10, **BASE)
    f = jax.jit(lambda layer: ram.ragged_paged_attention(**{**batch, "layer": layer}, sm_scale=0.125, interpret=True))
    out = np.asarray(f(jnp.int32(0)), np.float64)
    ref = np.asarray(ragged_paged_attention_reference(**{**batch, "layer": jnp.int32(0)}, sm_scale=0.125), np.float64)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE[jnp.bfloat16]


def test_double_buffer_has_no_data_race_in_the_interpreter():
    # The interpreter's happens-before race detector over the page copies, barriers and shared
    # memory: 3 key blocks through 2 buffers, with a split. It runs wgmma synchronously, so a
    # missing wgmma_wait is not caught.
    batch = make_batch(11, q_lens=[1, 3], kv_lens=[150, 70])
    params = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
    out = ram.ragged_paged_attention(**batch, sm_scale=0.125, num_splits=2, interpret=params)
    assert not interpret_pallas_call.get_races().races_found
    ref = ragged_paged_attention_reference(**batch, sm_scale=0.125)
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE[jnp.bfloat16]


def test_default_split_fills_the_card_at_decode_only():
    assert ram.default_num_splits(8, 8, 8, 8, 4096, 64) == 5  # 64 items x heads -> 2 x 132 blocks
    assert ram.default_num_splits(512, 1, 8, 8, 4096, 64) == 1  # prefill: 64 items x 8 heads
    assert ram.default_num_splits(1, 1, 8, 8, 64, 64) == 1  # one key block: nothing to split


def test_refuses_shapes_it_cannot_tile():
    batch = make_batch(0, **BASE)
    with pytest.raises(ValueError, match="block_kv"):
        ram.ragged_paged_attention(**batch, sm_scale=1.0, block_kv=32)  # no layout for it when compiled
    with pytest.raises(ValueError, match="float32 runs only in interpret mode"):
        ram.ragged_paged_attention(**make_batch(0, **BASE, dtype=jnp.float32), sm_scale=1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        ram.ragged_paged_attention(**{**batch, "q": batch["q"].astype(jnp.float32)}, sm_scale=1.0)


# (name, num_tokens, num_seqs, max_pages, page_size, head_dim): Llama-3-8B's heads (32 q, 8 kv).
LOWERINGS = [("decode", 16, 16, 64, 16, 128), ("prefill", 512, 2, 64, 16, 128), ("decode hd256 p32", 8, 8, 32, 32, 256)]


@pytest.mark.parametrize("name,num_tokens,num_seqs,max_pages,page_size,head_dim", LOWERINGS)
def test_lowers_for_cuda_to_one_mosaic_gpu_kernel(name, num_tokens, num_seqs, max_pages, page_size, head_dim):
    s = jax.ShapeDtypeStruct
    cache = s((2, 8, num_seqs * max_pages, page_size, head_dim), jnp.bfloat16)
    args = [s((num_tokens, 32, head_dim), jnp.bfloat16), cache, cache, s((), jnp.int32),
            s((num_seqs + 1,), jnp.int32), s((num_seqs,), jnp.int32), s((num_seqs, max_pages), jnp.int32)]
    exported = export_for_cuda(
        lambda *a: ram.ragged_paged_attention(*a, sm_scale=head_dim ** -0.5, sliding_window=a[3], soft_cap=30.0),
        *args)
    assert re.findall(r"custom_call @(\w+)", exported.mlir_module()) == ["mosaic_gpu_v2"]


def test_engine_dispatch_picks_the_mosaic_kernel_where_it_applies_and_triton_elsewhere():
    """`--attention-backend mosaic_gpu_interpret` (jaxinfer.ops): the Mosaic GPU kernel for a shape it
    takes, the Triton kernel for one it does not (head_dim 32), both against the reference; the K/V
    page write is XLA's scatter."""
    from jaxinfer import ops
    from kernels_pallas.paged_attention import write_kv_reference

    for head_dim, mosaic in ((64, True), (32, False)):
        batch = make_batch(11, **BASE, head_dim=head_dim)
        q, k_cache = batch["q"], batch["k_cache"]
        assert ram.supports(q.shape[1], k_cache.shape[1], head_dim, k_cache.shape[3], q.dtype) == mosaic
        out = ops.ragged_paged_attention(**batch, sm_scale=head_dim ** -0.5, backend="mosaic_gpu_interpret")
        ref = ragged_paged_attention_reference(**batch, sm_scale=head_dim ** -0.5)
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= TOLERANCE[jnp.bfloat16], head_dim
    assert not ram.supports(32, 8, 128, 16, jnp.float32)  # float32 only in the interpreter
    assert ram.supports(32, 8, 128, 16, jnp.float32, interpret=True)
    assert not ram.supports(32, 8, 128, 128, jnp.bfloat16)  # a page larger than the key block
    new = jnp.ones((3, batch["k_cache"].shape[1], 32), jnp.bfloat16)
    slots = jnp.asarray([5, 17, 40], jnp.int32)
    got = ops.write_kv(batch["k_cache"], batch["v_cache"], batch["layer"], new, -new, slots, backend="mosaic_gpu")
    want = write_kv_reference(batch["k_cache"], batch["v_cache"], batch["layer"], new, -new, slots)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
