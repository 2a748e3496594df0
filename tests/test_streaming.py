"""Streaming over the real engine: the AsyncLLMEngine's outputs and the SSE route's chunks, against
the same requests run whole (LLM.generate offline, and the route's non-streamed response)."""

import asyncio
import json

import httpx
import pytest

from jaxinfer import SamplingParams
from jaxinfer.api import create_app
from jaxinfer.async_engine import AsyncLLMEngine

PROMPT = "Here is a list of five fruits and their colors:"


def run_async(llm, main):
    """`main(async_engine)` in an event loop, with an AsyncLLMEngine driving `llm`'s engine meanwhile."""
    engine = AsyncLLMEngine(llm.engine).start()
    try:
        return asyncio.run(main(engine))
    finally:
        engine.shutdown(timeout=0)


def assert_same_logprobs(entries, expected):
    assert [(e.token_id, [t for t, _ in e.top]) for e in entries] == [(e.token_id, [t for t, _ in e.top])
                                                                      for e in expected]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in expected], abs=1e-5)


def test_streamed_deltas_add_up_to_the_offline_outputs_with_logprobs_stops_and_n(llm):
    free = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=32, logprobs=2, ignore_eos=True)
    [unstopped] = llm.generate([PROMPT], free, use_tqdm=False)
    stop = unstopped.outputs[0].text[25:45]  # ends sequence 0
    stop_token = unstopped.outputs[1].token_ids[12]  # ends sequence 1 (or 0, if it comes there first)
    params = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=32, logprobs=2, ignore_eos=True,
                            stop=[stop], stop_token_ids=[stop_token])
    [offline] = llm.generate([PROMPT], params, use_tqdm=False)
    assert [c.finish_reason for c in offline.outputs] == ["stop", "stop"]

    async def main(engine):
        return [out async for out in engine.generate(PROMPT, params)]

    streamed = run_async(llm, main)
    assert streamed[-1].finished and not any(out.finished for out in streamed[:-1])
    for ref in offline.outputs:
        outputs = [out.outputs[ref.index] for out in streamed]
        assert "".join(c.delta for c in outputs) == outputs[-1].text == ref.text
        assert [t for c in outputs for t in c.delta_token_ids] == outputs[-1].token_ids == ref.token_ids
        assert [e for c in outputs for e in c.delta_logprobs] == outputs[-1].logprobs
        assert_same_logprobs(outputs[-1].logprobs, ref.logprobs)
        assert outputs[-1].finish_reason == "stop"


def test_a_slow_reader_gets_the_logprobs_of_exactly_the_tokens_of_each_output(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, ignore_eos=True)

    async def main(engine):
        stream = await engine.add_request(PROMPT, params)
        while engine.stats.num_requests:  # the engine finishes the request before anything is read
            await asyncio.sleep(0.01)
        return [out.outputs[0] async for out in stream]

    outputs = run_async(llm, main)
    assert [len(c.token_ids) for c in outputs] == list(range(1, 25))
    assert [[e.token_id for e in c.logprobs] for c in outputs] == [c.token_ids for c in outputs]


def sse_choices(text: str) -> list[dict]:
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [choice for e in events[:-1] for choice in json.loads(e)["choices"]]


def test_streamed_completion_logprobs_have_the_text_offsets_of_the_whole_response(llm):
    [greedy] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
    # A stop that matches 20 characters of the text, then not: the stream holds that text back over
    # several tokens while their logprobs go out.
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "stop": [greedy.outputs[0].text[10:30] + "\u2603"]}

    async def main(engine):
        app = create_app(engine, served_model_name="smol")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
            streamed = sse_choices((await client.post("/v1/completions", json={**body, "stream": True})).text)
        return whole, streamed

    whole, streamed = run_async(llm, main)
    assert "".join(c["text"] for c in streamed) == whole["text"] == greedy.outputs[0].text
    for key in ("tokens", "text_offset"):
        assert [x for c in streamed if c["logprobs"] for x in c["logprobs"][key]] == whole["logprobs"][key]
