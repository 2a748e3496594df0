"""Builds the padded ragged batch of a step and runs the jitted step function on it.

Compile discipline: the token count and the sequence count are padded up to powers of two, so the step has a bounded set of shapes; `warmup()` compiles all of them before
serving, and a guard counts any compilation after that (and raises in strict mode). JAX's
persistent compilation cache makes a restarted engine load those programs instead of compiling.
The KV cache is donated to the step and updated in place.
"""

import logging
import os
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer.cache import allocate_kv_cache
from jaxinfer.models.llama import AttentionMetadata
from jaxinfer.sampling import MAX_LOGPROBS, SamplingArrays, sample
from jaxinfer.sequence import Sequence

logger = logging.getLogger("jaxinfer")

class CompilationDuringServingError(RuntimeError):
    """A step needed a program that warm-up did not compile (strict mode)."""


class StepOutput(NamedTuple):
    """Per scheduled sequence: the sampled token, its logprob, and the top alternatives."""

    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_ids: np.ndarray  # [S, MAX_LOGPROBS] int32
    top_logprobs: np.ndarray  # [S, MAX_LOGPROBS] float32


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so a restarted engine skips XLA compiles."""
    path = path or os.environ.get("JAXINFER_COMPILATION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxinfer", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2*lo, ... up to the first power of two >= hi."""
    out = [next_power_of_two(lo)]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


class ModelRunner:
    def __init__(self, model, engine_config, num_pages: int, dtype):
        self.config = engine_config
        self.graphdef, state = nnx.split(model)
        self.page_size = engine_config.page_size
        self.num_pages = num_pages
        # Every array the step sees is committed to the device, as its outputs are: an uncommitted
        # input (fresh zeros, weights from jnp.asarray) would make the step's first call, at warm-up,
        # a different program signature from the calls that follow it.
        device = jax.devices()[0]
        self.state = jax.device_put(state, device)
        self.k_cache, self.v_cache = jax.device_put(
            allocate_kv_cache(model.config, num_pages, self.page_size, dtype), device)
        self.max_pages_per_seq = -(-engine_config.max_model_len // self.page_size)
        logger.info("persistent compilation cache: %s", enable_compilation_cache())
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2))
        self.num_compilations = 0  # after warm-up
        self._known_programs = 0
        self.warmed_up = False

    # -- buckets ----------------------------------------------------------------------------------

    def token_buckets(self) -> list[int]:
        return powers_of_two(1, self.config.max_num_batched_tokens)

    def buckets(self) -> list[tuple[int, int]]:
        """Every (tokens, sequences) shape a step can have: one per power of two of tokens.

        A step pads its sequences to min(tokens, max_num_seqs): each sequence has at least one token,
        so that is always enough, and a few extra logits rows cost little next to the step's tokens.
        Block tables are always max_model_len wide: the attention loops over the pages a sequence
        has, so their width costs nothing.
        """
        return [self.padded_shape(t, 1) for t in self.token_buckets()]

    def padded_shape(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        tokens = next_power_of_two(num_tokens)
        return tokens, min(tokens, next_power_of_two(self.config.max_num_seqs))

    # -- the step ---------------------------------------------------------------------------------

    def _step_fn(self, state, k_cache, v_cache, token_ids, positions, meta, sampling, history, num_prompt):
        model = nnx.merge(self.graphdef, state)
        logits, k_cache, v_cache = model(token_ids, positions, k_cache, v_cache, meta)
        return sample(logits, sampling, history, num_prompt, MAX_LOGPROBS), k_cache, v_cache

    def warmup(self) -> None:
        """Compiles (or loads from the persistent cache) the program of every bucket."""
        shapes = self.buckets()
        start = time.perf_counter()
        logger.info("warm-up: %d step programs, (tokens, sequences) = %s", len(shapes), shapes)
        for shape in tqdm(shapes, desc="Compiling", unit="program", leave=False):
            self._run(*self._empty_batch(*shape))
        self._known_programs = self._step._cache_size()
        self.warmed_up = True
        logger.info("warm-up: %d programs ready in %.1f s", len(shapes), time.perf_counter() - start)

    def execute(self, scheduled: list[tuple[Sequence, int]], needs_history: bool = False) -> StepOutput:
        """Runs one step over the scheduled (sequence, num_new_tokens) pairs.

        The outputs of a sequence are meaningful only if its chunk reaches its last token.
        `needs_history`: some sequence uses a repetition/presence/frequency penalty, so the step
        needs every sequence's token ids.
        """
        num_seqs = len(scheduled)
        num_tokens = sum(n for _, n in scheduled)
        batch = self._empty_batch(*self.padded_shape(num_tokens, num_seqs))
        token_ids, positions, meta, sampling, history, num_prompt = batch
        start = 0
        for i, (seq, num_new) in enumerate(scheduled):
            first = seq.num_computed_tokens
            end = start + num_new
            token_ids[start:end] = seq.token_ids(first, first + num_new)
            pos = np.arange(first, first + num_new, dtype=np.int32)
            positions[start:end] = pos
            table = np.asarray(seq.block_table, np.int32)
            meta.slot_mapping[start:end] = table[pos // self.page_size] * self.page_size + pos % self.page_size
            meta.query_start_loc[i] = start
            meta.seq_lens[i] = first + num_new
            meta.block_tables[i, :len(table)] = table
            meta.logits_indices[i] = end - 1
            p = seq.params
            for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
                getattr(sampling, name)[i] = getattr(p, name)
            sampling.top_k[i] = min(p.top_k, 2**31 - 1)  # a top_k past the vocabulary keeps everything
            sampling.seeds[i], sampling.counters[i] = seq.seed, len(seq.output_ids)
            sampling.num_top_logprobs[i] = -1 if p.logprobs is None else p.logprobs
            if needs_history:
                ids = seq.token_ids(0, first + num_new)
                history[i, :len(ids)] = ids
                num_prompt[i] = len(seq.prompt_ids)
            start = end
        meta.query_start_loc[num_seqs:] = num_tokens  # padding sequences own no rows
        out = self._run(*batch)
        if self._step._cache_size() > self._known_programs:
            self._known_programs = self._step._cache_size()
            if self.warmed_up:
                self.num_compilations += 1
                shape = (len(token_ids), len(meta.seq_lens))
                if self.config.strict_compile:
                    raise CompilationDuringServingError(f"step shape {shape} was compiled during serving")
                logger.warning("compiled a step program during serving for shape %s", shape)
        return StepOutput(*(x[:num_seqs] for x in out))

    def _run(self, token_ids, positions, meta, sampling, history, num_prompt):
        out, self.k_cache, self.v_cache = self._step(self.state, self.k_cache, self.v_cache, token_ids, positions,
                                                     meta, sampling, history, num_prompt)
        return tuple(np.asarray(x) for x in out)

    def _empty_batch(self, num_tokens: int, num_seqs: int):
        """An all-padding batch of the given bucket: padding rows write nowhere and attend to nothing."""
        meta = AttentionMetadata(
            slot_mapping=np.full(num_tokens, -1, np.int32),
            query_start_loc=np.zeros(num_seqs + 1, np.int32),
            seq_lens=np.zeros(num_seqs, np.int32),
            block_tables=np.zeros((num_seqs, self.max_pages_per_seq), np.int32),
            logits_indices=np.zeros(num_seqs, np.int32))
        f32 = lambda v: np.full(num_seqs, v, np.float32)  # noqa: E731
        i32 = lambda v: np.full(num_seqs, v, np.int32)  # noqa: E731
        sampling = SamplingArrays(temperature=f32(0), top_k=i32(0), top_p=f32(1), min_p=f32(0),
                                  presence_penalty=f32(0), frequency_penalty=f32(0), repetition_penalty=f32(1),
                                  seeds=i32(0), counters=i32(0), num_top_logprobs=i32(-1))
        history = np.full((num_seqs, self.config.max_model_len), -1, np.int32)
        return (np.zeros(num_tokens, np.int32), np.zeros(num_tokens, np.int32), meta, sampling, history,
                np.zeros(num_seqs, np.int32))
