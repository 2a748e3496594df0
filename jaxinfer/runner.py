"""Builds the padded ragged batch of a step and runs the step program on it.

The step program (`jit_step`) is the engine's whole forward: model, attention, projections and
sampling, with the KV cache donated so it is updated in place. Shapes are bounded by the buckets
of `jaxinfer.compilation`; `warmup()` builds every bucket's program before serving, and any
program built after that is counted (and raises in strict mode). The runner keeps each bucket's
compiled executable itself (`jit(...).lower(...).compile()`) and calls it directly: JAX's own
caches are bounded and process-wide, and a process holding many jitted functions (a notebook, a
long test run) can evict a warmed program from them, which would make serving trace it again.
`scripts/gpu_compile_check.py` compiles this same program for GPUs.

Across several processes (`jaxinfer/distributed.py`) process 0's runner sends each batch it runs,
warm-up included, before running it; every other process's runner `follow()`s: it receives the
batch and runs the same step.
"""

import dataclasses
import logging
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from jaxinfer import distributed, tensor_parallel
from jaxinfer.kv_cache import allocate_kv_cache
from jaxinfer.compilation import CompilationDuringServingError, TraceCounter, padded_step_shape, step_buckets
from jaxinfer.models.llama import AttentionMetadata
from jaxinfer.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingArrays, sample
from jaxinfer.sequence import Sequence

logger = logging.getLogger("jaxinfer")

__all__ = ["ModelRunner", "StepOutput", "CompilationDuringServingError", "jit_step", "empty_batch"]


class StepOutput(NamedTuple):
    """Per scheduled sequence: the sampled token, its logprob, and the top alternatives."""

    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_ids: np.ndarray  # [S, MAX_LOGPROBS] int32
    top_logprobs: np.ndarray  # [S, MAX_LOGPROBS] float32
    ranks: np.ndarray  # [S] int32: a prompt-scoring row's token's rank (prompt_logprobs), else 0


def jit_step(graphdef):
    """The engine's step program for a model of this graph: (state, k_cache, v_cache, token_ids,
    positions, meta, sampling, history, num_prompt, token_bitmask) -> ((tokens, logprobs, top_ids,
    top_logprobs, ranks), k_cache, v_cache), the caches donated. The grammar bitmask is an input of every
    step, all ones when nothing is constrained, so a constrained request needs no program of its own."""

    def engine_step(state, k_cache, v_cache, token_ids, positions, meta, sampling, history, num_prompt,
                    token_bitmask):
        model = nnx.merge(graphdef, state)
        logits, k_cache, v_cache = model(token_ids, positions, k_cache, v_cache, meta)
        return sample(logits, sampling, history, num_prompt, MAX_LOGPROBS, token_bitmask), k_cache, v_cache

    return jax.jit(engine_step, donate_argnums=(1, 2))


def empty_batch(num_tokens: int, num_seqs: int, max_pages_per_seq: int, max_model_len: int, vocab_size: int,
                history: bool = True, bitmask: bool = True, logit_bias: bool = True):
    """An all-padding batch of one bucket (numpy): (token_ids, positions, meta, sampling, history,
    num_prompt, token_bitmask). Padding rows write nowhere, attend to nothing, allow every token.
    `history` / `bitmask` / `logit_bias` False: those (the biggest: [S, max_model_len], [S, vocab / 32],
    the sampling's two [S, MAX_LOGIT_BIAS]) are None, for a caller that has them all padding already
    (`ModelRunner`'s device constants)."""
    meta = AttentionMetadata(
        slot_mapping=np.full(num_tokens, -1, np.int32),
        query_start_loc=np.zeros(num_seqs + 1, np.int32),
        seq_lens=np.zeros(num_seqs, np.int32),
        block_tables=np.zeros((num_seqs, max_pages_per_seq), np.int32),
        logits_indices=np.zeros(num_seqs, np.int32))
    f32 = lambda v: np.full(num_seqs, v, np.float32)  # noqa: E731
    i32 = lambda v: np.full(num_seqs, v, np.int32)  # noqa: E731
    sampling = SamplingArrays(temperature=f32(0), top_k=i32(0), top_p=f32(1), min_p=f32(0),
                              presence_penalty=f32(0), frequency_penalty=f32(0), repetition_penalty=f32(1),
                              seeds=i32(0), counters=i32(0), num_top_logprobs=i32(-1),
                              logit_bias_ids=np.full((num_seqs, MAX_LOGIT_BIAS), -1, np.int32) if logit_bias else None,
                              logit_bias_values=np.zeros((num_seqs, MAX_LOGIT_BIAS), np.float32) if logit_bias else None,
                              scored=i32(-1))
    # [S, max_model_len] token ids, -1 padding; [S, ceil(vocab / 32)] allowed tokens, all
    history = np.full((num_seqs, max_model_len), -1, np.int32) if history else None
    token_bitmask = np.full((num_seqs, -(-vocab_size // 32)), -1, np.int32) if bitmask else None
    return (np.zeros(num_tokens, np.int32), np.zeros(num_tokens, np.int32), meta, sampling, history,
            np.zeros(num_seqs, np.int32), token_bitmask)


class ModelRunner:
    def __init__(self, model, engine_config, num_pages: int, dtype, mesh=None, native_layouts: bool = False,
                 device=None):
        """`mesh`: a `tensor_parallel.make_mesh` mesh to split the model over (None: one device,
        `device`, by default the first);
        `native_layouts`: then lay each device's quantized weights out for the native CPU kernels."""
        self.config = engine_config
        self.page_size = engine_config.page_size
        self.num_pages = num_pages
        # Every array the step sees is committed to the device, as its outputs are: an uncommitted
        # input (fresh zeros, weights from jnp.asarray) would make the step's first call, at warm-up,
        # a different program signature from the calls that follow it.
        self.vocab_parallel = False  # tensor parallelism: embedding and LM head split by vocabulary entry
        if mesh is None:
            self.graphdef, state = nnx.split(model)
            device = device or jax.devices()[0]
            self._device = device  # where the padding constants live (`_padding_constants`)
            self.state = jax.device_put(state, device)
            self.k_cache, self.v_cache = jax.device_put(
                allocate_kv_cache(model.config, num_pages, self.page_size, dtype, device), device)
            self._step = jit_step(self.graphdef)
        else:
            self.graphdef, self.state, specs, self.vocab_parallel = tensor_parallel.shard_model(
                model, mesh, native_layouts=native_layouts, integer=engine_config.cpu_integer_matmul)
            size = mesh.shape[tensor_parallel.AXIS]
            cache_config = dataclasses.replace(model.config,
                                               num_kv_heads=tensor_parallel.cache_kv_heads(model.config, size))
            cache_sharding = NamedSharding(mesh, tensor_parallel.CACHE_SPEC)
            if jax.process_count() == 1:  # made in place on its devices
                self.k_cache, self.v_cache = allocate_kv_cache(cache_config, num_pages, self.page_size, dtype,
                                                               cache_sharding)
            else:  # each process places its own devices' shards
                self.k_cache, self.v_cache = tensor_parallel.put(
                    allocate_kv_cache(cache_config, num_pages, self.page_size, dtype), (cache_sharding,) * 2)
            self._step = tensor_parallel.jit_step(self.graphdef, mesh, specs, self.vocab_parallel)
            self._device = None
        self.max_pages_per_seq = -(-engine_config.max_model_len // self.page_size)
        self.vocab_size = model.config.vocab_size
        self._padding = {}  # num_seqs -> (history, token_bitmask, logit bias ids, values) all padding, on the device
        self._programs = {}  # (num_tokens, num_seqs) -> the step's compiled executable
        self._traces = TraceCounter()
        # Several processes: process 0 sends every batch it runs; the others follow.
        self.channel = distributed.StepChannel() if jax.process_count() > 1 else None
        self.leader = jax.process_index() == 0
        if self.channel is not None:
            self.channel.wait_ready()
        self.num_compilations = 0  # step programs built after warm-up
        self.warmed_up = False
        self.peak_prefill_tokens_per_s: float | None = None  # the largest bucket's, timed at warm-up

    # -- buckets ----------------------------------------------------------------------------------

    def buckets(self) -> list[tuple[int, int]]:
        """Every (tokens, sequences) shape a step can have (`compilation.step_buckets`). Block tables
        are always max_model_len wide: the attention loops over the pages a sequence has, so their
        width costs nothing."""
        return step_buckets(self.config.max_num_batched_tokens, self.config.max_num_seqs)

    def padded_shape(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        return padded_step_shape(num_tokens, num_seqs, self.config.max_num_seqs)

    # -- the step ---------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compiles (or loads from the persistent cache) the program of every bucket."""
        shapes = self.buckets()
        start = time.perf_counter()
        # A line where it starts (a large model's warm-up takes minutes) and one where it ends; between
        # them a bar on a terminal (disable=None), nothing in a log file or a pipe.
        logger.info("warm-up: compiling %d step programs%s", len(shapes),
                    " (or loading them from the compilation cache)" if jax.config.jax_compilation_cache_dir else "")
        for shape in tqdm(shapes, desc="Compiling", unit="program", leave=False, disable=None):
            self._run(*self._empty_batch(*shape))
        self.warmed_up = True
        elapsed = time.perf_counter() - start
        # The largest bucket once more, compiled and warm: where admission's estimate of the prefill
        # rate starts (jaxinfer/admission.py) until the engine has measured its own.
        num_tokens, num_seqs = max(shapes)
        step_start = time.perf_counter()
        self._run(*self._empty_batch(num_tokens, num_seqs))
        step_s = time.perf_counter() - step_start
        self.peak_prefill_tokens_per_s = num_tokens / step_s
        cache = jax.config.jax_compilation_cache_dir
        logger.info("compiled %d step programs in %.1f s, (tokens, sequences) = %s%s; a step of %d tokens takes "
                    "%.0f ms", len(shapes), elapsed, shapes, f"; compilation cache {cache}" if cache else "",
                    num_tokens, step_s * 1e3)

    def execute(self, scheduled: list[tuple[Sequence, int]], needs_history: bool = False,
                token_bitmask: np.ndarray | None = None, drafts: dict | None = None,
                scores: dict | None = None) -> StepOutput:
        """Runs one step over the scheduled (sequence, num_new_tokens) pairs.

        The outputs of a sequence are meaningful only if its chunk reaches its last token.
        `needs_history`: some sequence uses a repetition/presence/frequency penalty, so the step
        needs every sequence's token ids. `token_bitmask`: [len(scheduled), ceil(vocab / 32)] int32,
        the tokens each row may sample (structured outputs); None: any.
        `drafts`: {sequence: draft token ids} (`jaxinfer.speculative`): such a sequence's num_new
        counts its last token and its draft, and the logits at every one of those positions are
        sampled. Row i is entry i's last position, as always; the draft positions get extra rows
        after the entries, in entry order (a zero-token sequence each, like a padding row).
        `scores`: {sequence: (first, count)} (prompt_logprobs): rows that report the logprobs of prompt
        tokens first .. first + count - 1 of the sequence's chunk, each from the logits of the position
        before it. They follow the draft rows, in entry order.
        """
        drafts, scores = drafts or {}, scores or {}
        num_seqs = len(scheduled)
        num_rows = num_seqs + sum(len(d) for d in drafts.values()) + sum(n for _, n in scores.values())
        num_tokens = sum(n for _, n in scheduled)
        shape = self.padded_shape(num_tokens, num_rows)
        # Without penalties or grammars, history and masks are all padding: on one device the step
        # takes them from device constants (neither built nor copied each step).
        constants = self._device is not None
        biased = any(seq.params.logit_bias for seq, _ in scheduled)
        batch = list(self._empty_batch(*shape, history=needs_history or not constants,
                                       bitmask=token_bitmask is not None or not constants,
                                       logit_bias=biased or not constants))
        if batch[4] is None or batch[6] is None or batch[3].logit_bias_ids is None:
            history_constant, bitmask_constant, bias_ids, bias_values = self._padding_constants(*shape)
            batch[4] = history_constant if batch[4] is None else batch[4]
            batch[6] = bitmask_constant if batch[6] is None else batch[6]
            if batch[3].logit_bias_ids is None:
                batch[3] = batch[3]._replace(logit_bias_ids=bias_ids, logit_bias_values=bias_values)
        token_ids, positions, meta, sampling, history, num_prompt, padded_bitmask = batch
        if token_bitmask is not None:
            padded_bitmask[:num_seqs] = token_bitmask
        start, extra = 0, num_seqs
        score_rows = []  # (logits index, prompt token, top alternatives), rows after the draft rows
        for i, (seq, num_new) in enumerate(scheduled):
            first = seq.num_computed_tokens
            end = start + num_new
            draft = drafts.get(seq, ())
            token_ids[start:end] = seq.token_ids(first, first + num_new - len(draft)) + list(draft)
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
            if p.logit_bias:
                sampling.logit_bias_ids[i, :len(p.logit_bias)] = list(p.logit_bias)
                sampling.logit_bias_values[i, :len(p.logit_bias)] = list(p.logit_bias.values())
            if needs_history:
                ids = seq.token_ids(0, first + num_new)
                history[i, :len(ids)] = ids
                num_prompt[i] = len(seq.prompt_ids)
            if draft:  # rows without penalties, grammar or min_tokens: the sampling fields copied are enough
                rows = slice(extra, extra + len(draft))
                meta.logits_indices[rows] = np.arange(start, end - 1, dtype=np.int32)
                for field in sampling:
                    if isinstance(field, np.ndarray):  # not a device constant (no row has a logit bias)
                        field[rows] = field[i]
                # Each row draws with the key of the output index it samples, as decoding one token at
                # a time would: draft row j the output's next token + j, the entry's own row the one
                # after the draft. So a seeded sampled request draws what it draws without drafts.
                sampling.counters[rows] = len(seq.output_ids) + np.arange(len(draft), dtype=np.int32)
                sampling.counters[i] = len(seq.output_ids) + len(draft)
                extra += len(draft)
            if seq in scores:
                first, count = scores[seq]
                for j in range(first, first + count):  # token j's logits are position j - 1's
                    score_rows.append((start + j - 1 - seq.num_computed_tokens, seq.prompt_ids[j],
                                       seq.params.prompt_logprobs))
            start = end
        # Scoring rows sample nothing that is used: their other fields stay padding (greedy, no penalty).
        for row, (index, token, top) in enumerate(score_rows, extra):
            meta.logits_indices[row] = index
            sampling.scored[row] = token
            sampling.num_top_logprobs[row] = top
        meta.query_start_loc[num_seqs:] = num_tokens  # padding sequences (and draft rows) own no rows
        traces_before = self._traces.traces
        out = self._run(*batch)
        if self.warmed_up and self._traces.traces > traces_before:
            self.num_compilations += 1
            shape = (len(token_ids), len(meta.seq_lens))
            if self.config.strict_compile:
                raise CompilationDuringServingError(f"step shape {shape} was compiled during serving")
            logger.warning("compiled a step program during serving for shape %s", shape)
        return StepOutput(*(x[:num_rows] for x in out))

    def _run(self, token_ids, positions, meta, sampling, history, num_prompt, token_bitmask):
        if self._device is not None:  # committed like the padding constants: one program signature
            commit = lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, self._device)  # noqa: E731
            history, token_bitmask = commit(history), commit(token_bitmask)
            sampling = sampling._replace(logit_bias_ids=commit(sampling.logit_bias_ids),
                                         logit_bias_values=commit(sampling.logit_bias_values))
        send = self.channel is not None and self.leader
        if send:
            batch = (token_ids, positions, meta, sampling, history, num_prompt, token_bitmask)
            self.channel.send(len(token_ids), len(meta.seq_lens), jax.tree.leaves(batch))
        args = (self.state, self.k_cache, self.v_cache, token_ids, positions, meta, sampling, history, num_prompt,
                token_bitmask)
        with self._traces.watch():
            program = self._programs.get(shape := (len(token_ids), len(meta.seq_lens)))
            if program is None:  # traced here (and counted), then never again
                program = self._programs[shape] = self._step.lower(*args).compile()
            out, self.k_cache, self.v_cache = program(*args)
        out = tuple(np.asarray(x) for x in out)
        if send:
            self.channel.sent()
        return out

    def follow(self, watchdog) -> None:
        """A process other than 0: runs each step process 0 sends until it sends the shutdown.
        Raises `distributed.ProcessLostError` when a process is lost."""
        while (message := self.channel.receive(watchdog)) is not None:
            num_tokens, num_seqs, data = message
            batch = self._empty_batch(num_tokens, num_seqs)
            distributed.fill(jax.tree.leaves(batch), data)
            self._run(*batch)

    def close(self) -> None:
        """Process 0 of several: tells the others to stop following."""
        if self.channel is not None and self.leader:
            self.channel.send_shutdown()

    def _empty_batch(self, num_tokens: int, num_seqs: int, **which):
        return empty_batch(num_tokens, num_seqs, self.max_pages_per_seq, self.config.max_model_len, self.vocab_size,
                           **which)

    def _padding_constants(self, num_tokens: int, num_seqs: int):
        """An all-padding history, grammar mask and logit bias (ids, values) of this bucket, on the
        runner's device (made once)."""
        if num_seqs not in self._padding:
            _, _, _, sampling, history, _, bitmask = self._empty_batch(num_tokens, num_seqs)
            self._padding[num_seqs] = jax.device_put(
                (history, bitmask, sampling.logit_bias_ids, sampling.logit_bias_values), self._device)
        return self._padding[num_seqs]
