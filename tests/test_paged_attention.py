"""Ragged paged attention and the K/V page write.

Two checks, two references:
- the `jax.numpy` reference (the XLA path the model runs on CPU) against an independent NumPy
  loop: per sequence, gather its keys page by page and run a dense causal softmax per query row;
- the Pallas kernels, run by the interpreter, against the `jax.numpy` reference over a sweep of
  GQA ratios, head sizes, page sizes, ragged batches, sliding windows and soft caps.

Inputs are random, never zeros. Cache slots that no sequence owns (and the slots of a sequence's
last page past its length) are poisoned: NaN for the kernels, so that reading one (even to
multiply it by a zero probability) fails; huge finite values for the reference, whose
probability-times-value product is exact only for finite values (as in a real cache). The interpreter
fills a kernel's outputs with NaN before it runs (`test_interpreter_poisons_unwritten_outputs`),
so an output element the kernel forgets to write fails too; the K/V write tests start from a
NaN-filled cache and compare every element.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxinfer import ops
from kernels_pallas import paged_attention as pa

POISON = 1e6  # K/V in slots no query may see (NaN for the kernels)


def make_batch(seed, q_lens, kv_lens, *, num_kv_heads=2, group=1, head_dim=64, page_size=16,
               num_padding_rows=3, num_layers=2, layer=1, dtype=jnp.float32, poison=POISON):
    """A ragged batch over a random page assignment. Returns a dict of arguments; the same
    seed gives the same batch whatever the poison."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    pages_per_seq = [math.ceil(n / page_size) for n in kv_lens]
    max_pages = max(pages_per_seq) + 1  # one spare column: entries past a sequence's pages
    num_pages = sum(pages_per_seq) + 3  # and a few pages nobody owns
    order = rng.permutation(num_pages)
    block_tables = np.zeros((num_seqs, max_pages), np.int32)
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    k_cache = np.full(shape, poison, np.float32)
    v_cache = np.full(shape, -poison, np.float32)
    used = 0
    for s, (n, pages) in enumerate(zip(kv_lens, pages_per_seq)):
        block_tables[s, :pages] = order[used:used + pages]
        block_tables[s, pages:] = rng.integers(0, num_pages, max_pages - pages)  # garbage
        used += pages
        for i in range(n):
            page, offset = block_tables[s, i // page_size], i % page_size
            k_cache[:, :, page, offset] = rng.standard_normal((num_layers, num_kv_heads, head_dim))
            v_cache[:, :, page, offset] = rng.standard_normal((num_layers, num_kv_heads, head_dim))
    num_tokens = sum(q_lens) + num_padding_rows
    q = rng.standard_normal((num_tokens, num_kv_heads * group, head_dim))
    return dict(
        q=jnp.asarray(q, dtype), k_cache=jnp.asarray(k_cache, dtype),
        v_cache=jnp.asarray(v_cache, dtype), layer=jnp.int32(layer),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        seq_lens=jnp.asarray(kv_lens, jnp.int32), block_tables=jnp.asarray(block_tables))


def naive_attention(batch, *, sm_scale, sliding_window=None, soft_cap=None):
    """Dense causal softmax, one sequence and one query row at a time, in float64 NumPy."""
    q = np.asarray(batch["q"], np.float64)
    k_cache = np.asarray(batch["k_cache"], np.float64)[int(batch["layer"])]
    v_cache = np.asarray(batch["v_cache"], np.float64)[int(batch["layer"])]
    qsl, seq_lens = np.asarray(batch["query_start_loc"]), np.asarray(batch["seq_lens"])
    block_tables = np.asarray(batch["block_tables"])
    num_kv_heads, _, page_size, _ = k_cache.shape
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    for s in range(len(seq_lens)):
        n, q_len = seq_lens[s], qsl[s + 1] - qsl[s]
        if q_len == 0:
            continue
        pages = [block_tables[s, i // page_size] for i in range(n)]
        keys = np.stack([k_cache[:, p, i % page_size] for i, p in enumerate(pages)], axis=1)
        values = np.stack([v_cache[:, p, i % page_size] for i, p in enumerate(pages)], axis=1)
        for i in range(q_len):
            row, pos = qsl[s] + i, n - q_len + i
            visible = np.arange(n) <= pos
            if sliding_window is not None:
                visible &= np.arange(n) > pos - sliding_window
            for h in range(q.shape[1]):
                scores = keys[h // group] @ q[row, h] * sm_scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                scores = np.where(visible, scores, -np.inf)
                p = np.exp(scores - scores.max())
                out[row, h] = (p / p.sum()) @ values[h // group]
    return out


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def reference(batch, **options):
    return pa.ragged_paged_attention_reference(**batch, **options)


# --- The jax.numpy reference against the NumPy loop ------------------------------------------

MIXED = ([1, 17, 1, 40], [20, 50, 7, 40])


@pytest.mark.parametrize("q_lens,kv_lens,group,sliding_window,soft_cap", [
    (*MIXED, 1, None, None), (*MIXED, 3, None, None), (*MIXED, 8, 7, None),
    (*MIXED, 3, None, 2.0), (*MIXED, 1, 20, 5.0),
    ([1, 1, 1], [9, 33, 1], 3, None, None),  # decode only
    ([70], [100], 2, 30, None),  # one long chunk
    ([3, 0, 2, 0], [10, 5, 2, 0], 1, None, None),  # sequences with no rows this step
])
def test_reference_matches_dense_causal_softmax_per_sequence(q_lens, kv_lens, group,
                                                             sliding_window, soft_cap):
    batch = make_batch(0, q_lens, kv_lens, group=group, page_size=8)
    options = dict(sm_scale=0.3, sliding_window=sliding_window, soft_cap=soft_cap)
    out = reference(batch, **options)
    expected = naive_attention(batch, **options)
    assert relative_error(out, expected) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out[-3:]), 0.0)  # padding rows


def test_reference_write_kv_drops_padding_slots():
    rng = np.random.default_rng(1)
    k_cache = jnp.asarray(rng.standard_normal((2, 3, 4, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 16)), jnp.float32)
    slots = jnp.array([13, -1, 0], jnp.int32)
    new_k, _ = pa.write_kv_reference(k_cache, k_cache, 1, k, k, slots)
    expected = np.array(k_cache)
    expected[1, :, 1, 5] = k[0]
    expected[1, :, 0, 0] = k[2]
    np.testing.assert_array_equal(np.asarray(new_k), expected)


# --- The Pallas kernels (interpreted) against the reference ----------------------------------

def test_interpreter_poisons_unwritten_outputs():
    """What makes the "every output element is written" checks below meaningful."""
    def half_kernel(o_ref):
        o_ref[0] = jnp.ones(8, jnp.float32)

    out = pl.pallas_call(half_kernel, out_shape=jax.ShapeDtypeStruct((2, 8), jnp.float32),
                         interpret=True)()
    assert np.isnan(np.asarray(out[1])).all()


ATTENTION_CASES = [
    # (num_kv_heads, group, head_dim, page_size, q_lens, kv_lens, sliding_window, soft_cap, blocks)
    pytest.param(2, 1, 64, 8, [1, 17, 1, 3], [30, 17, 255, 40], None, None, {}, id="mha-decode-mix"),
    pytest.param(1, 3, 128, 16, [17, 1, 40], [17, 328, 60], None, None, {}, id="gqa3-d128"),
    pytest.param(2, 8, 64, 32, [1, 1, 1, 9], [33, 1, 200, 9], None, None, {}, id="gqa8-decode"),
    pytest.param(1, 3, 64, 16, [255, 1], [328, 100], 64, None,
                 dict(block_m=64, block_kv=64), id="window-long-prefill"),
    pytest.param(2, 1, 128, 8, [5, 1, 30], [5, 70, 40], None, 3.0, {}, id="softcap"),
    pytest.param(1, 8, 64, 32, [20, 1], [52, 17], 16, 4.0, dict(block_kv=16), id="window-softcap"),
]


@pytest.mark.parametrize(
    "num_kv_heads,group,head_dim,page_size,q_lens,kv_lens,sliding_window,soft_cap,blocks",
    ATTENTION_CASES)
def test_pallas_attention_matches_reference(num_kv_heads, group, head_dim, page_size, q_lens,
                                            kv_lens, sliding_window, soft_cap, blocks):
    shapes = dict(num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, page_size=page_size)
    options = dict(sm_scale=head_dim ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    out = pa.ragged_paged_attention(**make_batch(2, q_lens, kv_lens, **shapes, poison=np.nan),
                                    **options, **blocks, interpret=True)
    ref = reference(make_batch(2, q_lens, kv_lens, **shapes), **options)
    assert relative_error(out, ref) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out[-3:]), 0.0)


def test_pallas_attention_bfloat16():
    shapes = dict(num_kv_heads=2, group=3, head_dim=64, page_size=16, dtype=jnp.bfloat16)
    out = pa.ragged_paged_attention(**make_batch(3, [1, 17, 1], [40, 30, 9], **shapes,
                                                 poison=np.nan), sm_scale=0.125, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = reference(make_batch(3, [1, 17, 1], [40, 30, 9], **shapes), sm_scale=0.125)
    assert relative_error(out, ref) <= 1e-2


def test_pallas_attention_with_no_padding_rows_and_an_empty_sequence():
    # A sequence with no query rows this step (q_len 0) gets no program and must not disturb
    # its neighbours.
    batch = make_batch(4, [3, 0, 2], [10, 5, 2], num_padding_rows=0)
    out = pa.ragged_paged_attention(**batch, sm_scale=0.125, interpret=True)
    assert relative_error(out, reference(batch, sm_scale=0.125)) <= 1e-5


@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim,page_size", [
    (37, 3, 64, 8), (5, 1, 128, 32), (16, 8, 64, 16)])
def test_pallas_write_kv_matches_reference(num_tokens, num_kv_heads, head_dim, page_size):
    rng = np.random.default_rng(num_tokens)
    num_pages = 2 * num_tokens // page_size + 2
    shape = (2, num_kv_heads, num_pages, page_size, head_dim)
    k_cache = jnp.full(shape, jnp.nan, jnp.float32)
    v_cache = jnp.full(shape, -jnp.inf, jnp.float32)
    k = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32)
    slots = rng.permutation(num_pages * page_size)[:num_tokens]
    slots[rng.random(num_tokens) < 0.2] = -1  # padding rows
    slots = jnp.asarray(slots, jnp.int32)
    expected = pa.write_kv_reference(k_cache, v_cache, 1, k, v, slots)
    out = pa.write_kv(k_cache, v_cache, jnp.int32(1), k, v, slots, interpret=True)
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pallas_write_kv_at_a_traced_layer_inside_scan():
    """The model calls the kernels inside lax.scan over layers, with the layer index traced."""
    rng = np.random.default_rng(5)
    shape = (3, 2, 4, 8, 64)
    k = jnp.asarray(rng.standard_normal((6, 2, 64)), jnp.float32)
    slots = jnp.array([0, 9, -1, 30, 31, 17], jnp.int32)

    def run(write):
        def layer_step(caches, layer):
            return write(*caches, layer, k * (layer + 1), -k, slots), None
        caches = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        return jax.lax.scan(layer_step, caches, jnp.arange(3, dtype=jnp.int32))[0]

    expected = jax.jit(lambda: run(pa.write_kv_reference))()
    out = jax.jit(lambda: run(lambda *a: pa.write_kv(*a, interpret=True)))()
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- Dispatch ---------------------------------------------------------------------------------

def test_dispatch_backends_agree_and_auto_is_xla_on_cpu():
    batch = make_batch(6, [1, 4], [9, 4], group=2)
    results = {b: ops.ragged_paged_attention(**batch, sm_scale=0.125, backend=b)
               for b in ("auto", "xla", "pallas_interpret")}
    assert ops.resolve_backend("auto") == "xla"
    np.testing.assert_array_equal(np.asarray(results["auto"]), np.asarray(results["xla"]))
    assert relative_error(results["pallas_interpret"], results["xla"]) <= 1e-5
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.resolve_backend("cuda")
