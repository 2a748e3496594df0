"""Completions' echo (the prompt's text and logprobs before each choice's) and vLLM's prompt_logprobs,
through the official `openai` client against conftest.py's `served` server. The expected values are
the offline engine's for the same prompt (`served.reference.scored`, taken before the server owned
the engine), whose prompt logprobs tests/test_prompt_logprobs.py checks against transformers."""

import httpx
import pytest
from helpers import MAX_TOKENS, NAME, PROMPT


def token_text(served, token_id):
    return served.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def test_echo_with_logprobs_gives_the_prompts_tokens_then_the_outputs(served):
    ref = served.reference.scored
    response = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                logprobs=2, echo=True)
    choice = response.choices[0]
    assert choice.text == PROMPT + ref.outputs[0].text
    logprobs = choice.logprobs
    prompt_ids, output = ref.prompt_token_ids, ref.outputs[0]
    assert logprobs.tokens == [token_text(served, t) for t in prompt_ids + output.token_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [e.logprob for e in ref.prompt_logprobs[1:]] + [e.logprob for e in output.logprobs]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for top, entry in zip(logprobs.top_logprobs[1:], ref.prompt_logprobs[1:] + output.logprobs):
        assert top == pytest.approx({token_text(served, t): lp for t, lp in entry.top[:2]}, abs=1e-4)
    texts = logprobs.tokens
    assert logprobs.text_offset == [sum(map(len, texts[:i])) for i in range(len(texts))]
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == MAX_TOKENS


def test_echo_with_max_tokens_0_scores_the_prompt_alone(served):
    """What lm-evaluation-harness's loglikelihood asks of a completions server (there with max_tokens 1)."""
    ref = served.reference.scored
    response = served.client.completions.create(model=NAME, prompt=[ref.prompt_token_ids] * 2, max_tokens=0,
                                                temperature=0, logprobs=1, echo=True)
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.text == PROMPT and choice.finish_reason == "length"
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:]],
                                                                   abs=1e-4)
    assert response.usage.completion_tokens == 0
    plain = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0, echo=True)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None


def test_echo_streams_the_prompt_first_and_adds_up_to_the_whole_answer(served):
    whole = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                             logprobs=1, echo=True).choices[0]
    chunks = list(served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                   temperature=0, logprobs=1, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for c in chunks if c.choices[0].logprobs for x in getattr(c.choices[0].logprobs, field)]
        assert streamed == getattr(whole.logprobs, field)
    only = list(served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in only) == PROMPT and only[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_in_vllms_shape(served, path):
    """Per prompt token: null first, then {token id: {logprob, rank, decoded_token}} for the prompt
    token and its most likely alternatives."""
    ref = served.reference.scored
    body = {"model": NAME, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    if path == "/v1/completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    answer = httpx.post(served.url + path, json=body, timeout=60).json()
    shaped = answer["choices"][0]["prompt_logprobs"] if path == "/v1/completions" else answer["prompt_logprobs"]
    if path == "/v1/completions":
        assert len(shaped) == len(ref.prompt_token_ids)
        entries = ref.prompt_logprobs
    else:  # the chat template's prompt: its own tokens; the same shape
        entries = [None] * len(shaped)
    assert shaped[0] is None
    for position, entry in zip(shaped[1:], entries[1:]):
        assert 1 <= len(position) <= 4
        for token_id, item in position.items():
            assert set(item) == {"logprob", "rank", "decoded_token"} and item["rank"] >= 1
            assert item["decoded_token"] == token_text(served, int(token_id))
        if entry is not None:
            own = position[str(entry.token_id)]
            assert own["logprob"] == pytest.approx(entry.logprob, abs=1e-4) and own["rank"] == entry.rank
            for rank, (token_id, logprob) in enumerate(entry.top[:3], 1):
                if token_id != entry.token_id:
                    item = position[str(token_id)]
                    assert (item["rank"], item["logprob"]) == (rank, pytest.approx(logprob, abs=1e-4))
