"""AsyncLLMEngine: one loop thread drives the engine; asyncio callers submit, stream, abort.

Checked against a stand-in engine (tests/fake_engine.py: one token per request per step), so the
threading, abort and failure behaviour is tested exactly and fast; tests/test_server.py runs the
real engine behind it.
"""

import asyncio
import threading
import time

import pytest
from fake_engine import FakeEngine
from helpers import wait_until

from jaxinfer import SamplingParams
from jaxinfer.async_engine import AsyncLLMEngine, EngineDeadError, NotAcceptingError, QueueFullError


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


@pytest.fixture
def fake():
    return FakeEngine()


@pytest.fixture
def engine(fake):
    engine = AsyncLLMEngine(fake).start()
    yield engine
    engine.shutdown(timeout=0)


async def collect(engine, prompt, max_tokens, request_id=None):
    return [out async for out in engine.generate(prompt, params(max_tokens), request_id)]


def test_generate_streams_every_step_until_finished(engine):
    outputs = asyncio.run(collect(engine, "hi", 5))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5]
    assert [o.finished for o in outputs] == [False] * 4 + [True]
    assert outputs[-1].outputs[0].finish_reason == "length"


def test_concurrent_requests_each_get_their_own_outputs(engine):
    async def main():
        return await asyncio.gather(*(collect(engine, "hi", n, f"r{n}") for n in (3, 7, 1)))

    results = asyncio.run(main())
    assert [[o.request_id for o in outs] for outs in results] == [["r3"] * 3, ["r7"] * 7, ["r1"]]
    assert [outs[-1].outputs[0].token_ids for outs in results] == [list(range(3)), list(range(7)), [0]]


def offline_outputs(prompt, params_, request_id):
    """The reference: a FakeEngine of its own stepped here, cumulative outputs as `LLMEngine.step()` gives."""
    fake = FakeEngine()
    fake.add_request(prompt, params_, request_id)
    outputs = []
    while fake.has_unfinished_requests():
        outputs += fake.step()
    return outputs


def test_a_stream_adds_the_deltas_up_to_the_engines_cumulative_outputs(engine):
    sampling = SamplingParams(n=3, max_tokens=6, logprobs=2)

    async def main():
        return [out async for out in engine.generate("hi", sampling, "r")]

    streamed = asyncio.run(main())
    expected = offline_outputs("hi", sampling, "r")
    assert [o.outputs for o in streamed] == [o.outputs for o in expected]
    assert [o.finished for o in streamed] == [o.finished for o in expected]


def test_the_queue_of_a_slow_reader_holds_deltas_not_snapshots(fake, engine):
    async def main():
        stream = await engine.add_request("hi", SamplingParams(n=2, max_tokens=40, logprobs=1), "slow")
        while stream._queue.qsize() < 40:  # the engine runs to the end while nobody reads
            await asyncio.sleep(0.01)
        return [stream._queue.get_nowait() for _ in range(40)]

    queued = asyncio.run(main())
    sequences = [c for item in queued for c in item.outputs]
    assert all(c.text is None and c.token_ids is None and c.logprobs is None for c in sequences)
    assert all(len(c.delta) == len(c.delta_token_ids) == len(c.delta_logprobs) == 1 for c in sequences)
    assert sum(len(c.delta_token_ids) for c in sequences) == 2 * 40  # each token crossed once


def test_only_the_loop_thread_calls_the_engine(fake, engine):
    async def main():
        await asyncio.gather(*(collect(engine, "hi", 4) for _ in range(5)))

    asyncio.run(main())
    assert fake.calling_threads == {engine._thread.ident}
    assert threading.get_ident() not in fake.calling_threads


def test_idle_loop_sleeps_instead_of_spinning(fake, engine):
    asyncio.run(collect(engine, "hi", 3))
    # The loop makes its last calls (has_unfinished_requests, stats) after it delivers the final
    # output, so the consumer can return before them: wait until the count holds for 50 ms (a
    # spinning loop never does, and fails below).
    calls, deadline = -1, time.monotonic() + 2
    while fake.num_calls != calls and time.monotonic() < deadline:
        calls = fake.num_calls
        time.sleep(0.05)
    time.sleep(0.3)
    assert fake.num_calls == calls


def test_bad_prompt_raises_value_error_to_the_caller_and_the_loop_goes_on(engine):
    with pytest.raises(ValueError, match="prompt is bad"):
        asyncio.run(collect(engine, "bad", 3))
    assert engine.healthy
    assert len(asyncio.run(collect(engine, "good", 2))) == 2


def test_duplicate_request_id_is_a_value_error(engine):
    async def main():
        stream = await engine.add_request("hi", params(1000), "same")
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("hi", params(3), "same")
        engine.abort(stream.request_id)

    asyncio.run(main())


def test_consumer_that_stops_early_aborts_its_request(fake, engine):
    async def main():
        async for out in engine.generate("hi", params(10_000), "early"):
            if len(out.outputs[0].token_ids) == 2:
                break

    asyncio.run(main())
    assert wait_until(lambda: fake.aborted == ["early"])
    assert wait_until(lambda: engine.stats.num_requests == 0)


def test_cancelled_consumer_aborts_its_request(fake, engine):
    async def main():
        task = asyncio.create_task(collect(engine, "hi", 10_000, "cancelled"))
        while not fake.requests:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert wait_until(lambda: fake.aborted == ["cancelled"])


def test_abort_ends_the_stream_without_a_finished_output(fake, engine):
    async def main():
        stream = await engine.add_request("hi", params(10_000), "r")
        outputs = []
        async for out in stream:
            outputs.append(out)
            if len(outputs) == 3:
                engine.abort("r")
        return outputs

    outputs = asyncio.run(main())
    assert len(outputs) >= 3 and not any(o.finished for o in outputs)
    assert fake.aborted == ["r"]


def test_step_failure_fails_requests_in_flight_and_marks_the_engine_unhealthy(fake):
    failures = []
    engine = AsyncLLMEngine(fake, on_failure=failures.append).start()

    async def main():
        stream = await engine.add_request("hi", params(10_000))
        await stream.__anext__()
        fake.fail_next_step = True
        with pytest.raises(EngineDeadError, match="the device fell over"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("hi", params(3))

    asyncio.run(main())
    assert not engine.healthy
    assert isinstance(engine.error, RuntimeError)
    # The loop thread fails the streams first, then calls on_failure: give it a moment.
    deadline = time.monotonic() + 10
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failures == [engine.error]


def test_queue_full_is_refused_at_submission():
    fake = FakeEngine()
    fake.scheduler.waiting.extend(["seq"] * 3)  # three sequences already wait for a slot
    engine = AsyncLLMEngine(fake, max_waiting=3).start()
    try:
        with pytest.raises(QueueFullError):
            asyncio.run(collect(engine, "hi", 1))
        engine.max_waiting = 4
        assert len(asyncio.run(collect(engine, "hi", 1))) == 1
    finally:
        engine.shutdown(timeout=0)


def test_shutdown_lets_requests_in_flight_finish_and_refuses_new_ones():
    engine = AsyncLLMEngine(FakeEngine(step_seconds=0.005)).start()

    async def main():
        stream = await engine.add_request("hi", params(40))
        stopper = threading.Thread(target=engine.shutdown, kwargs={"timeout": 10})
        stopper.start()
        outputs = [out async for out in stream]
        with pytest.raises((NotAcceptingError, EngineDeadError)):
            await engine.add_request("hi", params(1))
        await asyncio.to_thread(stopper.join)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 40
    assert not engine._thread.is_alive()


def test_shutdown_waits_for_a_request_accepted_but_not_yet_in_the_stats():
    """The loop accepts a request (add_request returns) a moment before it publishes the stats that
    count it: shutdown must wait for such a request too, not abort it (this failed once in a CI run
    here). The loop is held inside that moment, in the engine call the stats make, while shutdown
    decides."""
    fake = FakeEngine(step_seconds=0.001)
    hold, holding = threading.Event(), threading.Event()

    def num_queued_tokens():
        if not hold.is_set():
            holding.set()
            hold.wait(10)
        return 0

    engine = AsyncLLMEngine(fake).start()
    fake.scheduler.num_queued_tokens = num_queued_tokens

    async def main():
        stream = await engine.add_request("hi", params(5))
        assert await asyncio.to_thread(holding.wait, 10)
        stopper = threading.Thread(target=engine.shutdown, kwargs={"timeout": 10})
        stopper.start()
        await asyncio.sleep(0.2)  # shutdown decides while the stats do not count the request yet
        hold.set()
        outputs = [out async for out in stream]
        await asyncio.to_thread(stopper.join)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5
    assert not engine._thread.is_alive()


def test_shutdown_timeout_fails_what_is_still_running():
    engine = AsyncLLMEngine(FakeEngine(step_seconds=0.005)).start()

    async def main():
        stream = await engine.add_request("hi", params(10_000))
        await asyncio.to_thread(engine.shutdown, 0.05)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(main())


class Recorder:
    def __init__(self):
        self.ttft, self.new_tokens, self.e2e = [], [], []

    def first_token(self, ttft, num_prompt_tokens):
        self.ttft.append((ttft, num_prompt_tokens))

    def tokens(self, num_new, itl):
        self.new_tokens.append((num_new, itl))

    def finished(self, e2e):
        self.e2e.append(e2e)


def test_observer_gets_time_to_first_token_inter_token_latencies_and_e2e():
    recorder = Recorder()
    engine = AsyncLLMEngine(FakeEngine(step_seconds=0.002), observer=recorder).start()
    try:
        asyncio.run(collect(engine, "hi", 5))
    finally:
        engine.shutdown(timeout=0)
    assert len(recorder.ttft) == 1 and recorder.ttft[0][1] == 3  # the fake's prompt has 3 tokens
    assert [n for n, _ in recorder.new_tokens] == [1] * 5
    assert recorder.new_tokens[0][1] is None  # the first token has a TTFT, not an ITL
    itls = [itl for _, itl in recorder.new_tokens[1:]]
    assert all(itl >= 0.002 for itl in itls)
    assert len(recorder.e2e) == 1 and recorder.e2e[0] >= recorder.ttft[0][0] + sum(itls) - 1e-6
