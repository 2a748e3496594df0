"""The on-device sampler against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import SamplingParams
from jaxinfer import sampling
from jaxinfer.sampling import SamplingArrays, apply_penalties, filter_logits, sample

VOCAB = 64
DRAWS = 2000


def arrays(n, **values):
    defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                    repetition_penalty=1.0, seeds=0, counters=0)
    defaults.update(values)
    out = {}
    for name, v in defaults.items():
        dtype = np.int32 if name in ("top_k", "seeds", "counters") else np.float32
        out[name] = np.broadcast_to(np.asarray(v, dtype), (n,)).copy()
    return SamplingArrays(**out)


_sample = jax.jit(sample, static_argnames="num_logprobs")


def draw(logits_row, **params):
    """DRAWS samples of one distribution: one row per draw, each with its own counter."""
    logits = np.broadcast_to(logits_row, (DRAWS, VOCAB)).astype(np.float32)
    p = arrays(DRAWS, counters=np.arange(DRAWS), seeds=11, **params)
    history = np.full((DRAWS, 1), -1, np.int32)
    tokens, *_ = _sample(logits, p, history, np.zeros(DRAWS, np.int32), num_logprobs=4)
    return np.asarray(tokens)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture
def logits_row():
    return np.random.default_rng(0).normal(0, 2, VOCAB).astype(np.float32)


def test_top_k_never_leaves_the_k_best(logits_row):
    allowed = set(np.argsort(-logits_row)[:5])
    assert set(draw(logits_row, top_k=5)) <= allowed


def test_top_p_never_leaves_the_nucleus(logits_row):
    probs = softmax(logits_row)
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    allowed = set(order[before < 0.7])  # the smallest prefix whose mass reaches 0.7
    tokens = draw(logits_row, top_p=0.7)
    assert set(tokens) <= allowed and len(set(tokens)) > 1


def test_min_p_never_emits_unlikely_tokens(logits_row):
    probs = softmax(logits_row)
    allowed = set(np.flatnonzero(probs >= 0.1 * probs.max()))
    assert set(draw(logits_row, min_p=0.1)) <= allowed


def vllm_kept_tokens(logits, top_k, top_p, min_p):
    """The tokens vLLM's sampler can draw from, in float64: its min_p processor on the whole
    distribution, then `apply_top_k_top_p` (vllm/v1/sample/ops/topk_topp_sampler.py) as written:
    sort ascending, mask below the k-th largest, softmax what is left, mask while the cumulative sum
    is <= 1 - top_p, never the last."""
    x = logits.astype(np.float64)
    probs = softmax(x)
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    order = np.argsort(x, kind="stable")
    ranked = x[order]
    if top_k > 0:
        ranked = np.where(ranked < ranked[len(ranked) - top_k], -np.inf, ranked)
    remove = np.cumsum(softmax(ranked)) <= 1 - top_p
    remove[-1] = False
    ranked = np.where(remove, -np.inf, ranked)
    return set(order[np.isfinite(ranked)].tolist())


def kept_tokens(logits, top_k, top_p, min_p):
    """The tokens `filter_logits` keeps (a weight above 0), one set per row."""
    n = len(logits)
    weights = jax.jit(filter_logits)(
        jnp.asarray(logits, jnp.float32), jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32),
        jnp.full(n, min_p, jnp.float32))
    return [set(np.flatnonzero(row > 0).tolist()) for row in np.asarray(weights)]


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (5, 0.8, 0.0), (3, 0.6, 0.0), (10, 0.5, 0.0), (20, 0.9, 0.0), (1, 0.3, 0.0), (64, 0.95, 0.0),
    (-1, 0.7, 0.0), (8, 1.0, 0.0), (12, 0.7, 0.05), (30, 0.85, 0.2)])
def test_top_p_applies_to_the_top_k_renormalized_distribution_as_in_vllm(top_k, top_p, min_p):
    rng = np.random.default_rng([top_k + 1, int(top_p * 100), int(min_p * 100)])
    logits = rng.normal(0, 2.5, (12, VOCAB)).astype(np.float32)  # float logits: no ties
    expected = [vllm_kept_tokens(row, top_k, top_p, min_p) for row in logits]
    assert kept_tokens(logits, top_k, top_p, min_p) == expected


def kept_tokens_per_row(logits, top_k, top_p, min_p):
    """`kept_tokens` with each row's own parameters (arrays of the rows' length)."""
    weights = jax.jit(filter_logits)(jnp.asarray(logits, jnp.float32), jnp.asarray(top_k, jnp.int32),
                                     jnp.asarray(top_p, jnp.float32), jnp.asarray(min_p, jnp.float32))
    return [set(np.flatnonzero(row > 0).tolist()) for row in np.asarray(weights)]


# Past sampling.CANDIDATES: a k larger than the candidates, and flat rows whose candidates hold less
# than top_p (the bisection over the whole vocabulary), beside peaked rows (the candidates alone).
@pytest.mark.parametrize("top_k, top_p, min_p, spread", [
    (100, 1.0, 0.0, 2.0), (300, 0.9, 0.0, 0.3), (-1, 0.9, 0.0, 0.3), (-1, 0.5, 0.0, 4.0), (40, 0.95, 0.0, 4.0),
    (-1, 0.8, 0.02, 0.5), (500, 0.99, 0.0, 1.0)])
def test_filters_over_a_large_vocabulary_match_vllm(top_k, top_p, min_p, spread):
    assert 1000 > 4 * sampling.CANDIDATES
    rng = np.random.default_rng([top_k + 1, int(top_p * 100), int(spread * 10)])
    logits = rng.normal(0, spread, (6, 1000)).astype(np.float32)
    expected = [vllm_kept_tokens(row, top_k, top_p, min_p) for row in logits]
    assert kept_tokens(logits, top_k, top_p, min_p) == expected
    if top_p < 1 and spread < 1:  # the case this test is for: the candidates hold less than top_p
        probs = np.exp(logits[0] - logits[0].max())
        assert np.sort(probs)[::-1][:sampling.CANDIDATES].sum() < top_p * probs.sum()


def test_a_rows_kept_tokens_do_not_depend_on_the_other_rows():
    """Each row alone, and all in one batch whose other rows take the whole-vocabulary paths."""
    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(0, 4.0, (3, 1000)), rng.normal(0, 0.3, (3, 1000))]).astype(np.float32)
    top_k = np.array([20, -1, 200, -1, 100, 600], np.int32)
    top_p = np.array([0.9, 0.7, 1.0, 0.9, 0.95, 1.0], np.float32)
    min_p = np.array([0.0, 0.05, 0.0, 0.0, 0.0, 0.0], np.float32)
    together = kept_tokens_per_row(logits, top_k, top_p, min_p)
    for i in range(len(logits)):
        alone = kept_tokens_per_row(logits[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], min_p[i:i + 1])
        assert together[i] == alone[0] == vllm_kept_tokens(logits[i], top_k[i], top_p[i], min_p[i])


def test_categorical_draws_in_proportion_never_a_zero_weight():
    vocab = 300  # chunks of 128: two whole, one partial
    weights = np.zeros(vocab, np.float32)
    weights[[3, 5, 127, 128, 200, 299]] = [0.5, 2.0, 1.0, 0.25, 3.0, 1.25]  # chunk 1 holds only 128
    n = 20000
    uniform = jax.random.uniform(jax.random.key(5), (n,))
    draws = np.asarray(jax.jit(sampling.categorical)(jnp.broadcast_to(jnp.asarray(weights), (n, vocab)), uniform))
    counts = np.bincount(draws, minlength=vocab)
    nonzero = np.flatnonzero(weights)
    assert counts.sum() == counts[nonzero].sum() == n
    expected = weights[nonzero] / weights.sum() * n
    chi2 = ((counts[nonzero] - expected) ** 2 / expected).sum()
    assert chi2 < 20.52  # chi-square, 5 degrees of freedom, p = 0.001
    # The ends of [0, 1): the first and the last token with any weight, never a zero past them.
    edges = np.asarray(sampling.categorical(jnp.asarray(np.stack([weights, weights])),
                                            jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))])))
    assert edges.tolist() == [3, 299]


def test_sampled_tokens_do_not_depend_on_the_batch():
    """A seeded row draws the same token alone and beside rows that take the other paths."""
    rng = np.random.default_rng(9)
    logits = np.concatenate([rng.normal(0, 3.0, (4, 1000)), rng.normal(0, 0.3, (4, 1000))]).astype(np.float32)
    params = dict(temperature=np.array([0.8, 1.0, 0.7, 0.0, 1.2, 0.9, 1.0, 0.6], np.float32),
                  top_k=np.array([-1, 30, 200, -1, -1, 500, -1, 80], np.int32),
                  top_p=np.array([1.0, 0.9, 1.0, 1.0, 0.8, 1.0, 0.95, 0.5], np.float32),
                  min_p=np.array([0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0], np.float32),
                  seeds=np.arange(8) + 100, counters=np.arange(8) * 7)
    n = len(logits)
    history, num_prompt = np.full((n, 1), -1, np.int32), np.zeros(n, np.int32)
    together, *_ = _sample(logits, arrays(n, **params), history, num_prompt, num_logprobs=4)
    for i in range(n):
        alone, *_ = _sample(logits[i:i + 1], arrays(1, **{k: v[i:i + 1] for k, v in params.items()}),
                            history[i:i + 1], num_prompt[i:i + 1], num_logprobs=4)
        assert int(alone[0]) == int(together[i])
    assert int(together[3]) == int(np.argmax(logits[3]))


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = np.full((1, VOCAB), -5.0, np.float32)
    logits[0, [9, 4, 30, 17, 2]] = [3.0, 2.0, 1.0, 1.0, 1.0]  # the 3rd, 4th and 5th are tied
    assert kept_tokens(logits, 3, 1.0, 0.0) == [{9, 4, 30, 17, 2}] == [vllm_kept_tokens(logits[0], 3, 1.0, 0.0)]


def test_top_p_keeps_or_drops_equally_likely_tokens_together():
    logits = np.full((1, VOCAB), -8.0, np.float32)
    logits[0, [40, 7, 21]] = [2.0, 1.0, 1.0]  # the nucleus boundary falls between the two tied tokens
    probs = softmax(logits[0].astype(np.float64))
    below_tie, with_tie = probs[40], probs[40] + probs[7] + probs[21]
    for top_p in (below_tie + 1e-3, (below_tie + with_tie) / 2, with_tie - 1e-3):
        # The documented rule: a token stays if the tokens strictly more likely than it hold < top_p.
        mass_above = np.array([probs[probs > q].sum() for q in probs])
        assert kept_tokens(logits, -1, top_p, 0.0) == [set(np.flatnonzero(mass_above < top_p).tolist())]
        assert kept_tokens(logits, -1, top_p, 0.0) == [{40, 7, 21}]


def test_temperature_sampling_matches_the_softmax_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2] + [-30.0] * (VOCAB - 8), np.float32)
    temperature = 0.7
    expected = softmax(logits / temperature)[:8] * DRAWS
    counts = np.bincount(draw(logits, temperature=temperature), minlength=VOCAB)
    assert counts[8:].sum() == 0
    chi2 = ((counts[:8] - expected) ** 2 / expected).sum()
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def test_greedy_rows_take_the_argmax_whatever_their_neighbours_do(logits_row):
    logits = np.stack([logits_row, logits_row[::-1]]).astype(np.float32)
    p = arrays(2, temperature=np.array([0.0, 1.5]), seeds=np.array([1, 2]))
    tokens, *_ = _sample(logits, p, np.full((2, 1), -1, np.int32), np.zeros(2, np.int32), num_logprobs=4)
    assert int(tokens[0]) == int(np.argmax(logits_row))


def penalties_reference(logits, history, num_prompt, presence, frequency, repetition):
    out = logits.copy()
    for i in range(len(out)):
        ids = [t for t in history[i] if t >= 0]
        generated = ids[num_prompt[i]:]
        for t in set(ids):  # HF's repetition penalty, over prompt and output
            out[i, t] = out[i, t] / repetition[i] if out[i, t] > 0 else out[i, t] * repetition[i]
        for t in set(generated):  # OpenAI's presence and frequency penalties, over output only
            out[i, t] -= presence[i] + frequency[i] * generated.count(t)
    return out


def test_penalties_match_the_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (3, VOCAB)).astype(np.float32)
    history = np.full((3, 12), -1, np.int32)
    history[0, :10] = [1, 2, 3, 4, 5, 5, 5, 7, 1, 9]
    history[1, :6] = [10, 11, 12, 12, 12, 13]
    history[2, :12] = rng.integers(0, VOCAB, 12)
    num_prompt = np.array([4, 2, 5], np.int32)
    presence, frequency, repetition = [0.5, -0.3, 1.1], [0.2, 0.7, 0.0], [1.3, 1.0, 0.8]
    p = arrays(3, presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
    ours = np.asarray(jax.jit(apply_penalties)(logits, p, history, num_prompt))
    ref = penalties_reference(logits, history, num_prompt, presence, frequency, repetition)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)


def test_logit_bias_is_added_before_penalties_and_sampling_and_leaves_the_logprobs():
    """Greedy and sampled rows with biases (one of them -100 on its argmax, one +100 on a poor token,
    one none) against NumPy: the biased logits, then the repetition penalty (vLLM's order), then
    argmax; the sampled row draws from the softmax of the biased logits; logprobs are the raw
    logits' log-softmax whatever the bias."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (4, VOCAB)).astype(np.float32)
    biases = [{int(np.argmax(logits[0])): -100.0, 3: 2.5}, {int(np.argmin(logits[1])): 100.0}, {}, {5: 30.0}]
    width = sampling.MAX_LOGIT_BIAS
    ids, values = np.full((4, width), -1, np.int32), np.zeros((4, width), np.float32)
    for row, bias in enumerate(biases):
        ids[row, :len(bias)], values[row, :len(bias)] = list(bias), list(bias.values())
    history = np.full((4, 3), -1, np.int32)
    history[0] = [3, 7, 7]  # row 0: repetition penalty 1.5 over these
    p = arrays(4, temperature=[0.0, 0.0, 0.0, 1.0], repetition_penalty=[1.5, 1.0, 1.0, 1.0], seeds=[0, 0, 0, 4])
    p = p._replace(logit_bias_ids=ids, logit_bias_values=values)
    tokens, chosen, top_ids, top_logprobs, _ = _sample(logits, p, history, np.zeros(4, np.int32), num_logprobs=4)
    biased = logits.copy()
    for row, bias in enumerate(biases):
        for token, value in bias.items():
            biased[row, token] += value
    ref = penalties_reference(biased, history, [0, 0, 0, 0], [0.0] * 4, [0.0] * 4, [1.5, 1.0, 1.0, 1.0])
    assert [int(t) for t in tokens[:3]] == [int(np.argmax(r)) for r in ref[:3]]
    assert int(tokens[1]) == int(np.argmin(logits[1]))  # +100 all but forces it
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(chosen), log_softmax[np.arange(4), np.asarray(tokens)], atol=1e-5)
    np.testing.assert_allclose(np.asarray(top_logprobs), np.sort(log_softmax, -1)[:, ::-1][:, :4], atol=1e-5)
    # The sampled row: its draws follow the biased distribution (token 5 at +30 takes nearly all).
    row = np.broadcast_to(logits[3], (DRAWS, VOCAB)).astype(np.float32)
    many = arrays(DRAWS, counters=np.arange(DRAWS), seeds=11)
    many = many._replace(logit_bias_ids=np.broadcast_to(ids[3], (DRAWS, width)).copy(),
                         logit_bias_values=np.broadcast_to(values[3], (DRAWS, width)).copy())
    drawn, *_ = _sample(row, many, np.full((DRAWS, 1), -1, np.int32), np.zeros(DRAWS, np.int32), num_logprobs=4)
    expected = softmax(biased[3])[5]
    assert abs(np.mean(np.asarray(drawn) == 5) - expected) < 4 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-3


def test_logprobs_equal_log_softmax_of_the_reference_logits(llm, hf_model, hf_tokenizer):
    prompt = "The three primary colors are"
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)[0]
    logits = hf_model.last_logits([hf_tokenizer.encode(prompt)])[0].astype(np.float64)
    ref = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())  # log_softmax
    first = out.outputs[0].logprobs[0]
    assert first.token_id == int(np.argmax(ref))
    assert abs(first.logprob - ref[first.token_id]) < 1e-3
    top_ids = [t for t, _ in first.top]
    assert top_ids == list(np.argsort(-ref)[:5])
    np.testing.assert_allclose([lp for _, lp in first.top], ref[top_ids], atol=1e-3)


def test_chunked_argmax_is_jnp_argmax_ties_included():
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, (16, 49152)).astype(np.float32)  # many ties: the first index must win
    x[3] = -np.inf
    x[5, 1000:] = 10.0
    for rows in (x, x[:1], x[:, :1000]):  # 1000 columns: not whole chunks
        np.testing.assert_array_equal(np.asarray(sampling.argmax(jnp.asarray(rows))), np.argmax(rows, axis=-1))
