"""Perplexity of a model over windows of tokens, through the same paged forward the engine runs.

The definition, as every caller here uses it (tests/test_quant.py, notebooks/03_quantization):
each window is a sequence of its own, starting at position 0 on an empty cache (nothing before
it, no BOS added). Position t (t = 1 .. n-1) is scored by the cross-entropy of the window's token
t under the model's distribution after tokens 0 .. t-1: -log softmax(logits)[token], natural log,
over the whole vocabulary, in float32. The first token of a window is not scored. The perplexity is
exp of the mean over all scored positions of all windows (num_windows * (n - 1) of them): exp of the
mean over the windows of HF transformers' causal-LM loss with labels = the window.
`first_scored` > 1 scores positions first_scored .. n-1 only, each still predicted from the whole window
before it: llama.cpp's `llama-perplexity` scores the second half of each window (first_scored = n // 2 + 1),
so every scored token has at least n / 2 tokens of context.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.kv_cache import allocate_kv_cache
from jaxinfer.models.llama import AttentionMetadata, Llama


def token_windows(token_ids, window: int, num_windows: int) -> np.ndarray:
    """The first window * num_windows tokens as [num_windows, window] int32 (windows do not overlap)."""
    if len(token_ids) < window * num_windows:
        raise ValueError(f"{num_windows} windows of {window} tokens need {window * num_windows} tokens, "
                         f"got {len(token_ids)}")
    return np.asarray(token_ids[:window * num_windows], np.int32).reshape(num_windows, window)


def perplexity(model: Llama, windows, *, seqs_per_call: int = 4, page_size: int = 16,
               cache_dtype=jnp.float32, first_scored: int = 1) -> float:
    """exp(mean next-token cross-entropy) of `model` over `windows` ([num_windows, n] int), as the module
    docstring defines it. `seqs_per_call` windows go through one forward (one ragged prefill batch,
    logits at every position); the result does not depend on it beyond float rounding."""
    windows = np.asarray(windows, np.int32)
    num_windows, n = windows.shape
    if n < 2:
        raise ValueError(f"a window needs at least 2 tokens to score one, got {n}")
    if not 1 <= first_scored < n:
        raise ValueError(f"first_scored must be in [1, {n - 1}] for windows of {n} tokens, got {first_scored}")
    graphdef, state = nnx.split(model)
    total = 0.0  # summed in float64 on the host, one float32 sum per call
    for start in range(0, num_windows, seqs_per_call):
        total += float(_summed_nll(graphdef, state, jnp.asarray(windows[start:start + seqs_per_call]),
                                   page_size=page_size, cache_dtype=cache_dtype, first_scored=first_scored))
    return float(np.exp(total / (num_windows * (n - first_scored))))


def top_tokens(model: Llama, windows, k: int = 5, *, seqs_per_call: int = 4, page_size: int = 16,
               cache_dtype=jnp.float32) -> np.ndarray:
    """[num_windows, n - 1, k] int32: at each position t < n - 1 of each window, the k most likely next
    tokens (best first) after tokens 0 .. t, teacher-forced: the model sees the window's own tokens,
    whatever it would have chosen. Windows start at position 0 on an empty cache, as in `perplexity`;
    a window padded at its end gives the same predictions before the padding (attention is causal)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [num_windows, n >= 2] token ids, got shape {windows.shape}")
    graphdef, state = nnx.split(model)
    return np.concatenate([np.asarray(_top_tokens(graphdef, state, jnp.asarray(windows[start:start + seqs_per_call]),
                                                  k=k, page_size=page_size, cache_dtype=cache_dtype))
                           for start in range(0, len(windows), seqs_per_call)])


def _metadata(num_seqs: int, n: int, page_size: int) -> AttentionMetadata:
    """Sequence s of n tokens owns pages [s * pages_per_seq, (s + 1) * pages_per_seq); logits at every row."""
    pages_per_seq = -(-n // page_size)
    block_tables = np.arange(num_seqs * pages_per_seq, dtype=np.int32).reshape(num_seqs, pages_per_seq)
    pos = np.arange(n)
    slot_mapping = (block_tables[:, pos // page_size] * page_size + pos % page_size).reshape(-1)  # [S * n]
    return AttentionMetadata(*map(jnp.asarray, (
        slot_mapping, np.arange(num_seqs + 1, dtype=np.int32) * n, np.full(num_seqs, n, np.int32),
        block_tables, np.arange(num_seqs * n, dtype=np.int32))))


def _window_logits(graphdef, state, token_ids, page_size, cache_dtype):
    """token_ids [S, n] int32 -> [S, n, vocab] float32 logits at every position, each window a
    sequence of its own from position 0 on an empty cache (traced inside the jitted callers)."""
    num_seqs, n = token_ids.shape
    model = nnx.merge(graphdef, state)
    meta = _metadata(num_seqs, n, page_size)
    k_cache, v_cache = allocate_kv_cache(model.config, num_seqs * meta.block_tables.shape[1], page_size, cache_dtype)
    positions = jnp.tile(jnp.arange(n, dtype=jnp.int32), num_seqs)  # [S * n]
    logits, _, _ = model(token_ids.reshape(-1), positions, k_cache, v_cache, meta)  # [S * n, vocab]
    return logits.reshape(num_seqs, n, -1)


# The weights are an argument, not constants of the program; one compile per (num_seqs, n).
@functools.partial(jax.jit, static_argnames=("graphdef", "page_size", "cache_dtype", "first_scored"))
def _summed_nll(graphdef, state, token_ids, *, page_size, cache_dtype, first_scored):
    """token_ids [S, n] int32 -> the summed cross-entropy of positions first_scored .. n-1 of every sequence."""
    logits = _window_logits(graphdef, state, token_ids, page_size, cache_dtype)
    logp = jax.nn.log_softmax(logits[:, first_scored - 1:-1], axis=-1)
    return -jnp.take_along_axis(logp, token_ids[:, first_scored:, None], axis=-1).sum()


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "page_size", "cache_dtype"))
def _top_tokens(graphdef, state, token_ids, *, k, page_size, cache_dtype):
    """token_ids [S, n] int32 -> [S, n - 1, k] the k best next tokens after each position but the last."""
    return jax.lax.top_k(_window_logits(graphdef, state, token_ids, page_size, cache_dtype)[:, :-1], k)[1]
