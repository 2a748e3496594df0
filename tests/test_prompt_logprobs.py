"""prompt_logprobs (vLLM's SamplingParams field, and what completions' echo with logprobs returns):
each prompt token's logprob, rank and top alternatives against transformers' log-softmax of the same
float32 weights, through prompt chunks cut to the step's logits rows, preemption, the prefix cache
and sequences decoding beside them."""

import numpy as np
import pydoc_data.topics
import pytest

from jaxinfer import LLM, SamplingParams

TOPICS = pydoc_data.topics.topics
K = 4
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def assert_match_transformers(prompt_ids, prompt_logprobs, hf_model, k=K):
    """Our prompt logprobs (None first) against transformers' for the same tokens: logprobs within
    1e-3, top alternatives in the same order where transformers' differ by more than 2e-3, ranks
    within what a 1e-3 change of the logprob allows."""
    assert len(prompt_logprobs) == len(prompt_ids) and prompt_logprobs[0] is None
    logprob, more_lo, more_hi, top_ids, top_values = hf_model.prompt_logprobs([prompt_ids], k + 1)[0]
    entries = prompt_logprobs[1:]
    assert [e.token_id for e in entries] == prompt_ids[1:]
    np.testing.assert_allclose([e.logprob for e in entries], logprob, atol=1e-3)
    ranks = np.array([e.rank for e in entries])
    assert np.all(more_lo + 1 <= ranks) and np.all(ranks <= more_hi), (ranks, more_lo, more_hi)
    ours_ids = np.array([[t for t, _ in e.top] for e in entries])
    ours_values = np.array([[lp for _, lp in e.top] for e in entries])
    assert ours_ids.shape == (len(entries), k)
    np.testing.assert_allclose(ours_values, top_values[:, :k], atol=1e-3)
    gaps = -np.diff(top_values, axis=1)  # [P-1, k]: each alternative's lead over the next
    separated = (gaps > 2e-3) & np.concatenate([np.ones((len(entries), 1), bool), gaps[:, :-1] > 2e-3], axis=1)
    assert separated.mean() > 0.9  # the check below is not empty
    np.testing.assert_array_equal(ours_ids[separated], top_ids[:, :k][separated])


@pytest.fixture(scope="module")
def tiny():
    """16 pages of 16 tokens: about two of the 100-token prompts below at once; 8 logits rows a step."""
    return LLM("SmolLM2-135M-Instruct", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128,
               num_pages=16, quantization="none", warmup=False)


def test_prompt_logprobs_match_transformers_through_row_cut_chunks_and_preemption(tiny, hf_model):
    """8 prompts at once, every other one with prompt_logprobs: the scoring prompts' chunks are cut to
    the rows left beside the others (8 rows a step for ~100-token prompts), pages run out and
    sequences are preempted and recomputed. The outputs are those of the same requests without
    prompt_logprobs."""
    prompts = [TOPICS[name][:450] for name in sorted(TOPICS)[30:38]]
    scored = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=K)
    outs = tiny.generate(prompts, [scored if i % 2 == 0 else GREEDY for i in range(len(prompts))], use_tqdm=False)
    assert any(out.metrics.num_preemptions for out in outs[::2])  # a scoring sequence was recomputed
    plain = tiny.generate(prompts[::2], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[::2]] == [o.outputs[0].token_ids for o in plain]
    for i, out in enumerate(outs):
        if i % 2:
            assert out.prompt_logprobs is None
        else:
            assert len(out.prompt_token_ids) > 3 * tiny.engine.config.max_num_seqs
            assert_match_transformers(out.prompt_token_ids, out.prompt_logprobs, hf_model)
    allocator = tiny.engine.allocator
    assert allocator.num_free_pages == allocator.num_pages and not tiny.engine.has_unfinished_requests()


def test_prompt_logprobs_are_computed_past_the_prefix_cache(llm, hf_model):
    """A prompt whose pages are cached is computed again when its logprobs are asked for (and only
    then): the answer is whole and the same as the first time."""
    prompt = TOPICS["while"][:600]
    llm.generate([prompt], GREEDY, use_tqdm=False)  # its full pages are now in the prefix cache
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens > 0 and again.prompt_logprobs is None
    scored = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=K)
    first, second = (llm.generate([prompt], scored, use_tqdm=False)[0] for _ in range(2))
    assert first.metrics.num_cached_tokens == second.metrics.num_cached_tokens == 0
    assert first.prompt_logprobs == second.prompt_logprobs
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert_match_transformers(first.prompt_token_ids, first.prompt_logprobs, hf_model)


def test_prompt_logprobs_with_n_choices_and_edge_cases(llm):
    """n choices share one list; a one-token prompt has only the null; prompt_logprobs 0 gives each
    token's logprob and rank, no alternatives; the logprobs of the outputs are unchanged."""
    prompt = "The capital of France is"
    outs = llm.generate([prompt, "Hi"], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, prompt_logprobs=0,
                                                       logprobs=2), use_tqdm=False)
    plain = llm.generate([prompt, "Hi"], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, logprobs=2),
                         use_tqdm=False)
    for out, ref in zip(outs, plain):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
        assert [c.logprobs for c in out.outputs] == [c.logprobs for c in ref.outputs]
    scored = outs[0].prompt_logprobs
    assert len(scored) == len(outs[0].prompt_token_ids) and scored[0] is None
    assert all(e.top == [] and e.rank >= 1 and e.logprob <= 0 for e in scored[1:])
    one_token = llm.engine.tokenizer.encode("Hi")
    if len(one_token) == 1:
        assert outs[1].prompt_logprobs == [None]


@pytest.mark.parametrize("value", [-1, 21, 2.5, True])
def test_bad_prompt_logprobs_are_refused(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
