"""What the engine hands out: where a request stops, and the deltas its stream is made of."""

import random

import pytest

from jaxinfer import SamplingParams
from jaxinfer.outputs import find_stop, stop_prefix_start
from jaxinfer.sampling import MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS

PROMPT = "The history of the printing press begins"


def stream(llm, prompt, params):
    """Every output of one request, step by step, from the engine's own add_request/step loop."""
    engine = llm.engine
    request_id = engine.add_request(prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [out for out in engine.step() if out.request_id == request_id]
    return outputs


def greedy(**params):
    return SamplingParams(temperature=0.0, ignore_eos=True, **params)


@pytest.fixture(scope="module")
def reference(llm):
    """The greedy continuation with no stop condition: tokens and text."""
    [out] = llm.generate([PROMPT], greedy(max_tokens=32), use_tqdm=False)
    return out.outputs[0]


def random_texts(seed):
    """Texts over a two-letter alphabet, grown a few characters at a time."""
    rng = random.Random(seed)
    text, grown = "", []
    for _ in range(60):
        text += "".join(rng.choice("ab") for _ in range(rng.randint(1, 4)))
        grown.append(text)
    return grown


@pytest.mark.parametrize("seed", range(20))
def test_searching_only_the_new_text_and_a_tail_finds_the_first_stop_a_full_search_finds(seed):
    stops = random.Random(seed).sample(["abba", "babab", "aaaaaaa", "bbb", "abaabaab"], 2)
    searched = 0
    for text in random_texts(seed):
        full = min((h for h in (text.find(s) for s in stops) if h >= 0), default=None)
        assert find_stop(text, stops, searched) == full
        if full is not None:
            break
        searched = len(text)


@pytest.mark.parametrize("seed", range(20))
def test_a_stream_holds_back_exactly_the_longest_end_of_the_text_that_begins_a_stop(seed):
    stops = random.Random(seed).sample(["abba", "babab", "aaaaaaa", "bbb", "abaabaab"], 2)
    for text in random_texts(seed):
        expected = min(p for p in range(len(text) + 1)
                       if any(len(text) - p < len(s) and s.startswith(text[p:]) for s in stops))
        assert stop_prefix_start(text, stops) == expected


def test_a_long_stop_string_that_never_begins_at_the_end_of_the_text_leaves_the_stream_as_it_is(llm):
    plain = stream(llm, PROMPT, greedy(max_tokens=24))
    with_stop = stream(llm, PROMPT, greedy(max_tokens=24, stop=["~" * MAX_STOP_LENGTH]))
    assert [o.outputs[0].delta for o in with_stop] == [o.outputs[0].delta for o in plain]
    assert sum(bool(o.outputs[0].delta) for o in plain) > 20  # the stream did stream


def test_a_stream_cut_at_a_long_stop_string_shows_the_text_before_it_and_nothing_of_it(llm, reference):
    text = reference.text
    stop = text[len(text) // 3:len(text) // 3 + 40]  # a stop that spans several tokens
    outputs = stream(llm, PROMPT, greedy(max_tokens=32, stop=["never there", stop]))
    expected = text[:text.index(stop)]
    deltas = [o.outputs[0].delta for o in outputs]
    assert "".join(deltas) == expected == outputs[-1].outputs[0].text
    assert outputs[-1].outputs[0].finish_reason == "stop"
    assert sum(bool(d) for d in deltas[:-1]) >= 3  # text before the stop was streamed as it came


def test_stop_token_ids_end_the_output_at_the_first_of_them(llm, reference):
    tokens = reference.token_ids
    unused = [t for t in range(1000, 5000) if t not in tokens][:MAX_STOP_TOKEN_IDS - 2]
    stop_token_ids = unused[:100] + [tokens[9], tokens[5]] + unused[100:]
    [out] = llm.generate([PROMPT], greedy(max_tokens=32, stop_token_ids=stop_token_ids), use_tqdm=False)
    first = min(tokens.index(tokens[9]), tokens.index(tokens[5]))
    assert out.outputs[0].token_ids == tokens[:first + 1]
    assert out.outputs[0].finish_reason == "stop"
