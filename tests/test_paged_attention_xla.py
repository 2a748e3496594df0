"""The CPU path's chunked attention equals the plain jnp reference on ragged batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import ragged_paged_attention_reference
from jaxinfer.xla_attention import ragged_paged_attention_xla


def ragged_case(rng, q_lens, seq_lens, *, num_heads, num_kv_heads, head_dim=64, page_size=16, num_tokens=None,
                num_seqs=None, max_pages=64):
    num_tokens = num_tokens or sum(q_lens)
    num_seqs = num_seqs or len(q_lens)
    num_pages = sum(-(-s // page_size) for s in seq_lens) + 3
    shape = (2, num_kv_heads, num_pages, page_size, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v_cache = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    qsl = np.full(num_seqs + 1, sum(q_lens), np.int32)
    qsl[:len(q_lens) + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    lens = np.zeros(num_seqs, np.int32)
    lens[:len(seq_lens)] = seq_lens
    tables = np.zeros((num_seqs, max_pages), np.int32)
    free = list(rng.permutation(num_pages))  # scattered pages
    for i, n in enumerate(seq_lens):
        tables[i, :-(-n // page_size)] = [free.pop() for _ in range(-(-n // page_size))]
    q = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), jnp.float32)
    return q, k_cache, v_cache, jnp.int32(1), qsl, lens, tables


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("sliding_window, soft_cap", [(None, None), (40, None), (None, 20.0)])
def test_chunked_attention_matches_reference(num_heads, num_kv_heads, sliding_window, soft_cap):
    rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
    # decode rows, a fresh prefill, a chunk after cached context, padding rows and a padding sequence
    case = ragged_case(rng, [1, 17, 1, 100, 1], [5, 17, 300, 228, 129], num_heads=num_heads,
                       num_kv_heads=num_kv_heads, num_tokens=128, num_seqs=8)
    options = dict(sm_scale=0.125, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = ragged_paged_attention_reference(*case, **options)
    out = ragged_paged_attention_xla(*case, **options, pages_per_chunk=4)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) <= 1e-5
    assert float(jnp.abs(out[120:]).max()) == 0.0  # padding rows
