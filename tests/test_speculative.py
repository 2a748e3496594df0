"""Speculative decoding with n-gram drafts (jaxinfer/speculative.py) and draft models
(jaxinfer/draft_model.py): the drafts against a brute-force lookup, and the engine's tokens with
speculation against the same engine configuration without it (the reference: decoding one token at
a time), in the default configuration, with drafts that hit and requests that get none, drafts
partly rejected, chunked prompts, preemption, logprobs, stop strings and max_tokens."""

import json

import numpy as np
import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.cli import build_parser, engine_overrides
from jaxinfer.config import EngineConfig
from jaxinfer.speculative import SpeculativeConfig, propose_ngram

MODEL = "SmolLM2-135M-Instruct"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
LIST = "apples, oranges, pears, plums, grapes, lemons, limes, cherries, melons, peaches"
CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
PROMPTS = [  # copying prompts (drafts hit), a code pattern, free text (drafts rarely hit)
    f"Repeat this list exactly: {LIST}. Again: apples, oranges,",
    CODE,
    "The capital of France is",
    "Write one sentence about the sea.",
]


# -- the drafts ----------------------------------------------------------------------------------

def brute_force_draft(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # the most recent earlier occurrence
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


@pytest.mark.parametrize("seed", range(40))
def test_ngram_drafts_equal_a_brute_force_lookup(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 4 if seed % 2 else 12, size=int(rng.integers(1, 60))).tolist()
    k, min_n = int(rng.integers(1, 6)), int(rng.integers(1, 3))
    max_n = min_n + int(rng.integers(0, 3))
    assert propose_ngram(tokens, k, min_n, max_n) == brute_force_draft(tokens, k, min_n, max_n)


def test_a_draft_is_what_followed_the_longest_matching_suffix():
    tokens = [5, 1, 2, 3, 9, 9, 7, 2, 3, 8, 8, 1, 2, 3]
    assert propose_ngram(tokens, 3, 2, 3) == [9, 9, 7]  # "1 2 3" (n = 3) beats the later "2 3" (n = 2)
    assert propose_ngram(tokens, 3, 2, 2) == [8, 8, 1]  # n = 2 only: the most recent "2 3"
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []


@pytest.mark.parametrize("value, message", [
    ({"method": "eagle"}, "method must be one of"),
    ({"method": "draft_model"}, "a \"model\" is the draft of method \"draft_model\""),
    ({"method": "ngram", "model": "SmolLM2-135M-Instruct"}, "and of no other"),
    ({"model": ""}, "model must be a non-empty string"),
    ({"model": MODEL, "draft_min_probability": 1}, "draft_min_probability must be a number in .0, 1."),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min .5. is above"),
    ({"method": "ngram", "draft_tensor_parallel_size": 1}, "unknown field"),
    ({"num_speculative_tokens": 3}, "needs a \"method\" .\"ngram\". or a draft \"model\""),
    ("{not json", "not JSON"),
    ([1], "must be a JSON object"),
])
def test_a_bad_speculative_config_is_a_clear_error(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)


def test_the_flag_takes_vllm_json():
    args = build_parser().parse_args(["--speculative-config", json.dumps(NGRAM)])
    config = EngineConfig().replace(**engine_overrides(args))
    assert config.speculative_config == SpeculativeConfig(**NGRAM)
    assert EngineConfig().speculative_config is None
    # vLLM infers the method from a draft model
    draft = EngineConfig(speculative_config='{"model": "qwen2.5-coder-0.5b-instruct", "num_speculative_tokens": 3}')
    assert draft.speculative_config == SpeculativeConfig("draft_model", 3, model="qwen2.5-coder-0.5b-instruct",
                                                         draft_min_probability=0.6)


# -- the engine ------------------------------------------------------------------------------------

OPTIONS = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128, weight_cache_dir=None)


@pytest.fixture(scope="module")
def plain():
    return LLM(MODEL, warmup=False, **OPTIONS)


@pytest.fixture(scope="module")
def speculative():
    """Warmed up and strict: a program compiled while serving with drafts would raise."""
    return LLM(MODEL, speculative_config=NGRAM, strict_compile=True, **OPTIONS)


def token_ids(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_tokens_equal_decoding_one_at_a_time(plain, speculative):
    params = SamplingParams(temperature=0, max_tokens=48)
    expected = token_ids(plain, PROMPTS, params)
    engine = speculative.engine
    drafted, accepted = engine.num_draft_tokens, engine.num_accepted_draft_tokens
    steps = 0
    for i, prompt in enumerate(PROMPTS):  # one at a time: count the steps the first prompt takes
        engine.add_request(prompt, params, request_id=f"one-{i}")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert out.outputs[0].token_ids == expected[i], prompt
            steps += i == 0
    assert token_ids(speculative, PROMPTS, params) == expected  # and as one batch
    assert engine.num_accepted_draft_tokens > accepted and engine.num_draft_tokens > drafted
    # The list is copied: fewer steps than tokens (one of the steps is the prompt's).
    assert steps < len(expected[0])
    assert engine.runner.num_compilations == 0


def test_a_mixed_batch_with_sampled_rows_logprobs_and_stops_is_unchanged(plain, speculative):
    """A sampled row keeps its draws; greedy rows with logprobs get the same
    logprobs; a stop string or max_tokens inside an accepted draft cuts there; a logit bias (banning
    the plain answer's sixth token) reaches the draft rows too, and min_tokens rows take no drafts."""
    sixth = token_ids(plain, PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=6))[0][5]
    requests = [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, logprobs=3)),
        (PROMPTS[0], SamplingParams(temperature=0.8, seed=7, max_tokens=24)),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, stop=["mul"])),
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=13)),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.2)),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, logit_bias={sixth: -100.0})),
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, min_tokens=30)),
    ]
    prompts, params = zip(*requests)
    expected = plain.generate(list(prompts), list(params), use_tqdm=False)
    got = speculative.generate(list(prompts), list(params), use_tqdm=False)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].text == e.outputs[0].text
        assert g.outputs[0].finish_reason == e.outputs[0].finish_reason
    assert len(got[3].outputs[0].token_ids) == 13
    assert sixth not in got[5].outputs[0].token_ids and len(got[6].outputs[0].token_ids) >= 30
    for e, g in zip(expected[0].outputs[0].logprobs, got[0].outputs[0].logprobs):
        assert g.logprob == pytest.approx(e.logprob, abs=1e-4)
        assert [t for t, _ in g.top] == [t for t, _ in e.top]
    assert speculative.engine.runner.num_compilations == 0


def test_sampled_requests_take_drafts_and_draw_the_tokens_they_draw_without_them(plain, speculative):
    """Rejection sampling for drafts of one token each (`jaxinfer.speculative`): the row samples, and
    the draft token stands where the sample is it. With each row keyed by the output index it samples,
    a seeded request's tokens are those of plain decoding, whatever was accepted; at temperature 0.5
    on copying prompts most draft tokens are, and some are not."""
    requests = [(PROMPTS[i % 2], SamplingParams(temperature=0.5, seed=i, max_tokens=40, **extra))
                for i, extra in enumerate([{}, {}, {"top_p": 0.9}, {"top_k": 5, "logprobs": 2}, {"min_p": 0.1}])]
    requests.append((PROMPTS[0], SamplingParams(temperature=1.0, seed=11, max_tokens=40)))
    prompts, params = map(list, zip(*requests))
    expected = plain.generate(prompts, params, use_tqdm=False)
    engine = speculative.engine
    drafted, accepted = engine.num_draft_tokens, engine.num_accepted_draft_tokens
    for batch in (range(len(requests)), [3]):  # together, and one alone
        got = speculative.generate([prompts[i] for i in batch], [params[i] for i in batch], use_tqdm=False)
        for i, g in zip(batch, got):
            assert g.outputs[0].token_ids == expected[i].outputs[0].token_ids, requests[i]
    for e, g in zip(expected[3].outputs[0].logprobs, got[0].outputs[0].logprobs):
        assert g.logprob == pytest.approx(e.logprob, abs=1e-4)
        assert [t for t, _ in g.top] == [t for t, _ in e.top]
    drafted, accepted = engine.num_draft_tokens - drafted, engine.num_accepted_draft_tokens - accepted
    assert 0 < accepted < drafted
    assert engine.runner.num_compilations == 0


def test_chunked_prompts_and_preemption_keep_the_tokens(plain):
    """Long prompts in chunks of 32 tokens, and so few pages that sequences are preempted and
    recomputed while they hold drafts' pages."""
    long_prompts = [f"{i}. Copy these lines twice.\n{LIST}\n{LIST.upper()}\n{CODE}\nFirst copy:\n{LIST}\n"
                    for i in range(4)]  # different from the first page on: no shared prefix-cache pages
    params = SamplingParams(temperature=0, max_tokens=64)
    expected = token_ids(plain, long_prompts, params)
    tight = LLM(MODEL, speculative_config=NGRAM, warmup=False, max_model_len=512, max_num_seqs=4,
                max_num_batched_tokens=32, num_pages=32, weight_cache_dir=None)
    assert token_ids(tight, long_prompts, params) == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.num_accepted_draft_tokens > 0
    assert tight.engine.allocator.num_free_pages == tight.engine.allocator.num_pages  # nothing leaked


# -- draft models ----------------------------------------------------------------------------------

def test_a_draft_model_gives_the_plain_tokens_in_a_mixed_batch(plain):
    """The model drafting for itself (warmed up, strict): nearly every draft token of a greedy row is
    accepted, so the draft's cache is one position short after most steps and catches up in the next;
    the sampled row keeps a draft token where its own draw is it."""
    requests = [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, logprobs=3)),
        (PROMPTS[1], SamplingParams(temperature=0.8, seed=7, max_tokens=24)),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, stop=["mul"])),
        (PROMPTS[2], SamplingParams(temperature=0, max_tokens=13)),
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.2)),
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=40)),
    ]
    prompts, params = zip(*requests)
    expected = plain.generate(list(prompts), list(params), use_tqdm=False)
    draft = LLM(MODEL, speculative_config={"model": MODEL, "num_speculative_tokens": 3}, strict_compile=True,
                **OPTIONS)
    engine = draft.engine
    for batch in ([0, 1, 2, 3, 4, 5], [5], [3, 0]):  # together, alone, and again (prefix-cache hits)
        got = draft.generate([prompts[i] for i in batch], [params[i] for i in batch], use_tqdm=False)
        for i, g in zip(batch, got):
            assert g.outputs[0].token_ids == expected[i].outputs[0].token_ids, requests[i]
            assert g.outputs[0].text == expected[i].outputs[0].text
            assert g.outputs[0].finish_reason == expected[i].outputs[0].finish_reason
    for e, g in zip(expected[0].outputs[0].logprobs, got[1].outputs[0].logprobs):
        assert g.logprob == pytest.approx(e.logprob, abs=1e-4)
    # Greedy rows take nearly every draft of the model's own greedy tokens; the sampled row not all
    assert engine.num_draft_tokens > engine.num_accepted_draft_tokens >= 0.75 * engine.num_draft_tokens > 0
    assert engine.runner.num_compilations == engine.drafter.runner.num_compilations == 0
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """A 4-layer random Llama and, as its draft, its first 2 layers with the same embedding, norm and
    head (the same draws): drafts that agree with the target part of the time."""
    from tp_worker import write_random_llama

    fields = dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256, max_position_embeddings=1024)
    target = write_random_llama(str(tmp_path_factory.mktemp("target")), fields)
    draft = write_random_llama(str(tmp_path_factory.mktemp("draft")), dict(fields, num_hidden_layers=2))
    return target, draft


def test_a_draft_model_rejected_part_of_the_time_with_chunks_and_preemption(random_models):
    target, draft_dir = random_models
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (70, 45, 90, 20)]
    prompts += [prompts[0][:40] + prompts[3]]  # shares two pages with the first
    # Greedy rows, and seeded sampled ones (rejection sampling: `jaxinfer.speculative`)
    params = [SamplingParams(temperature=0.5 * (i % 2), seed=i, max_tokens=60, ignore_eos=True)
              for i in range(len(prompts))]
    options = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, weight_cache_dir=None,
                   warmup=False)
    expected = token_ids(LLM(target, **options), prompts, params)
    tight = LLM(target, speculative_config={"model": draft_dir, "num_speculative_tokens": 4,
                                            "draft_min_probability": 0}, num_pages=24, **options)
    assert token_ids(tight, prompts, params) == expected
    engine = tight.engine
    assert engine.scheduler.num_preemptions > 0
    assert 0 < engine.num_accepted_draft_tokens < engine.num_draft_tokens
    assert engine.num_draft_tokens > engine.drafter.num_drafts  # drafts of several tokens
    assert engine.allocator.num_free_pages == engine.allocator.num_pages  # nothing leaked
    # A confidence threshold no token of this random draft reaches: every draft is its first token.
    unsure = LLM(target, speculative_config={"model": draft_dir, "num_speculative_tokens": 4,
                                             "draft_min_probability": 0.999999}, **options)
    assert token_ids(unsure, prompts, params) == expected
    assert unsure.engine.num_draft_tokens == unsure.engine.drafter.num_drafts > 0


def test_a_draft_model_with_another_vocabulary_or_none_at_all_is_refused(random_models, tmp_path):
    options = dict(warmup=False, max_model_len=256, weight_cache_dir=None)
    with pytest.raises(ValueError, match="does not share the target's vocabulary"):
        LLM(random_models[0], speculative_config={"model": MODEL}, **options)
    with pytest.raises(FileNotFoundError, match="speculative_config model .*unknown model"):
        LLM(random_models[0], speculative_config={"model": str(tmp_path / "no-such-model")}, **options)


def test_served_streams_equal_the_offline_tokens_and_metrics_count_the_drafts(plain, speculative):
    """Through the server (the openai client, streaming): the same text as decoding one token at a
    time, and /metrics counts drafts. Last in this file: the server's loop takes the engine over."""
    import httpx
    import openai
    from helpers import live_server

    from jaxinfer.api import create_app
    from jaxinfer.async_engine import AsyncLLMEngine

    expected = plain.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    async_engine = AsyncLLMEngine(speculative.engine).start()
    try:
        with live_server(create_app(async_engine, served_model_name="smol")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = client.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=32, temperature=0,
                                               stream=True)
            assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected.outputs[0].text
            metrics = httpx.get(f"{url}/metrics").text
    finally:
        async_engine.shutdown(timeout=1)
    counts = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("jaxinfer:spec_decode")}
    assert counts["jaxinfer:spec_decode_num_draft_tokens_total"] >= counts["jaxinfer:spec_decode_num_accepted_tokens_total"] > 0
