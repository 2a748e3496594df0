"""LLMEngine: add_request / step / abort_request (the offline `LLM` API on top of it: jaxinfer.offline)."""

import itertools
import logging
import random
import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import distributed, tensor_parallel
from jaxinfer.allocator import PageAllocator
from jaxinfer.config import EngineConfig
from jaxinfer.draft_model import DraftModel, draftable
from jaxinfer.kv_cache import free_device_memory, kv_cache_bytes_per_page
from jaxinfer.loading import LoadedModel, load_weights, resolve_kv_cache_dtype
from jaxinfer.models.llama import PROJECTIONS
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput, find_stop, stop_prefix_start
from jaxinfer.quant import Linear
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingParams, TokenLogprob
from jaxinfer.scheduler import Scheduler
from jaxinfer.sequence import Sequence
from jaxinfer.speculative import propose_ngram
from jaxinfer.structured_outputs import GrammarCompiler
from jaxinfer.tokenizer import IncrementalDetokenizer
from jaxinfer.weights import DEFAULT_MODEL

logger = logging.getLogger("jaxinfer")


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    texts: list[str]  # detokenized output so far, per sequence
    emitted: list[int]  # characters of each text already handed out, per sequence
    emitted_tokens: list[int]  # tokens (and their logprobs) already handed out, per sequence
    logprobs: list[list[TokenLogprob]]  # per sequence, one per output token
    metrics: RequestMetrics
    stop_token_ids: frozenset[int]  # the params' and, unless ignore_eos, the model's EOS tokens
    # prompt_logprobs: None for the first token, then one per prompt token as the chunks give them
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False  # handed out in a delta-only output


class LLMEngine:
    def __init__(self, model: str = DEFAULT_MODEL, config: EngineConfig | None = None, *, devices=None,
                 loaded: LoadedModel | None = None, **overrides):
        """`devices`: the local devices this engine runs on (tensor_parallel_size of them); None: the
        first ones. A data-parallel server builds one engine per replica, each with its devices and
        the same `loaded` model (`jaxinfer.data_parallel.build_replicas`)."""
        self.config = config = (config or EngineConfig()).replace(**overrides)
        if config.data_parallel_size > 1 and devices is None:
            raise ValueError(f"data_parallel_size {config.data_parallel_size}: an LLMEngine is one replica; the "
                             f"server runs several (jaxinfer serve --data-parallel-size, jaxinfer.data_parallel)")
        start = time.perf_counter()
        self.devices = devices
        # Several processes (jax.distributed): the same model and flags on each, the mesh over all of them.
        distributed.check_same("model and engine config", f"{model!r} {config!r}")
        mesh = None  # tensor parallelism: checked before any weight is read
        if config.tensor_parallel_size > 1 or jax.process_count() > 1:
            mesh = tensor_parallel.make_mesh(config.tensor_parallel_size, devices)
        shared = loaded is not None  # read once for several replicas: this engine only places it
        loaded = loaded or load_weights(model, config)
        self.model_config, self.tokenizer, self.dtype = loaded.model_config, loaded.tokenizer, loaded.dtype
        self.quantization, self.lm_head_quantization = loaded.quantization, loaded.lm_head_quantization
        self.model, self.weight_bytes_by_format, self._staged = loaded.model, loaded.weight_bytes_by_format, loaded.staged
        self.sampling_defaults = loaded.sampling_defaults  # the model's own, for what a request leaves out
        platform = jax.devices()[0].platform
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.quantization, platform)
        self.speculative = config.speculative_config  # jaxinfer.speculative; None: off
        draft = self._load_draft(mesh) if self.speculative and self.speculative.method == "draft_model" else None
        draft_kv_dtype = draft and resolve_kv_cache_dtype(config.kv_cache_dtype, draft.dtype, draft.quantization,
                                                          platform)
        draft_page_bytes = draft and kv_cache_bytes_per_page(draft.model_config, config.page_size, draft_kv_dtype)
        # free memory differs by host
        num_pages = int(distributed.agree("num_pages", str(self._num_pages(draft_page_bytes or 0))))
        self.runner = ModelRunner(self.model, config, num_pages, self.kv_cache_dtype, mesh=mesh,
                                  native_layouts=loaded.native_layouts, device=devices[0] if devices else None)
        # A draft model's cache has the target's pages, addressed by the same block tables.
        self.drafter = draft and DraftModel(draft, config, num_pages, draft_kv_dtype, devices[0] if devices else None)
        if mesh is not None:
            logger.info("tensor parallelism over %d %s devices: heads, KV cache and MLP split, embedding and LM "
                        "head %s", config.tensor_parallel_size, platform,
                        "split by vocabulary entry" if self.runner.vocab_parallel else "replicated")
        self.allocator = PageAllocator(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.allocator)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self.num_draft_tokens = self.num_accepted_draft_tokens = 0  # verified so far, and accepted
        if self.speculative is not None:
            logger.info("speculative decoding: %s", self.speculative.describe())
        self.requests: dict[str, _Request] = {}
        self._request_of: dict[Sequence, _Request] = {}
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(self.runner.state))
        self.weight_bytes = weight_bytes
        self.kv_cache_bytes = num_pages * kv_cache_bytes_per_page(self._cache_config(), config.page_size,
                                                                  self.kv_cache_dtype)
        # One line for the weights, one for the KV cache: the per-tensor detail is at DEBUG.
        formats = {getattr(self.model.layers, name).fmt.name if getattr(self.model.layers, name).fmt
                   else jnp.dtype(self.dtype).name for name in PROJECTIONS}
        head = self.model.lm_head.fmt.name if isinstance(self.model.lm_head, Linear) else jnp.dtype(self.dtype).name
        logger.info("weights: %.1f MB on %s, %s in %.1f s; projections %s (quantization %s), LM head %s (%s); "
                    "by format: %s", weight_bytes / 1e6, platform, "placed" if shared else "loaded",
                    time.perf_counter() - start,
                    "/".join(sorted(formats)), self.quantization, head, self.lm_head_quantization, ", ".join(
                        f"{name} {nbytes / 1e6:.1f} MB" for name, nbytes in self.weight_bytes_by_format.items()))
        logger.info("KV cache: %d pages x %d tokens = %d tokens, %.1f MB %s; prefix caching %s", num_pages,
                    config.page_size, num_pages * config.page_size, self.kv_cache_bytes / 1e6,
                    self.kv_cache_dtype.name, "on" if config.enable_prefix_caching else "off")
        if config.warmup and self.runner.leader:  # other processes run process 0's warm-up steps as it sends them
            self.runner.warmup()
            if self.drafter:
                self.drafter.runner.warmup()

    def _load_draft(self, mesh) -> LoadedModel:
        """The draft model of speculative decoding, checked against the target's vocabulary."""
        spec = self.speculative
        if mesh is not None:
            raise ValueError("a speculative draft model runs on one device in one process (tensor_parallel_size 1)")
        try:
            draft = load_weights(spec.model, self.config)
        except (ValueError, FileNotFoundError) as e:  # not found; max_model_len past its context length
            raise type(e)(f"speculative_config model {spec.model!r}: {e}") from e
        probe = "def f(x):\n    return x + 1  # Hello, world!"
        if (draft.model_config.vocab_size != self.model_config.vocab_size
                or draft.tokenizer.encode(probe) != self.tokenizer.encode(probe)):
            raise ValueError(f"speculative_config model {spec.model!r} does not share the target's vocabulary "
                             f"({draft.model_config.vocab_size} tokens vs {self.model_config.vocab_size}, or another "
                             f"tokenizer): a draft model must tokenize as the target does")
        logger.info("draft model %s: %.1f MB (%s)", spec.model, sum(draft.weight_bytes_by_format.values()) / 1e6,
                    draft.quantization)
        return draft

    def _cache_config(self):
        """The model as the KV cache holds it, over all devices: KV heads replicated under tensor
        parallelism count once per device that holds one."""
        mc = self.model_config
        return replace(mc, num_kv_heads=tensor_parallel.cache_kv_heads(mc, self.config.tensor_parallel_size))

    def _num_pages(self, draft_page_bytes: int = 0) -> int:
        """`draft_page_bytes`: a draft model's K/V bytes per page, which every page has too."""
        config = self.config
        pages_per_seq = -(-config.max_model_len // config.page_size)
        if config.num_pages is not None:
            num_pages = config.num_pages
        else:
            on_cpu = jax.devices()[0].platform == "cpu"
            fraction = config.kv_cache_memory_fraction or (0.5 if on_cpu else 0.9)
            budget = int(fraction * free_device_memory(self.devices[0] if self.devices else None))
            if self._staged:  # the weights are still in host memory:
                # take off one device's share of them (about; replicated norms are small)
                budget -= sum(self.weight_bytes_by_format.values()) // config.tensor_parallel_size
            # A page's bytes on one device: its share of the KV heads (host devices share one RAM).
            devices = 1 if on_cpu else config.tensor_parallel_size
            page_bytes = kv_cache_bytes_per_page(self._cache_config(), config.page_size,
                                                 self.kv_cache_dtype) + draft_page_bytes
            num_pages = budget // (page_bytes // devices)
            if on_cpu:  # host RAM is everyone's: take no more than the sequences can use
                num_pages = min(num_pages, pages_per_seq * config.max_num_seqs)
        if num_pages < pages_per_seq:
            raise ValueError(f"the KV cache ({num_pages} pages) cannot hold one sequence of max_model_len="
                             f"{config.max_model_len} ({pages_per_seq} pages of {config.page_size} tokens): "
                             f"lower max_model_len or give the cache more memory")
        return num_pages

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """`cache_salt` (vLLM's): only requests with the same salt share prefix-cache pages. A
        constraint that does not compile is a StructuredOutputsError (a ValueError) before anything
        is queued."""
        params = params or SamplingParams()
        if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt and _is_unicode(cache_salt)):
            raise ValueError("cache_salt must be a non-empty string of Unicode text (no lone surrogates)")
        if request_id is None:
            request_id = str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, prompt_ids = None, list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt_ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size})")
        max_len = self.config.max_model_len
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= max_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {max_len}")
        if params.logit_bias and max(params.logit_bias) >= self.model_config.vocab_size:
            raise ValueError(f"logit_bias token ids must be in [0, {self.model_config.vocab_size})")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({max_len})")
        constraint = params.structured_outputs
        matchers = [self.grammars.matcher(constraint) for _ in range(params.n)] if constraint else [None] * params.n
        seqs = []
        for i in range(params.n):
            # The device draws from int32 seeds: any Python int maps onto one.
            seed = (params.seed + i) % 2**31 if params.seed is not None else self._rng.randrange(2**31)
            seq = Sequence(f"{request_id}-{i}", prompt_ids, params, seed=seed, cache_salt=cache_salt,
                           matcher=matchers[i])
            if i > 0 and self.config.enable_prefix_caching:
                seq.wait_for = seqs[0]  # share the first sequence's prompt pages through the prefix cache
            seqs.append(seq)
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens) for _ in seqs]
        n = len(seqs)
        self.requests[request_id] = _Request(request_id, text, prompt_ids, params, seqs, detoks, [""] * n, [0] * n,
                                             [0] * n, [[] for _ in seqs],
                                             RequestMetrics(seqs[0].arrival_time, num_prompt_tokens=len(prompt_ids)),
                                             frozenset(params.stop_token_ids).union(
                                                 () if params.ignore_eos else self.tokenizer.eos_token_ids))
        if params.prompt_logprobs is not None:  # the first sequence computes them (its siblings share its pages)
            self.requests[request_id].prompt_logprobs = [None]
            seqs[0].next_scored = 1
        for seq in seqs:
            self._request_of[seq] = self.requests[request_id]
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            del self._request_of[seq]
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self, deltas_only: bool = False) -> list[RequestOutput]:
        """Runs one step; returns the requests that made progress: all their output so far and what is
        new. `deltas_only`: only what is new (the cumulative fields None, `metrics` only once finished),
        so that no output repeats an earlier one's text, tokens or logprobs."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        needs_history = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1
                            for p in (seq.params for seq, _ in scheduled))
        scores = {seq: rows for seq, num_new in scheduled if seq.scoring and (rows := seq.score_rows(num_new))[1]}
        num_score_rows = sum(count for _, count in scores.values())
        drafts = self._drafts(scheduled, num_score_rows) if self.speculative is not None else {}
        if drafts:  # each drafted decode row also computes its draft's positions
            scheduled = [(seq, num_new + len(drafts.get(seq, ()))) for seq, num_new in scheduled]
        out = self.runner.execute(scheduled, needs_history, self._token_bitmask(scheduled), drafts, scores)
        now = time.monotonic()
        touched = {}
        next_draft_row = len(scheduled)
        next_score_row = next_draft_row + sum(len(d) for d in drafts.values())
        for seq, (first, count) in scores.items():  # rows in entry order, after the draft rows
            self._record_prompt_logprobs(seq, out, range(next_score_row, next_score_row + count), first)
            next_score_row += count
        for i, (seq, num_new) in enumerate(scheduled):
            draft = drafts.get(seq)
            if draft:  # rows: the draft's positions', then the entry's own (after the draft's last token)
                rows = [*range(next_draft_row, next_draft_row + len(draft)), i]
                next_draft_row += len(draft)
                accepted = 1  # the model's token after the last token, then each that the draft guessed
                while accepted < len(rows) and int(out.tokens[rows[accepted - 1]]) == draft[accepted - 1]:
                    accepted += 1
                rows = rows[:accepted]
                self.num_draft_tokens += len(draft)
                self.num_accepted_draft_tokens += accepted - 1
                seq.num_computed_tokens += accepted  # the cache holds the accepted tokens' positions
                new_ids = seq.token_ids() + [int(out.tokens[r]) for r in rows]
            else:
                rows = [i]
                seq.num_computed_tokens += num_new
                new_ids = None
            if self.config.enable_prefix_caching and seq.num_computed_tokens // self.config.page_size > len(
                    seq.page_hashes):  # a page just filled up: hash it (and only then build the token list)
                self.allocator.register_full_pages(seq.block_table, seq.page_hashes, new_ids or seq.token_ids(),
                                                   seq.num_computed_tokens, seq.cache_salt)
            if not draft and seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk short of the prompt's end: nothing sampled yet
            request = self._request_of[seq]
            for row in rows:
                self._append_token(request, seq, out, row, now)
                if seq.finished:
                    break
            touched[request.request_id] = request
        return [self._output(request, deltas_only) for request in touched.values()]

    def _append_token(self, request: _Request, seq: Sequence, out, row: int, now: float) -> None:
        """The token sampled in `row` of the step's output becomes the sequence's next one."""
        token = int(out.tokens[row])
        seq.output_ids.append(token)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # An llguidance fault (seen with regexes of unassigned code points): its error text
            # carries its whole state, so log the first line; the mask allows only EOS from here.
            logger.error("%s: the grammar refused its own sampled token %d: %s", seq.request_id, token,
                         seq.matcher.get_error().partition("\n")[0])
        if seq.params.logprobs is not None:
            k = seq.params.logprobs
            top = list(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()))
            request.logprobs[request.seqs.index(seq)].append(TokenLogprob(token, float(out.logprobs[row]), top))
        metrics = request.metrics
        if len(seq.output_ids) > 1:
            metrics.inter_token_latencies.append(now - seq.last_token_time)
        seq.last_token_time = now
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        self._update_text(request, seq)

    def _record_prompt_logprobs(self, seq: Sequence, out, rows: range, first: int) -> None:
        """Prompt tokens first .. first + len(rows) - 1's logprobs, ranks and top alternatives."""
        k = seq.params.prompt_logprobs
        logprobs = self._request_of[seq].prompt_logprobs
        for row, j in zip(rows, range(first, first + len(rows))):
            top = list(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()))
            logprobs.append(TokenLogprob(seq.prompt_ids[j], float(out.logprobs[row]), top, int(out.ranks[row])))
        seq.next_scored = first + len(rows)

    def _drafts(self, scheduled: list[tuple[Sequence, int]], num_score_rows: int = 0) -> dict[Sequence, list[int]]:
        """Drafts (n-gram lookups, `jaxinfer.speculative`, or the draft model's) for the step's draftable
        decode rows, within the step's token budget and logits rows (max_num_seqs, less
        `num_score_rows` of prompt logprobs), max_model_len, max_tokens and the free pages. A draft
        model runs every step: it computes the prompt chunks too."""
        spec, config = self.speculative, self.config
        num_tokens, num_rows = sum(n for _, n in scheduled), len(scheduled) + num_score_rows
        drafts, rooms = {}, {}
        for seq, num_new in scheduled:
            p = seq.params
            if num_new != 1 or not seq.output_ids or seq.num_computed_tokens != seq.num_tokens - 1 or not draftable(seq):
                continue
            room = min(spec.num_speculative_tokens, config.max_num_batched_tokens - num_tokens,
                       config.max_num_seqs - num_rows, config.max_model_len - seq.num_tokens)
            if p.max_tokens is not None:  # a draft past max_tokens could not be used
                room = min(room, p.max_tokens - len(seq.output_ids) - 1)
            if room <= 0:
                continue
            if self.drafter:  # the draft model proposes as many as there is room for
                room = rooms[seq] = self.scheduler.reserve_draft(seq, room)
            else:
                draft = propose_ngram(seq.token_ids(), room, spec.prompt_lookup_min, spec.prompt_lookup_max)
                draft = draft[:self.scheduler.reserve_draft(seq, len(draft))] if draft else draft
                room = len(draft)
                if draft:
                    drafts[seq] = draft
            num_tokens += room
            num_rows += room
        return self.drafter.propose(scheduled, {s: r for s, r in rooms.items() if r}) if self.drafter else drafts

    def _token_bitmask(self, scheduled: list[tuple[Sequence, int]]):
        """The masks of the rows that sample this step under a constraint ([S, ceil(vocab / 32)] int32),
        or None when there is no such row (a prompt chunk short of its end samples nothing): a grammar's,
        and below min_tokens no stop token (unless a grammar allows nothing else: it ends the output)."""
        sampling = [(i, seq) for i, (seq, num_new) in enumerate(scheduled)
                    if seq.num_computed_tokens + num_new >= seq.num_tokens]
        grammar_rows = [(seq.matcher, i) for i, seq in sampling if seq.matcher is not None]
        held = [(i, seq) for i, seq in sampling if len(seq.output_ids) < seq.params.min_tokens]
        if not grammar_rows and not held:
            return None
        vocab = self.grammars.vocab_size
        if grammar_rows:
            bitmask = self.grammars.token_bitmask(grammar_rows, len(scheduled))
        else:
            bitmask = np.full((len(scheduled), -(-vocab // 32)), -1, np.int32)
        for i, seq in held:
            row = bitmask[i].view(np.uint32).copy()
            for token in self._request_of[seq].stop_token_ids:
                if token < vocab:
                    row[token >> 5] &= ~np.uint32(1 << (token & 31))
            if row.any():
                bitmask[i] = row.view(np.int32)
        return bitmask

    def _update_text(self, request: _Request, seq: Sequence) -> None:
        i = request.seqs.index(seq)
        params = seq.params
        token = seq.output_ids[-1]
        searched = len(request.texts[i])  # the text so far holds no stop string
        request.texts[i] += request.detokenizers[i].add([token])
        reason = None
        held = len(seq.output_ids) < params.min_tokens  # below min_tokens only a grammar or a length ends it
        if token in request.stop_token_ids and not held:
            reason = "stop"
        elif seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete (or broken)
            reason = "stop"
        elif params.stop and not held and (cut := find_stop(request.texts[i], params.stop, searched)) is not None:
            request.texts[i] = request.texts[i][:cut]
            reason = "stop"
        elif params.max_tokens is not None and len(seq.output_ids) >= params.max_tokens:
            reason = "length"
        elif seq.num_tokens >= self.config.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _output(self, request: _Request, deltas_only: bool) -> RequestOutput:
        outputs = []
        stops = request.params.stop
        for i, seq in enumerate(request.seqs):
            text = request.texts[i]
            # Hold back what could still turn out to be the start of a stop string.
            visible = len(text)
            if stops and not seq.finished:
                visible = max(request.emitted[i], stop_prefix_start(text, stops))
            start = request.emitted_tokens[i]  # the first token not handed out yet, and its logprob
            logprobs = request.logprobs[i] if request.params.logprobs is not None else None
            output = CompletionOutput(i, None, None, seq.finish_reason, delta=text[request.emitted[i]:visible],
                                      delta_token_ids=seq.output_ids[start:],
                                      delta_logprobs=None if logprobs is None else logprobs[start:])
            if not deltas_only:
                output.text, output.token_ids = text[:visible], list(seq.output_ids)
                output.logprobs = None if logprobs is None else list(logprobs)
            request.emitted[i], request.emitted_tokens[i] = visible, len(seq.output_ids)
            outputs.append(output)
        finished = all(seq.finished for seq in request.seqs)
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None and (len(prompt_logprobs) < len(request.prompt_ids)
                                            or (deltas_only and request.prompt_logprobs_sent)):
            prompt_logprobs = None  # not all computed yet (or handed out already)
        elif prompt_logprobs is not None:
            request.prompt_logprobs_sent = deltas_only
            prompt_logprobs = list(prompt_logprobs)
        metrics = request.metrics
        seqs = request.seqs
        metrics.first_scheduled_time = min((s.first_scheduled_time for s in seqs if s.first_scheduled_time),
                                           default=None)
        metrics.num_generation_tokens = sum(len(s.output_ids) for s in seqs)
        metrics.num_cached_tokens = seqs[0].num_cached_tokens
        metrics.num_preemptions = sum(s.num_preemptions for s in seqs)
        if finished:
            metrics.finished_time = time.monotonic()
            del self.requests[request.request_id]
            for seq in seqs:
                del self._request_of[seq]
        # The engine updates `metrics` until the request finishes: a delta-only output is for another
        # thread, so it gets them once they are final.
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outputs, finished,
                             metrics if finished or not deltas_only else None, prompt_logprobs)


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes to UTF-8 (a lone surrogate, e.g. from a JSON "\\ud800", does not)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
