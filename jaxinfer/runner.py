"""Builds the padded ragged batch of a step and runs the jitted step function on it.

Token count, sequence count and block-table width are padded up to powers of two, so XLA compiles
a bounded set of programs. The KV cache is donated to the step and updated in place.
"""

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.cache import allocate_kv_cache
from jaxinfer.models.llama import AttentionMetadata
from jaxinfer.sampling import sample
from jaxinfer.sequence import Sequence

logger = logging.getLogger("jaxinfer")

MIN_TOKEN_BUCKET = 16


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


class ModelRunner:
    def __init__(self, model, engine_config, num_pages: int, dtype):
        self.config = engine_config
        self.model_config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.page_size = engine_config.page_size
        self.num_pages = num_pages
        self.k_cache, self.v_cache = allocate_kv_cache(model.config, num_pages, self.page_size, dtype)
        self.max_pages_per_seq = -(-engine_config.max_model_len // self.page_size)
        logger.info("persistent compilation cache: %s", enable_compilation_cache())
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2))
        self.compiled_shapes = set()

    def _step_fn(self, state, k_cache, v_cache, token_ids, positions, meta, sampling):
        model = nnx.merge(self.graphdef, state)
        logits, k_cache, v_cache = model(token_ids, positions, k_cache, v_cache, meta)
        return sample(logits, *sampling), k_cache, v_cache

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> np.ndarray:
        """Runs one step over the scheduled (sequence, num_new_tokens) pairs.

        Returns the sampled token of each scheduled sequence, [len(scheduled)] int32 (meaningful only
        for sequences whose chunk reaches their last token).
        """
        num_seqs = len(scheduled)
        num_tokens = sum(n for _, n in scheduled)
        padded_tokens = max(MIN_TOKEN_BUCKET, next_power_of_two(num_tokens))
        padded_seqs = next_power_of_two(num_seqs)
        max_pages = max(len(seq.block_table) for seq, _ in scheduled)
        padded_pages = min(next_power_of_two(max_pages), next_power_of_two(self.max_pages_per_seq))

        token_ids = np.zeros(padded_tokens, np.int32)
        positions = np.zeros(padded_tokens, np.int32)
        slot_mapping = np.full(padded_tokens, -1, np.int32)
        query_start_loc = np.full(padded_seqs + 1, num_tokens, np.int32)
        seq_lens = np.zeros(padded_seqs, np.int32)
        block_tables = np.zeros((padded_seqs, padded_pages), np.int32)
        logits_indices = np.zeros(padded_seqs, np.int32)
        temperature = np.zeros(padded_seqs, np.float32)
        top_k = np.zeros(padded_seqs, np.int32)
        top_p = np.ones(padded_seqs, np.float32)
        min_p = np.zeros(padded_seqs, np.float32)
        seeds = np.zeros(padded_seqs, np.int32)
        counters = np.zeros(padded_seqs, np.int32)

        start = 0
        for i, (seq, num_new) in enumerate(scheduled):
            first = seq.num_computed_tokens
            end = start + num_new
            token_ids[start:end] = seq.token_ids(first, first + num_new)
            pos = np.arange(first, first + num_new, dtype=np.int32)
            positions[start:end] = pos
            table = np.asarray(seq.block_table, np.int32)
            slot_mapping[start:end] = table[pos // self.page_size] * self.page_size + pos % self.page_size
            query_start_loc[i] = start
            seq_lens[i] = first + num_new
            block_tables[i, :len(table)] = table
            logits_indices[i] = end - 1
            p = seq.params
            temperature[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
            seeds[i], counters[i] = seq.seed, len(seq.output_ids)
            start = end

        meta = AttentionMetadata(slot_mapping, query_start_loc, seq_lens, block_tables, logits_indices)
        shape = (padded_tokens, padded_seqs, padded_pages)
        if shape not in self.compiled_shapes:
            logger.info("compiling step for %d tokens, %d sequences, %d pages per sequence", *shape)
            t0 = time.perf_counter()
        next_tokens, self.k_cache, self.v_cache = self._step(
            self.state, self.k_cache, self.v_cache, token_ids, positions, meta,
            (temperature, top_k, top_p, min_p, seeds, counters))
        next_tokens = np.asarray(next_tokens)
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            logger.info("compiled and ran in %.1f s", time.perf_counter() - t0)
        return next_tokens[:num_seqs]
