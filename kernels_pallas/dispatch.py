"""The one place that picks a kernel implementation.

Backends: "xla" (the CPU path: the native CPU kernels of `kernels_cpu` where they apply and are
built, else the `jax.numpy` implementation compiled by XLA),
"pallas" (the Pallas GPU kernels, Triton backend), "pallas_interpret" (the same Pallas kernels
run by the interpreter on any platform: numerics tests only, slow), and "auto" (pallas on GPU,
xla elsewhere). The choice is static: it is made when a step function is traced.
"""

import dataclasses

import jax

from kernels_pallas import paged_attention, quant_matmul as qmm
from kernels_pallas.paged_attention_xla import ragged_paged_attention_xla
from kernels_pallas.quant_matmul import QuantizedWeight
from kernels_cpu import native

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
    if backend == "xla" and _native_attention(q, k_cache):
        return native.ragged_paged_attention(*args, **options).astype(q.dtype)
    if backend == "xla":  # the reference's math, chunked so its cost follows the real context lengths
        return ragged_paged_attention_xla(*args, **options)
    return paged_attention.ragged_paged_attention(
        *args, **options, interpret=backend == "pallas_interpret")


def quant_matmul(x, w: QuantizedWeight, *, backend="auto", layer=None):
    """x[..., K] @ W[K, N] -> [..., N] in x's dtype, W quantized (see `quant_matmul`).

    With `layer` (an int32 scalar, traced or not), W is a layer stack ([L, K, N] and so on) and
    layer `layer` of it is used: the native CPU kernel reads it in place, the other paths slice it.
    """
    backend = resolve_backend(backend)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if backend == "xla" and _native_int8(x2, w):
        out = native.int8_matmul(x2, w.data, w.scales, layer)
    else:
        if layer is not None:
            w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), w)
        if backend == "xla":
            out = qmm.quant_matmul_reference(x2, w)
        else:
            if w.layout != "kn":  # the CPU kernel's layouts; the Pallas kernel reads [K, N]
                unlayout = native.from_blocked if w.layout == "blocked" else native.from_vnni
                w = dataclasses.replace(w, data=unlayout(w.data, w.shape[1]), layout="kn")
            out = qmm.quant_matmul(x2, w, interpret=backend == "pallas_interpret")
    return out.reshape(*lead, out.shape[-1])


def _native_int8(x2, w: QuantizedWeight) -> bool:
    """Whether the native CPU kernel takes this matmul: per-channel int8, float32 x. It beats XLA's
    dequantize-then-dot at every batch size measured (1 to 512 rows: docs/KERNELS.md)."""
    return (w.format == "int8" and w.group_size == 0 and x2.dtype == jax.numpy.float32
            and w.scales.dtype == jax.numpy.float16 and jax.default_backend() == "cpu" and native.available())


def _native_attention(q, k_cache) -> bool:
    """Whether the native CPU attention takes this step: float32, head_dim a multiple of 16. It beats
    the XLA path's gather-then-dot for decode and prefill alike (docs/KERNELS.md)."""
    return (q.dtype == jax.numpy.float32 and k_cache.dtype == jax.numpy.float32
            and q.shape[-1] % 16 == 0 and jax.default_backend() == "cpu" and native.available())
