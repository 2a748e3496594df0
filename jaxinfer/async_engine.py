"""AsyncLLMEngine: one background thread drives the LLMEngine; asyncio code submits and streams.

The LLMEngine is not thread-safe, so only the loop thread calls it. Other threads hand it work
through a lock-protected inbox (adds and aborts) that the loop thread drains before each step; it
sleeps on a condition variable when there is nothing to do. Each request's outputs go back to the
asyncio event loop that submitted it, into an asyncio.Queue, through `call_soon_threadsafe`. They
cross as deltas made on the loop thread (`LLMEngine.step(deltas_only=True)`: new text, tokens and
logprobs, each in its own list), so a slow reader's queue grows with the output, not with its square,
and the reader never sees a list the engine is still appending to; the stream adds them up on the
reader's side into the cumulative RequestOutputs that `LLMEngine.step()` gives.

Admission is decided at submission, on the caller's thread, from the loop thread's stats snapshot:
a request is refused at once (QueueFullError) when `max_waiting` sequences already wait, or
(QueueWaitError) when its expected wait for a first token passes `max_queue_wait` seconds, estimated
from the prefill tokens queued ahead of it and the prefill rate the loop thread measures
(jaxinfer/admission.py). `num_rejected` counts the refusals by reason.

A bad request (a ValueError from `add_request`) is reported to its caller and the loop goes on. An
error in `step()` is fatal: every request in flight fails with `EngineDeadError`, `healthy` turns
False, the thread stops, and `on_failure` (the server's exit) is called. `fail(error)` is the same
from another thread (a lost process of a multi-host group, `jaxinfer/distributed.py`).
"""

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from jaxinfer import admission
from jaxinfer.admission import PrefillRate
from jaxinfer.engine import CompletionOutput, LLMEngine, RequestOutput
from jaxinfer.sampling import SamplingParams

logger = logging.getLogger("jaxinfer")

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_QUEUE_WAIT_S = 30.0


class EngineDeadError(RuntimeError):
    """The engine loop failed or was shut down; no request can run."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting for a slot; the caller should retry in `retry_after_s` seconds."""

    retry_after_s = 1


class QueueWaitError(QueueFullError):
    """The request's expected wait for its first token is longer than `max_queue_wait`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotAcceptingError(RuntimeError):
    """The engine is draining for shutdown and admits no new request."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's state, replaced whole by the loop thread (so readers never see it torn)."""

    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences queued for a slot
    num_pages: int = 0
    num_free_pages: int = 0
    num_preemptions: int = 0
    prefix_cache_hits: int = 0  # tokens
    prefix_cache_queries: int = 0  # tokens
    num_compilations: int = 0  # step programs compiled after warm-up
    num_draft_tokens: int = 0  # speculative decoding: draft tokens verified
    num_accepted_draft_tokens: int = 0  # and accepted
    num_requests: int = 0  # requests in flight (accepted, not finished)
    num_queued_tokens: int = 0  # prefill tokens a request submitted now waits behind (Scheduler.num_queued_tokens)
    prefill_tokens_per_s: float = admission.PRIOR_TOKENS_PER_S  # the loop thread's PrefillRate

    @property
    def queue_wait(self) -> float:
        """Seconds a request submitted now would wait for its prompt to start, by the admission estimate."""
        return admission.expected_wait(self.num_queued_tokens, 0, self.prefill_tokens_per_s)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages if self.num_pages else 0.0


# What a stream's queue carries besides RequestOutputs and exceptions.
_ACCEPTED = object()  # the engine took the request
_ENDED = object()  # the request was aborted: the stream ends without a finished output


class RequestStream:
    """The outputs of one request, in order; iterate it in the event loop that created it."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.finished = False
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()  # delta-only RequestOutputs, sentinels, exceptions
        self._so_far: dict[int, CompletionOutput] = {}  # the last output given out, per sequence index
        self._prompt_logprobs = None  # RequestOutput.prompt_logprobs, once an output has carried them

    def put(self, item) -> None:
        """From any thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _ENDED:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        item.outputs = [self._add_up(delta) for delta in item.outputs]
        if item.prompt_logprobs is not None:  # in the first output that has them only: kept for the rest
            self._prompt_logprobs = item.prompt_logprobs
        item.prompt_logprobs = self._prompt_logprobs
        return item

    def _add_up(self, delta: CompletionOutput) -> CompletionOutput:
        """The cumulative output: the previous one's text, tokens and logprobs, then the delta's."""
        previous = self._so_far.get(delta.index) or CompletionOutput(delta.index, "", [], None, logprobs=[])
        output = CompletionOutput(
            delta.index, previous.text + delta.delta, previous.token_ids + delta.delta_token_ids,
            delta.finish_reason, delta.delta, delta.delta_token_ids,
            None if delta.delta_logprobs is None else previous.logprobs + delta.delta_logprobs, delta.delta_logprobs)
        self._so_far[delta.index] = output
        return output


@dataclass(slots=True)
class _Tracked:
    """What the loop thread keeps per request: its stream and its token timing."""

    stream: RequestStream
    arrival_time: float  # time.monotonic() when submitted
    last_token_time: float | None = None


@dataclass(slots=True)
class _Add:
    prompt: str | list[int]
    params: SamplingParams
    stream: RequestStream
    cache_salt: str | None = None
    num_prompt_tokens: int = 0  # admission.num_prompt_tokens(prompt)
    arrival_time: float = field(default_factory=time.monotonic)


class AsyncLLMEngine:
    """`max_queue_wait`: seconds of expected wait for a first token past which a request is refused
    (0 or None: no limit). `observer`, if given, is told of token timings from the loop thread:
    `first_token(ttft_s, num_prompt_tokens)`, `tokens(num_new_tokens, itl_s or None)`, `finished(e2e_s)`."""

    def __init__(self, engine: LLMEngine, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_queue_wait: float | None = DEFAULT_MAX_QUEUE_WAIT_S, observer=None,
                 on_failure: Callable[[BaseException], None] | None = None):
        if max_queue_wait is not None and max_queue_wait < 0:
            raise ValueError(f"max_queue_wait must be 0 or None (no limit) or positive, got {max_queue_wait}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_queue_wait = max_queue_wait
        # The loop thread's once started; until it has measured, a fraction of warm-up's peak (admission.py).
        self.prefill_rate = PrefillRate.prior(admission.prior_tokens_per_s(
            getattr(engine.runner, "peak_prefill_tokens_per_s", None)))
        self.num_rejected = {"queue_full": 0, "queue_wait": 0}  # refusals at submission, by reason
        self.observer = observer
        self.on_failure = on_failure
        self.error: BaseException | None = None
        self.accepting = True
        self.stats = EngineStats(prefill_tokens_per_s=self.prefill_rate.tokens_per_s)
        self._cond = threading.Condition()
        self._inbox: list[_Add | str] = []  # an _Add, or the id of a request to abort
        self._in_transit: list[_Add | str] = []  # taken from the inbox, not yet in the stats snapshot
        self._stop = False
        self._tracked: dict[str, _Tracked] = {}  # loop thread only
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)

    # -- any thread ---------------------------------------------------------------------------

    def start(self) -> "AsyncLLMEngine":
        self._update_stats()
        self._thread.start()
        return self

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def load(self) -> int:
        """Sequences running, waiting, or submitted and not yet in the stats snapshot (one just handled
        may count twice for a moment): what the data-parallel router balances."""
        with self._cond:
            pending = sum(item.params.n for item in self._inbox + self._in_transit if isinstance(item, _Add))
        stats = self.stats
        return stats.num_running + stats.num_waiting + pending

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None, cache_salt: str | None = None) -> RequestStream:
        """Submits a request and waits until the engine accepts it.

        Raises what `LLMEngine.add_request` raises (ValueError for a bad prompt), QueueFullError or
        its QueueWaitError, NotAcceptingError while shutting down, EngineDeadError once the loop has stopped.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, asyncio.get_running_loop())
        num_prompt_tokens = admission.num_prompt_tokens(prompt)
        with self._cond:
            if self.error is not None or self._stop:
                raise EngineDeadError(f"the engine is not running: {self.error or 'shut down'}")
            if not self.accepting:
                raise NotAcceptingError("the server is shutting down")
            # Submitted but not in the stats snapshot yet: one the loop thread has just handled may be
            # counted twice, none is missed.
            pending = [item for item in self._inbox + self._in_transit if isinstance(item, _Add)]
            stats = self.stats
            if stats.num_waiting + len(pending) >= self.max_waiting:
                self.num_rejected["queue_full"] += 1
                raise QueueFullError(f"{stats.num_waiting + len(pending)} sequences are waiting for a slot "
                                     f"(max_waiting={self.max_waiting})")
            ahead = stats.num_queued_tokens + sum(item.num_prompt_tokens for item in pending)
            wait = admission.expected_wait(ahead, num_prompt_tokens, stats.prefill_tokens_per_s)
            if admission.refuses(ahead, wait, self.max_queue_wait):
                self.num_rejected["queue_wait"] += 1
                raise QueueWaitError(f"the expected wait for a first token is {wait:.1f} s ({ahead} prompt tokens "
                                     f"queued ahead at {stats.prefill_tokens_per_s:.0f} tokens/s; max_queue_wait="
                                     f"{self.max_queue_wait:g} s)", admission.retry_after(wait, self.max_queue_wait))
            self._inbox.append(_Add(prompt, params, stream, cache_salt, num_prompt_tokens))
            self._cond.notify()
        try:
            item = await stream._queue.get()
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        if item is not _ACCEPTED:
            raise item
        return stream

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; aborts it if the consumer stops early or is cancelled."""
        return generate_outputs(self, prompt, params, request_id)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(request_id)
            self._cond.notify()

    def fail(self, error: BaseException) -> None:
        """Fails the engine from outside the loop thread, as an error in `step()` would: unhealthy at
        once; the loop thread fails the requests and calls `on_failure` when it next wakes (at once
        when idle, after the step when busy)."""
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify()

    def wait_stopped(self, timeout: float) -> bool:
        """Whether the loop thread has stopped within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop_accepting(self) -> None:
        """Refuse new requests (NotAcceptingError); those in flight go on."""
        self.accepting = False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops admitting, lets requests in flight finish for up to `timeout` seconds, aborts the
        rest (their streams raise EngineDeadError) and stops the loop thread."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and self._has_requests() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _has_requests(self) -> bool:
        """Requests submitted or in flight. One the loop has accepted is in `_in_transit` until the
        stats that count it are published, so the lists are read first: none is missed."""
        with self._cond:
            submitted = any(isinstance(item, _Add) for item in self._inbox + self._in_transit)
        return submitted or self.stats.num_requests > 0

    # -- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            busy = False
            while True:
                with self._cond:
                    while not (self._inbox or self._stop or busy or self.error):
                        self._cond.wait()
                    if self.error is not None:  # `fail()` from another thread
                        raise self.error
                    inbox, self._inbox = self._inbox, []
                    self._in_transit = inbox
                    stop = self._stop
                started = time.monotonic()
                for item in inbox:
                    self._handle(item)
                if inbox:
                    self._update_stats()
                    with self._cond:
                        self._in_transit = []
                if stop:
                    break
                if self.engine.has_unfinished_requests():
                    queued, computed = self.stats.num_queued_tokens, self.engine.scheduler.num_prefill_tokens
                    self._deliver(self.engine.step(deltas_only=True))
                    if queued:  # the prefill rate: over time in which the queue had work (admission.py)
                        self.prefill_rate.observe(self.engine.scheduler.num_prefill_tokens - computed,
                                                  time.monotonic() - started)
                busy = self.engine.has_unfinished_requests()
                self._update_stats()
        except Exception as e:
            logger.exception("engine loop failed; failing %d requests", len(self._tracked))
            self.error = e
            self._fail_all(EngineDeadError(f"the engine failed: {e!r}"))
            if self.on_failure is not None:
                self.on_failure(e)
        else:
            self._fail_all(EngineDeadError("the engine shut down before this request finished"))

    def _handle(self, item: "_Add | str") -> None:
        if isinstance(item, str):
            tracked = self._tracked.pop(item, None)
            if tracked is not None:
                self.engine.abort_request(item)
                self._send(tracked.stream, _ENDED)
            return
        request_id = item.stream.request_id
        try:
            if request_id in self._tracked:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self.engine.add_request(item.prompt, item.params, request_id, cache_salt=item.cache_salt)
        except Exception as e:  # a bad request is its caller's problem, not the loop's
            self._send(item.stream, e)
            return
        self._tracked[request_id] = _Tracked(item.stream, item.arrival_time)
        if not self._send(item.stream, _ACCEPTED):
            self._tracked.pop(request_id)
            self.engine.abort_request(request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # aborted after this step was scheduled
            self._observe(tracked, output, now)
            if output.finished:
                del self._tracked[output.request_id]
            if not self._send(tracked.stream, output) and not output.finished:
                del self._tracked[output.request_id]
                self.engine.abort_request(output.request_id)

    def _observe(self, tracked: _Tracked, output: RequestOutput, now: float) -> None:
        if self.observer is None:
            return
        num_new = sum(len(c.delta_token_ids) for c in output.outputs)
        try:
            if num_new > 0:
                if tracked.last_token_time is None:
                    self.observer.first_token(now - tracked.arrival_time, len(output.prompt_token_ids))
                    self.observer.tokens(num_new, None)
                else:
                    self.observer.tokens(num_new, now - tracked.last_token_time)
                tracked.last_token_time = now
            if output.finished:
                self.observer.finished(now - tracked.arrival_time)
        except Exception:
            logger.exception("metrics observer failed")

    def _send(self, stream: RequestStream, item) -> bool:
        try:
            stream.put(item)
            return True
        except RuntimeError:  # the consumer's event loop is closed
            return False

    def _fail_all(self, error: Exception) -> None:
        for request_id, tracked in list(self._tracked.items()):
            self._send(tracked.stream, error)
            try:
                self.engine.abort_request(request_id)
            except Exception:
                pass
        self._tracked.clear()
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, _Add):
                self._send(item.stream, error)
        self._update_stats()

    def _update_stats(self) -> None:
        engine = self.engine
        scheduler, allocator = engine.scheduler, engine.allocator
        self.stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_pages=allocator.num_pages,
            num_free_pages=allocator.num_free_pages,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_hits=getattr(allocator, "prefix_cache_hits", 0),
            prefix_cache_queries=getattr(allocator, "prefix_cache_queries", 0),
            num_compilations=getattr(engine.runner, "num_compilations", 0),
            num_draft_tokens=getattr(engine, "num_draft_tokens", 0),
            num_accepted_draft_tokens=getattr(engine, "num_accepted_draft_tokens", 0),
            num_requests=len(self._tracked),
            num_queued_tokens=scheduler.num_queued_tokens(),
            prefill_tokens_per_s=self.prefill_rate.tokens_per_s,
        )


async def generate_outputs(engine, prompt: str | list[int], params: SamplingParams,
                           request_id: str | None = None) -> AsyncIterator[RequestOutput]:
    """`engine.add_request`'s outputs as they come, the request aborted if the consumer stops early
    or is cancelled: `generate` of an AsyncLLMEngine and of the data-parallel router."""
    stream = await engine.add_request(prompt, params, request_id)
    try:
        async for output in stream:
            yield output
    finally:
        if not stream.finished:
            engine.abort(stream.request_id)
