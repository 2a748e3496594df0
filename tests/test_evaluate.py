"""jaxinfer.evaluate against its definitions, computed independently from HF transformers' logits after
each prefix of each window: perplexity (a NumPy log-softmax, exp of the mean cross-entropy) and the
teacher-forced top tokens."""

import numpy as np
import pydoc_data.topics
import pytest

from jaxinfer.evaluate import perplexity, token_windows, top_tokens
from jaxinfer.models.params import load_llama
from jaxinfer.weights.gguf import GGUFCheckpoint

# 3 windows of 20 tokens: a window spans two 16-token pages, and with 2 windows per call the last
# call holds one window (a ragged batch of another size).
WINDOW, NUM_WINDOWS = 20, 3


@pytest.fixture(scope="module")
def windows(hf_tokenizer):
    return token_windows(hf_tokenizer.encode(pydoc_data.topics.topics["assert"]), WINDOW, NUM_WINDOWS)


def log_softmax(logits):  # [..., vocab] float64
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def hf_logits(hf_model, windows):
    """[windows, n - 1, vocab] float64: HF's logits after tokens 0 .. t-1 of each window alone, at t - 1."""
    return np.asarray([hf_model.last_logits([list(map(int, w[:t])) for t in range(1, WINDOW)]) for w in windows],
                      np.float64)


@pytest.fixture(scope="module")
def model(smollm2_path):
    checkpoint = GGUFCheckpoint(smollm2_path)  # the same file HF loads, full precision
    return load_llama(checkpoint.config, checkpoint)


def test_perplexity_is_exp_of_the_mean_next_token_cross_entropy(model, hf_logits, windows):
    """Reference: token t of a window scored from HF's logits after tokens 0 .. t-1 of that window
    alone (t = 1 .. n-1), natural log, exp of the mean over all windows' scored positions; with
    first_scored (llama-perplexity's second half of each window), only t = first_scored .. n-1."""
    logp = log_softmax(hf_logits)
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]  # [windows, n - 1]
    for first_scored in (1, WINDOW // 2 + 1):
        reference = float(np.exp(nll[:, first_scored - 1:].mean()))
        ours = perplexity(model, windows, seqs_per_call=2, first_scored=first_scored)
        assert abs(ours / reference - 1) <= 1e-4, (first_scored, ours, reference)
    with pytest.raises(ValueError, match="first_scored"):
        perplexity(model, windows, first_scored=WINDOW)


def test_top_tokens_are_the_most_likely_next_tokens_given_the_window(model, hf_logits, windows):
    """At every position, our 5 ids are HF's 5 largest logits, best first (ties closer than 1e-3 in
    HF's logits may come in either order)."""
    ours = top_tokens(model, windows, 5, seqs_per_call=2)
    assert ours.shape == (NUM_WINDOWS, WINDOW - 1, 5) and ours.dtype == np.int32
    theirs = np.take_along_axis(hf_logits, ours.astype(np.int64), axis=-1)  # HF's logits of our picks
    best = -np.sort(-hf_logits, axis=-1)[..., :5]
    np.testing.assert_allclose(theirs, best, atol=1e-3)
    with pytest.raises(ValueError, match="windows must be"):
        top_tokens(model, windows[0], 5)


def test_token_windows_refuses_too_few_tokens():
    assert token_windows(list(range(10)), 5, 2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="need 12 tokens, got 10"):
        token_windows(list(range(10)), 4, 3)
