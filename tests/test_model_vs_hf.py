"""The Llama model on the paged cache against HF transformers (torch, float32) on the same GGUF weights."""

import pydoc_data.topics

import numpy as np
import pytest

from jaxinfer import SamplingParams
from tests.helpers import prefill_logits

NEW_TOKENS = 32
LONG_TEXT = pydoc_data.topics.topics["assert"][:1300]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water at sea level?"}],
    [{"role": "system", "content": "You are a pirate. Answer like one."},
     {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Summarize this documentation in one sentence:\n" + LONG_TEXT}],
]
PLAIN = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three primary colors:\n1.",
    LONG_TEXT + "\n\nIn short, the assert statement",
]


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    ids = [hf_tokenizer.encode(p) for p in PLAIN]
    ids += [hf_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in CHATS]
    ids = [list(map(int, p)) for p in ids]
    assert max(len(p) for p in ids) >= 280  # the long ones are ~300 tokens
    return ids


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    return hf_model.greedy(prompts, NEW_TOKENS)


def test_greedy_tokens_match_hf(llm, prompts, hf_greedy):
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, hf_greedy):
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"


def test_last_position_logits_match_hf(llm, hf_model, prompts):
    some = [prompts[0], prompts[3], prompts[-1]]
    for p, ref in zip(some, hf_model.last_logits(some)):
        ours = prefill_logits(llm.engine.model, p)
        assert np.abs(ours - ref).max() <= 1e-3
