"""jaxinfer.evaluate.perplexity against its definition, computed independently: HF transformers' logits
after each prefix of each window, a NumPy log-softmax, exp of the mean cross-entropy."""

import numpy as np
import pydoc_data.topics
import pytest

from jaxinfer.evaluate import perplexity, token_windows
from jaxinfer.models.llama import load_llama
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


def test_perplexity_is_exp_of_the_mean_next_token_cross_entropy(smollm2_path, hf_model, windows):
    """Reference: token t of a window scored from HF's logits after tokens 0 .. t-1 of that window
    alone (t = 1 .. n-1), natural log, exp of the mean over all windows' scored positions; with
    first_scored (llama-perplexity's second half of each window), only t = first_scored .. n-1."""
    nll = []  # [windows, n - 1]: position t's cross-entropy at column t - 1
    for w in windows:
        prefixes = [list(map(int, w[:t])) for t in range(1, WINDOW)]
        logp = log_softmax(np.asarray(hf_model.last_logits(prefixes), np.float64))  # [n - 1, vocab]
        nll.append(-logp[np.arange(WINDOW - 1), w[1:]])
    nll = np.asarray(nll)

    checkpoint = GGUFCheckpoint(smollm2_path)  # the same file HF loads, full precision
    model = load_llama(checkpoint.config, checkpoint)
    for first_scored in (1, WINDOW // 2 + 1):
        reference = float(np.exp(nll[:, first_scored - 1:].mean()))
        ours = perplexity(model, windows, seqs_per_call=2, first_scored=first_scored)
        assert abs(ours / reference - 1) <= 1e-4, (first_scored, ours, reference)
    with pytest.raises(ValueError, match="first_scored"):
        perplexity(model, windows, first_scored=WINDOW)


def test_token_windows_refuses_too_few_tokens():
    assert token_windows(list(range(10)), 5, 2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="need 12 tokens, got 10"):
        token_windows(list(range(10)), 4, 3)
