"""The one place that picks a kernel for a platform.

Backends, chosen separately for attention (`--attention-backend`) and for the quantized matmul
(`--matmul-backend`):
- "xla": the CPU path. The native CPU kernels of `kernels_cpu` where they apply and are built,
  else the `jax.numpy` implementation compiled by XLA (`jaxinfer.xla_attention` for attention, the
  reference dequantize-then-dot for the matmul);
- "pallas": the Pallas GPU kernels of `kernels_pallas` (Triton backend);
- "pallas_interpret": the same Pallas kernels run by the interpreter on any platform (numerics
  tests only, slow);
- "auto": pallas on a GPU, xla elsewhere.
Both have two more (`MOSAIC_BACKENDS`, in `ATTENTION_BACKENDS` and `MATMUL_BACKENDS`):
- "mosaic_gpu": the Mosaic GPU kernels for Hopper (sm_90a) where they apply, else the Triton ones.
  The matmul (`kernels_pallas.quant_matmul_mgpu`): int8, int4, int5/int6 and fp8 weights in the "kn"
  layout, bf16/f16 activations, N a multiple of 64, K of 64 for int8/fp8 or 128 for int4/int5/int6. Attention
  (`kernels_pallas.ragged_attention_mgpu`): bf16/f16, head_dim a multiple of 64, page sizes 8 to 64
  dividing 64, at most 64 query heads per KV head; its K/V page write is XLA's scatter. "auto"
  stays on Triton until a run on a real Hopper GPU has checked them: so far they are checked in
  Mosaic GPU's interpret mode and compiled for sm_90a without a GPU (docs/KERNELS.md);
- "mosaic_gpu_interpret": the same, run by Mosaic GPU's interpreter (numerics tests only).
The choice is static: it is made when a step function is traced. The kernel packages stand alone
(they import nothing from each other or from jaxinfer); this module is where they meet the engine.
"""

import jax
import jax.numpy as jnp

from jaxinfer import kquant
from jaxinfer.xla_attention import ragged_paged_attention_xla
from kernels_cpu import native
from kernels_pallas import paged_attention
from kernels_pallas import quant_matmul as qmm
from kernels_pallas import quant_matmul_mgpu as qmm_mgpu
from kernels_pallas import ragged_attention_mgpu as attention_mgpu

BACKENDS = ("auto", "xla", "pallas", "pallas_interpret")
MOSAIC_BACKENDS = ("mosaic_gpu", "mosaic_gpu_interpret")
ATTENTION_BACKENDS = BACKENDS + MOSAIC_BACKENDS
MATMUL_BACKENDS = BACKENDS + MOSAIC_BACKENDS


def resolve_backend(backend: str, choices=BACKENDS) -> str:
    if backend not in choices:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {choices}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return backend


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping, *, backend="auto"):
    """Writes new K/V rows into the paged cache (see `paged_attention.write_kv_reference`)."""
    backend = resolve_backend(backend, ATTENTION_BACKENDS)
    if backend == "xla" or backend in MOSAIC_BACKENDS:  # XLA's scatter: no Triton under the Mosaic GPU path
        return paged_attention.write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping)
    return paged_attention.write_kv(k_cache, v_cache, layer, k, v, slot_mapping,
                                    interpret=backend == "pallas_interpret")


def ragged_paged_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
                           *, sm_scale, sliding_window=None, soft_cap=None, backend="auto"):
    """Ragged paged attention (see `paged_attention.ragged_paged_attention_reference`).

    `sliding_window`: None, or an int32 scalar that may be traced (a layer scan's own; <= 0: none).
    """
    backend = resolve_backend(backend, ATTENTION_BACKENDS)
    args = (q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if backend in MOSAIC_BACKENDS:
        interpret = backend == "mosaic_gpu_interpret"
        _, num_kv_heads, _, page_size, head_dim = k_cache.shape
        if attention_mgpu.supports(q.shape[1], num_kv_heads, head_dim, page_size, q.dtype, interpret):
            return attention_mgpu.ragged_paged_attention(*args, **options, interpret=interpret)
        return paged_attention.ragged_paged_attention(*args, **options, interpret=interpret)  # Triton
    if backend == "xla" and _native_attention(q, k_cache):
        return native.ragged_paged_attention(*args, **options).astype(q.dtype)
    if backend == "xla":  # the reference's math, chunked so its cost follows the real context lengths
        return ragged_paged_attention_xla(*args, **options)
    return paged_attention.ragged_paged_attention(
        *args, **options, interpret=backend == "pallas_interpret")


def quant_matmul(x, w, *, backend="auto", layer=None):
    """x[..., K] @ W[K, N] -> [..., N] in x's dtype, W a `jaxinfer.quant.QuantizedWeight` or a
    `jaxinfer.kquant.KQuantWeight`.

    With `layer` (an int32 scalar, traced or not), W is a layer stack ([L, K, N] and so on) and
    layer `layer` of it is used: the native CPU kernel reads it in place, the other paths slice it.
    """
    backend = resolve_backend(backend, MATMUL_BACKENDS)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if isinstance(w, kquant.KQuantWeight) and layer is None:
        layer = 0  # a stack of one
    if isinstance(w, kquant.KQuantWeight) and backend == "xla" and _native_kquant():
        out = native.kquant_matmul(x2.astype(jnp.float32), w.data, w.index, layer, n=w.n).astype(x.dtype)
    elif isinstance(w, kquant.KQuantWeight):  # GPU, or no native build: dequantize the layer, then dot
        out = kquant.matmul_reference(x2, w, layer)
    elif backend == "xla" and _native_int8(x2, w):
        out = native.int8_matmul(x2, w.data, w.scales, layer, group_size=w.group_size)
    elif w.layout == "codes":  # only ever made where the native grouped kernel runs (quant.use_blocked_layout)
        out = native.group_matmul(x2.astype(jnp.float32), w.data, w.scales, w.mins, layer, bits=w.bits).astype(x.dtype)
    else:
        if layer is not None:
            w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), w)
        operands = (x2, w.kn_data(), w.scales, w.mins)  # the CPU kernel's layouts go back to [K, N]
        formats = dict(fmt=w.format, group_size=w.group_size)
        blocks = qmm_mgpu.default_blocks(w.format, w.group_size, *x2.shape, w.shape[1], x2.dtype)
        if backend == "xla":
            out = qmm.quant_matmul_reference(*operands, **formats)
        elif backend.startswith("mosaic_gpu") and blocks is not None:
            out = qmm_mgpu.quant_matmul(*operands, **formats, **blocks, interpret=backend == "mosaic_gpu_interpret")
        elif backend.startswith("mosaic_gpu"):  # a shape or format the Mosaic GPU kernel does not take
            out = qmm.quant_matmul(*operands, **formats, interpret=backend == "mosaic_gpu_interpret")
        else:
            out = qmm.quant_matmul(*operands, **formats, interpret=backend == "pallas_interpret")
    return out.reshape(*lead, out.shape[-1])


def quant_matmuls(x, ws, *, backend="auto", layer=None):
    """[quant_matmul(x, w, backend=backend, layer=layer) for w in ws]: several weights of one x (a
    layer's q, k and v; its gate and up). On the CPU those that the same native kernel takes go to
    it in one call (x quantized once, the weights' column blocks split between the threads as one
    matmul's: `native.int8_matmul_fused` and its kin), each output bit-for-bit its own call's."""
    backend = resolve_backend(backend, MATMUL_BACKENDS)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    kernels: dict[str, list[int]] = {}  # native kernel -> the indices of ws it takes
    for i, w in enumerate(ws):
        kernels.setdefault(_native_kernel(x2, w, backend), []).append(i)
    outs = [None] * len(ws)
    for kernel, indices in kernels.items():
        if kernel is None or len(indices) == 1:
            for i in indices:
                outs[i] = quant_matmul(x, ws[i], backend=backend, layer=layer)
            continue
        group = [ws[i] for i in indices]
        xf = x2.astype(jnp.float32)
        if kernel == "kquant":
            ys = native.kquant_matmul_fused(xf, [(w.data, w.index, w.n) for w in group], 0 if layer is None else layer)
        elif kernel == "int8":
            ys = native.int8_matmul_fused(xf, [(w.data, w.scales, w.group_size) for w in group], layer)
        else:
            ys = native.group_matmul_fused(xf, [(w.data, w.scales, w.mins, w.bits) for w in group], layer)
        for i, y in zip(indices, ys):
            outs[i] = y.astype(x.dtype).reshape(*lead, y.shape[-1])
    return outs


def _native_kernel(x2, w, backend) -> str | None:
    """The native CPU kernel `quant_matmul` gives this weight ("int8", "group", "kquant"), or None:
    the same choices in the same order."""
    if isinstance(w, kquant.KQuantWeight):
        return "kquant" if backend == "xla" and _native_kquant() else None
    if backend == "xla" and _native_int8(x2, w):
        return "int8"
    return "group" if w.layout == "codes" else None


def _native_int8(x2, w) -> bool:
    """Whether the native CPU kernel takes this matmul: per-channel int8, fp8 per channel or in groups
    of rows (FP8 checkpoints' blocks), float32 x. It beats XLA's dequantize-then-dot at every batch
    size measured (1 to 512 rows: docs/KERNELS.md)."""
    return ((w.format == "int8" and w.group_size == 0 or w.format == "fp8") and x2.dtype == jnp.float32
            and w.scales.dtype == jnp.float16 and jax.default_backend() == "cpu" and native.available())


def _native_kquant() -> bool:
    """Whether the native CPU kernel runs K-quants (any batch: the file's bits, streamed in place)."""
    return jax.default_backend() == "cpu" and native.has_group_path()


def _native_attention(q, k_cache) -> bool:
    """Whether the native CPU attention takes this step: float32 q, a float32 or float16 cache,
    head_dim a multiple of 16. It beats the XLA path's gather-then-dot for decode and prefill alike
    (docs/KERNELS.md)."""
    return (q.dtype == jnp.float32 and k_cache.dtype in native.ATTENTION_CACHE_DTYPES
            and q.shape[-1] % 16 == 0 and jax.default_backend() == "cpu" and native.available())
