"""The native CPU attention kernel (kernels_cpu/paged_attention.cc) equals the plain jnp reference,
rows do not depend on their batch, bad metadata is refused, and the engine's steps call it.
tests/test_native_cpu.py's AVX2 build test runs this file's kernel tests against that build too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_cpu import native
from kernels_pallas.paged_attention import ragged_paged_attention_reference
from tests.test_paged_attention_xla import ragged_case

pytestmark = pytest.mark.skipif(native.turned_off() is not None, reason=f"native kernels off: {native.turned_off()}")


def test_the_attention_keeps_its_page_prefetches_through_the_compiler():
    """paged_attention.cc prefetches pages ahead into L2 (prefetcht1) and the next one into L1: a
    build the compiler optimized them out of computes the same numbers, only slower (as one did
    until 2026-12-06), so no other test would notice. objdump comes with g++'s binutils."""
    import shutil
    import subprocess

    library = native.load()
    code = subprocess.run([shutil.which("objdump") or "objdump", "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True, check=True).stdout
    assert "prefetcht1" in code


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("sliding_window, soft_cap", [(None, None), (40, None), (None, 20.0)])
def test_paged_attention_matches_reference(num_heads, num_kv_heads, sliding_window, soft_cap):
    rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
    # decode rows over short and long context, a short prefill, a chunk after cached context,
    # padding rows and a padding sequence
    case = ragged_case(rng, [1, 9, 1, 6, 1], [5, 9, 300, 228, 129], num_heads=num_heads,
                       num_kv_heads=num_kv_heads, num_tokens=32, num_seqs=8)
    options = dict(sm_scale=0.125, sliding_window=sliding_window, soft_cap=soft_cap)
    want = ragged_paged_attention_reference(*case, **options)
    got = jax.jit(lambda *a: native.ragged_paged_attention(*a, **options))(*case)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert not np.asarray(got)[18:].any()  # padding rows are zeros


@pytest.mark.parametrize("head_dim, page_size", [(128, 8), (256, 32), (64, 24), (80, 16)])
def test_paged_attention_head_dims_and_page_sizes(head_dim, page_size):
    """Key tiles are cut at page ends: pages smaller than, larger than and not a multiple of the
    vector width; Gemma 3's head_dim 256; 80, a head size the kernel has no unrolled copy for."""
    rng = np.random.default_rng(head_dim + page_size)
    case = ragged_case(rng, [1, 20, 1, 37], [3, 20, 131, 90], num_heads=4, num_kv_heads=2, head_dim=head_dim,
                       page_size=page_size, num_tokens=64, num_seqs=5)
    for window in (None, 19):
        options = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
        want = ragged_paged_attention_reference(*case, **options)
        got = jax.jit(lambda *a: native.ragged_paged_attention(*a, **options))(*case)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim, page_size, window, soft_cap", [(64, 16, None, None), (64, 16, 40, 20.0),
                                                                  (256, 8, None, None)])
def test_paged_attention_reads_a_float16_cache(head_dim, page_size, window, soft_cap):
    """A float16 cache (the CPU default) is widened exactly as it is read: the result is bit for bit
    the float32 kernel's on the same values held as float32, and the reference's on the float16 cache."""
    rng = np.random.default_rng(head_dim + page_size + (window or 0))
    q, k_cache, v_cache, *meta = ragged_case(rng, [1, 20, 1, 37], [3, 20, 131, 90], num_heads=9, num_kv_heads=3,
                                             head_dim=head_dim, page_size=page_size, num_tokens=64, num_seqs=5)
    k_half, v_half = k_cache.astype(jnp.float16), v_cache.astype(jnp.float16)
    options = dict(sm_scale=head_dim ** -0.5, sliding_window=window, soft_cap=soft_cap)
    run = jax.jit(lambda *a: native.ragged_paged_attention(*a, **options))
    got = np.asarray(run(q, k_half, v_half, *meta))
    np.testing.assert_array_equal(got, np.asarray(run(q, k_half.astype(jnp.float32), v_half.astype(jnp.float32), *meta)))
    want = ragged_paged_attention_reference(q, k_half, v_half, *meta, **options)
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="float32 or float16 caches of one dtype"):
        native.ragged_paged_attention(q, k_half, v_cache, *meta, sm_scale=0.125)


def test_paged_attention_row_does_not_depend_on_the_rest_of_the_batch():
    """A sequence's rows come out bit for bit the same alone and beside others, and a prefill row the
    same whether its chunk is long or short (rows are blocked by 16 per work item): the CPU default's
    answers may not depend on the load."""
    rng = np.random.default_rng(7)
    q, k_cache, v_cache, layer, qsl, lens, tables = ragged_case(rng, [1, 40, 1], [77, 60, 33], num_heads=9,
                                                                num_kv_heads=3)
    run = jax.jit(lambda *a: native.ragged_paged_attention(*a, sm_scale=0.125, sliding_window=None))
    full = np.asarray(run(q, k_cache, v_cache, layer, qsl, lens, tables))
    # The prefill sequence alone: its last 7 rows as a chunk of their own after 53 cached tokens.
    alone = np.asarray(run(q[34:41], k_cache, v_cache, layer, np.array([0, 7], np.int32), lens[1:2], tables[1:2]))
    np.testing.assert_array_equal(alone, full[34:41])
    # Its last row as a one-row chunk (the kernel's one-row items, a decode row's path) against the
    # same row in a block of 8.
    alone = np.asarray(run(q[40:41], k_cache, v_cache, layer, np.array([0, 1], np.int32), lens[1:2], tables[1:2]))
    np.testing.assert_array_equal(alone, full[40:41])
    # The decode row of the last sequence alone.
    alone = np.asarray(run(q[41:42], k_cache, v_cache, layer, np.array([0, 1], np.int32), lens[2:3], tables[2:3]))
    np.testing.assert_array_equal(alone, full[41:42])


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 1, 256), (8, 2, 64)])
def test_a_few_decode_rows_split_by_heads_give_each_row_its_batch_of_many_result(num_heads, num_kv_heads, head_dim):
    """One to three decode rows make fewer work items than a few rounds of the threads, and the last
    are split by query heads (SmolLM2's 3 KV heads at one row, Gemma 3's 1): each row equals the
    reference and is bit for bit the same row in a step of 16 decode rows, whose items are not split."""
    rng = np.random.default_rng(num_heads + head_dim)
    lens = [700, 40, 300] + [int(x) for x in rng.integers(20, 200, 13)]
    q, k_cache, v_cache, layer, qsl, seq_lens, tables = ragged_case(
        rng, [1] * 16, lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_tokens=16,
        num_seqs=16)
    run = jax.jit(lambda *a: native.ragged_paged_attention(*a, sm_scale=head_dim ** -0.5, sliding_window=None))
    full = np.asarray(run(q, k_cache, v_cache, layer, qsl, seq_lens, tables))
    for rows in (1, 2, 3):
        few = np.asarray(run(q[:rows], k_cache, v_cache, layer, np.arange(rows + 1, dtype=np.int32),
                             seq_lens[:rows], tables[:rows]))
        np.testing.assert_array_equal(few, full[:rows])
        want = ragged_paged_attention_reference(q[:rows], k_cache, v_cache, layer, np.arange(rows + 1, dtype=np.int32),
                                                seq_lens[:rows], tables[:rows], sm_scale=head_dim ** -0.5)
        np.testing.assert_allclose(few, np.asarray(want), atol=2e-5, rtol=1e-5)


def test_paged_attention_never_reads_outside_the_page_pool():
    """A block table entry past the pool (never in a valid batch) is skipped, not read."""
    rng = np.random.default_rng(3)
    q, k_cache, v_cache, layer, qsl, lens, tables = ragged_case(rng, [1], [40], num_heads=4, num_kv_heads=2)
    tables[0, 1] = 10 ** 6
    out = native.ragged_paged_attention(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.125)
    assert np.isfinite(np.asarray(out)).all()


def bad_metadata_case():
    """Three sequences (1, 4 and 1 query rows over 10, 20 and 5 tokens) and a padding one, 8 rows,
    block tables 4 pages of 16 wide: a valid batch for the tests below to break one field of."""
    return ragged_case(np.random.default_rng(4), [1, 4, 1], [10, 20, 5], num_heads=4, num_kv_heads=2,
                       num_tokens=8, num_seqs=4, max_pages=4)


def test_bad_metadata_case_is_valid_as_built():
    q, k_cache, v_cache, layer, qsl, lens, tables = bad_metadata_case()
    got = native.ragged_paged_attention(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.125)
    want = ragged_paged_attention_reference(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("field, index, value, message", [
    ("qsl", 0, -1, "query_start_loc"),  # rows before q
    ("qsl", 2, 0, "query_start_loc"),  # decreasing: [0, 1, 0, 6, 6]
    ("qsl", 4, 9, "query_start_loc"),  # the padding sequence's end past the 8 rows
    ("qsl", 3, 100, "query_start_loc"),  # a row range far past q and the output
    ("lens", 1, 3, "seq_lens"),  # fewer tokens than query rows: a negative first position
    ("lens", 1, 65, "seq_lens"),  # more tokens than 4 pages of 16 hold: keys past the block table row
    ("lens", 3, 2 ** 30, "seq_lens"),  # a padding sequence too
])
def test_paged_attention_refuses_metadata_that_would_index_out_of_bounds(field, index, value, message):
    """query_start_loc, seq_lens and the block tables index q, the output and the page pool: the
    kernel checks them at the FFI boundary and returns an error instead of touching memory."""
    q, k_cache, v_cache, layer, qsl, lens, tables = bad_metadata_case()
    {"qsl": qsl, "lens": lens}[field][index] = value
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"INVALID_ARGUMENT.*{message}"):
        out = jax.jit(lambda *a: native.ragged_paged_attention(*a, sm_scale=0.125))(
            q, k_cache, v_cache, layer, qsl, lens, tables)
        out.block_until_ready()


def test_default_cpu_engine_keeps_a_float16_cache_read_by_the_native_kernel(served):
    """The default configuration (quantized weights on the CPU) keeps K/V in float16, as llama.cpp
    does, and its steps read them with the native kernel's float16 entry; kv_cache_dtype says otherwise."""
    engine = served.engine
    assert engine.kv_cache_dtype == jnp.float16 and engine.runner.k_cache.dtype == jnp.float16
    runner = engine.runner
    batch = runner._empty_batch(*runner.padded_shape(1, 1))
    assert "jaxinfer_ragged_paged_attention_f16" in runner._step.lower(
        runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
    from jaxinfer.loading import resolve_kv_cache_dtype
    assert resolve_kv_cache_dtype("auto", jnp.float32, "none", "cpu") == jnp.float32  # full precision stays so
    assert resolve_kv_cache_dtype("auto", jnp.bfloat16, "int4", "gpu") == jnp.bfloat16
    assert resolve_kv_cache_dtype("float32", jnp.float32, "native", "cpu") == jnp.float32
    with pytest.raises(ValueError, match="kv_cache_dtype float16 differs from the model's dtype bfloat16"):
        resolve_kv_cache_dtype("float16", jnp.bfloat16, "int4", "gpu")
    from jaxinfer.config import EngineConfig
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="int8")


def test_cpu_engine_runs_attention_through_the_native_kernel(llm):
    """The session model (float32, CPU; the HF comparisons of tests/test_model_vs_hf.py run through
    it): decode and prefill steps call the native attention. tests/test_quant.py checks the int8
    model, whose projections call the native matmul, end to end."""
    runner = llm.engine.runner
    for tokens in (1, 64):
        batch = runner._empty_batch(*runner.padded_shape(tokens, 1))
        text = runner._step.lower(runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
        assert "jaxinfer_ragged_paged_attention" in text
