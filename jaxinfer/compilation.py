"""Compile discipline: the bounded set of step shapes (buckets), the persistent compilation cache,
and the guard that notices a program being built during serving.

Every step pads its token count to a power of two and its sequence count to min(tokens,
max_num_seqs rounded up), so a server compiles a handful of programs, all at warm-up. The guard
listens to JAX's public monitoring events: JAX records a trace event each time a jitted function
misses its cache and is traced, i.e. each time a new program has to be built (compiled, or loaded
from the persistent cache).
"""

import contextlib
import os
import threading

import jax


class CompilationDuringServingError(RuntimeError):
    """A step needed a program that warm-up did not compile (strict mode)."""


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2*lo, ... up to the first power of two >= hi."""
    out = [next_power_of_two(lo)]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def step_buckets(max_num_batched_tokens: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """Every (tokens, sequences) shape a step can have: one per power of two of tokens."""
    return [padded_step_shape(t, 1, max_num_seqs) for t in powers_of_two(1, max_num_batched_tokens)]


def padded_step_shape(num_tokens: int, num_seqs: int, max_num_seqs: int) -> tuple[int, int]:
    """A step's bucket. Sequences pad to min(tokens, max_num_seqs): each sequence has at least one
    token, so that is always enough, and a few extra logits rows cost little next to the tokens."""
    tokens = next_power_of_two(num_tokens)
    return tokens, min(tokens, next_power_of_two(max_num_seqs))


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so a restarted engine skips XLA compiles:
    `path`, else $JAXINFER_COMPILATION_CACHE, else ~/.cache/jaxinfer/xla. This sets JAX's global
    config, for every jit of the process: the application's choice, so the engine never calls it
    (`jaxinfer serve` does, before it builds its engine). Returns the directory."""
    path = path or os.environ.get("JAXINFER_COMPILATION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxinfer", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


# JAX records this event (jax.monitoring) whenever a jitted function is traced: a jit cache miss.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_watching = threading.local()


class TraceCounter:
    """Counts the traces JAX does inside `watch()`, in the watching thread only (other engines or
    threads of the same process do not count)."""

    def __init__(self):
        self.traces = 0

    @contextlib.contextmanager
    def watch(self):
        previous = getattr(_watching, "counter", None)
        _watching.counter = self
        try:
            yield self
        finally:
            _watching.counter = previous


def _on_event_duration(event: str, duration: float, **kwargs) -> None:
    counter = getattr(_watching, "counter", None)
    if counter is not None and event == TRACE_EVENT:
        counter.traces += 1


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
