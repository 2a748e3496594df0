"""Structured outputs: whatever the tiny SmolLM2 would rather say, a constrained request's text follows
its JSON schema, regex, choice or grammar, through the official client against the live server and
through the offline LLM; unconstrained requests in the same batch are untouched; a constraint that
does not compile is a 400 naming its field. The references: `jsonschema`, `json.loads`, `re.fullmatch`,
and numpy's unpacking of llguidance's bitmask."""

import json
import re
import threading

import httpx
import jax.numpy as jnp
import jsonschema
import llguidance.numpy
import numpy as np
import openai
import pytest
from helpers import CHAT, NAME, PROMPT, idle

from jaxinfer import SamplingParams, StructuredOutputsParams
from jaxinfer.runner import empty_batch
from jaxinfer.sampling import MIN_LOGPROB, apply_token_bitmask, sample

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                         "city": {"enum": ["Paris", "London", "Berlin"]}}}
PERSON_CHAT = [{"role": "user", "content": "Describe a person who lives in Paris."}]
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
# A Lark grammar (llguidance's dialect): a sum of small numbers.
SUM_GRAMMAR = 'start: num " + " num " = " num\nnum: /[0-9]{1,3}/'
SUM_PATTERN = r"\d{1,3} \+ \d{1,3} = \d{1,3}"


def chat(served, messages=PERSON_CHAT, **kwargs):
    return served.client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kwargs)


def person_format(strict=True):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


# -- through the server ------------------------------------------------------------------------

def test_json_schema_response_format_gives_json_that_validates(served):
    response = chat(served, response_format=person_format(), max_tokens=80)
    choice = response.choices[0]
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert choice.finish_reason == "stop"


def test_json_object_response_format_gives_a_json_object(served):
    response = served.client.completions.create(model=NAME, prompt="Here is some data:", temperature=0,
                                                max_tokens=100, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(response.choices[0].text), dict)
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body", [{"structured_outputs": {"choice": ["Lyon", "Paris", "Nice"]}},
                                  {"guided_choice": ["Lyon", "Paris", "Nice"]}], ids=["structured_outputs", "guided"])
def test_choice_gives_one_of_the_choices(served, body):
    response = chat(served, messages=CHAT, max_tokens=10, extra_body=body)
    assert response.choices[0].message.content in ("Lyon", "Paris", "Nice")
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body", [{"structured_outputs": {"regex": PHONE}}, {"guided_regex": PHONE}],
                         ids=["structured_outputs", "guided"])
def test_regex_output_matches_it_whole(served, body):
    response = served.client.completions.create(model=NAME, prompt="Call me at", temperature=0, max_tokens=20,
                                                extra_body=body)
    assert re.fullmatch(PHONE, response.choices[0].text), response.choices[0].text


def test_lark_grammar_output_is_a_sentence_of_the_grammar(served):
    response = served.client.completions.create(model=NAME, prompt="Some arithmetic:", temperature=0, max_tokens=20,
                                                extra_body={"structured_outputs": {"grammar": SUM_GRAMMAR}})
    assert re.fullmatch(SUM_PATTERN, response.choices[0].text), response.choices[0].text


def test_json_schema_as_text_in_guided_json(served):
    response = chat(served, max_tokens=80, extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)


def test_streamed_deltas_concatenate_to_json_that_validates(served):
    stream = chat(served, response_format=person_format(), max_tokens=80, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_n_2_sampled_choices_each_follow_the_schema(served):
    response = served.client.chat.completions.create(model=NAME, messages=PERSON_CHAT, n=2, temperature=1.0, seed=7,
                                                     max_tokens=80, response_format=person_format())
    texts = [c.message.content for c in response.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert texts[0] != texts[1]  # two matchers, two draws: not one choice copied


def test_logprobs_are_over_the_allowed_tokens(served):
    """vLLM's convention: the mask applies before logprobs, so an alternative the grammar forbids has
    logprob -9999 and the allowed ones share the whole probability."""
    response = chat(served, messages=CHAT, max_tokens=10, logprobs=True, top_logprobs=20,
                    extra_body={"structured_outputs": {"choice": ["Lyon", "Paris"]}})
    first = response.choices[0].logprobs.content[0]
    allowed = [t for t in first.top_logprobs if t.logprob > MIN_LOGPROB]
    assert allowed and all("Lyon".startswith(t.token) or "Paris".startswith(t.token) for t in allowed)
    assert any(t.logprob == MIN_LOGPROB for t in first.top_logprobs)
    assert np.isclose(sum(np.exp(t.logprob) for t in allowed), 1.0, atol=1e-3)


def test_constrained_and_unconstrained_requests_served_together(served):
    """An unconstrained request sharing steps with constrained ones gets its solo greedy text."""
    results = {}

    def constrained(i):
        results[i] = chat(served, response_format=person_format(), max_tokens=80).choices[0].message.content

    threads = [threading.Thread(target=constrained, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    plain = served.client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=12)
    for thread in threads:
        thread.join()
    assert plain.choices[0].text == served.reference.completion.outputs[0].text
    for text in results.values():
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("body, param", [
    ({"response_format": person_format() | {"json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_a_constraint_that_does_not_compile_gets_400_naming_its_field(served, body, param):
    response = httpx.post(f"{served.url}/v1/chat/completions", json={"model": NAME, "messages": CHAT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert idle(served)  # nothing queued, no page held


def test_the_openai_client_reports_a_bad_schema_as_a_bad_request(served):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(served, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "minProperties": "two"}}})
    assert raised.value.body["param"] == "response_format"


# -- offline -----------------------------------------------------------------------------------

def test_offline_constrained_and_unconstrained_in_one_batch(llm):
    """Both added before the first step, so every step holds both rows: the unconstrained text is
    its solo greedy text, the constrained one matches its regex."""
    plain = SamplingParams(temperature=0, max_tokens=16)
    solo = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].text
    constrained = SamplingParams(temperature=0, max_tokens=16,
                                 structured_outputs=StructuredOutputsParams(regex=PHONE))
    outs = llm.generate([PROMPT, "Call me at"], [plain, constrained], use_tqdm=False)
    assert outs[0].outputs[0].text == solo
    assert re.fullmatch(PHONE, outs[1].outputs[0].text)


def test_the_same_schema_is_compiled_once(llm):
    grammars = llm.engine.grammars
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"],
              "additionalProperties": False}
    before = grammars.num_compiled
    params = [SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(json=s))
              for s in (schema, json.dumps(schema, indent=2))]  # equal schemas, as a dict and as text
    outs = llm.generate(["A:", "B:"], params, use_tqdm=False)
    assert grammars.num_compiled == before + 1
    assert all(isinstance(json.loads(o.outputs[0].text)["k"], bool) for o in outs)


def test_a_preempted_sequence_keeps_its_grammar_state(llm):
    """Preemption recomputes prompt and output; the matcher, which consumed that output, carries on:
    the text is the one an unpreempted run gives."""
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex=PHONE))
    expected = llm.generate(["Call me at"], params, use_tqdm=False)[0].outputs[0].text
    engine = llm.engine
    request_id = engine.add_request("Call me at", params)
    seq = engine.requests[request_id].seqs[0]
    final = None
    while engine.has_unfinished_requests():
        if len(seq.output_ids) == 4 and seq.num_preemptions == 0:
            engine.scheduler._preempt(seq)
        final = next((o for o in engine.step() if o.finished), final)
    assert seq.num_preemptions == 1
    assert final.outputs[0].text == expected


def test_strict_compile_engine_serves_constrained_and_unconstrained_in_one_batch_without_compiling(llm):
    """The bitmask is an input of every step program (all ones on an unconstrained row), so a batch
    mixing both rows runs the warmed-up programs: the unconstrained text is its solo greedy text."""
    runner = llm.engine.runner
    config = runner.config
    plain = SamplingParams(temperature=0, max_tokens=16)
    solo = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].text
    runner.config = config.replace(strict_compile=True)  # raises on any program built after warm-up
    try:
        before = runner.num_compilations
        constrained = SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(
            choice=["alpha", "beta"]))
        outs = llm.generate(["Pick one:", PROMPT, "Pick another:"], [constrained, plain, constrained],
                            use_tqdm=False)
        assert {outs[0].outputs[0].text, outs[2].outputs[0].text} <= {"alpha", "beta"}
        assert outs[1].outputs[0].text == solo
        assert runner.num_compilations == before
    finally:
        runner.config = config


def test_an_offline_constraint_that_does_not_compile_is_a_value_error_and_queues_nothing(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.engine.add_request("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="((")))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("fields", [{}, {"regex": "a", "json_object": True}, {"choice": []}, {"json": 3},
                                    {"regex": "a", "json_object": 0}])
def test_structured_outputs_params_takes_exactly_one_valid_constraint(fields):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**fields)


# -- the sampler's masking ---------------------------------------------------------------------

def random_bitmask(rng, num_rows, vocab):
    bitmask = rng.integers(-2**31, 2**31, size=(num_rows, -(-vocab // 32)), dtype=np.int64).astype(np.int32)
    bitmask[0] = -1  # an unconstrained row
    return bitmask


@pytest.mark.parametrize("vocab", [256, 49152, 1000])  # 1000: the last word only partly used
def test_apply_token_bitmask_matches_numpy_unpacking(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((4, vocab)).astype(np.float32)
    bitmask = random_bitmask(rng, 4, vocab)
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bitmask)  # numpy: repeat, shift, compare
    np.testing.assert_array_equal(np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask))),
                                  expected)
    np.testing.assert_array_equal(expected[0], logits[0])


def test_sample_picks_only_allowed_tokens_greedy_and_sampled():
    rng = np.random.default_rng(0)
    num_rows, vocab = 4, 256
    logits = rng.standard_normal((num_rows, vocab)).astype(np.float32)
    bitmask = random_bitmask(rng, num_rows, vocab)
    *_, sampling, history, num_prompt, _ = empty_batch(num_rows, num_rows, 1, 8, vocab)
    sampling = sampling._replace(temperature=np.array([0, 0, 1, 1], np.float32), seeds=np.arange(num_rows, dtype=np.int32),
                                 num_top_logprobs=np.zeros(num_rows, np.int32))
    tokens, chosen, _, _, _ = sample(jnp.asarray(logits), sampling, history, num_prompt, token_bitmask=bitmask)
    masked = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(masked, bitmask)
    tokens = np.asarray(tokens)
    assert tokens[0] == np.argmax(logits[0]) and tokens[1] == np.argmax(masked[1])
    assert all(np.isfinite(masked[i, t]) for i, t in enumerate(tokens))
    lse = np.log(np.sum(np.exp(masked[1] - masked[1].max()))) + masked[1].max()
    np.testing.assert_allclose(np.asarray(chosen)[1], masked[1, tokens[1]] - lse, rtol=1e-5)
