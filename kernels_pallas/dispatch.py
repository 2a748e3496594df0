"""The one place that picks a kernel implementation.

Backends: "xla" (the `jax.numpy` implementation, compiled by XLA: the fast path on CPU),
"pallas" (the Pallas GPU kernels, Triton backend), "pallas_interpret" (the same Pallas kernels
run by the interpreter on any platform: numerics tests only, slow), and "auto" (pallas on GPU,
xla elsewhere). The choice is static: it is made when a step function is traced.
"""

import jax

from kernels_pallas import paged_attention, quant_matmul as qmm
from kernels_pallas.paged_attention_xla import ragged_paged_attention_xla
from kernels_pallas.quant_matmul import QuantizedWeight

BACKENDS = ("auto", "xla", "pallas", "pallas_interpret")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return backend


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping, *, backend="auto"):
    """Writes new K/V rows into the paged cache (see `paged_attention.write_kv_reference`)."""
    backend = resolve_backend(backend)
    if backend == "xla":
        return paged_attention.write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping)
    return paged_attention.write_kv(k_cache, v_cache, layer, k, v, slot_mapping,
                                    interpret=backend == "pallas_interpret")


def ragged_paged_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
                           *, sm_scale, sliding_window=None, soft_cap=None, backend="auto"):
    """Ragged paged attention (see `paged_attention.ragged_paged_attention_reference`)."""
    backend = resolve_backend(backend)
    args = (q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if backend == "xla":  # the reference's math, chunked so its cost follows the real context lengths
        return ragged_paged_attention_xla(*args, **options)
    return paged_attention.ragged_paged_attention(
        *args, **options, interpret=backend == "pallas_interpret")


def quant_matmul(x, w: QuantizedWeight, *, backend="auto"):
    """x[..., K] @ W[K, N] -> [..., N] in x's dtype, W quantized (see `quant_matmul`)."""
    backend = resolve_backend(backend)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if backend == "xla":
        out = qmm.quant_matmul_reference(x2, w)
    else:
        out = qmm.quant_matmul(x2, w, interpret=backend == "pallas_interpret")
    return out.reshape(*lead, out.shape[-1])
