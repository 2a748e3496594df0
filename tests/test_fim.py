"""Completions' `suffix`: fill in the middle with a code model's own tokens (Qwen2.5-Coder's
<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>), through the official `openai` client against
conftest.py's `served_qwen` server. The prompt the server builds is checked against the ids
transformers' tokenizer gives for the spelled-out infill text."""

import httpx
import pytest

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


def test_suffix_fills_the_middle_and_the_models_end_of_file_token_ends_it(served_qwen, qwen_hf_tokenizer):
    client = served_qwen.client
    answer = client.completions.create(model="qwen", prompt=PREFIX, suffix=SUFFIX, max_tokens=48, temperature=0)
    choice = answer.choices[0]
    assert choice.text.startswith("a + b")
    # Qwen2.5-Coder ends a middle with <|endoftext|>, not the file's EOS (<|im_end|>, its chat's): both end
    # generation, as its generation_config.json and llama.cpp say (without that it runs to max_tokens).
    assert choice.finish_reason == "stop"
    tokenizer = served_qwen.engine.tokenizer
    token_id = {token: qwen_hf_tokenizer.encode(token)[0] for token in ("<|endoftext|>", "<|im_end|>", "<|fim_pad|>",
                                                                        "<|repo_name|>", "<|file_sep|>")}
    assert set(tokenizer.eos_token_ids) == {token_id["<|endoftext|>"], token_id["<|im_end|>"]}
    assert tokenizer.fim_stop_token_ids == sorted(token_id[t] for t in ("<|fim_pad|>", "<|repo_name|>",
                                                                       "<|file_sep|>"))
    # The same prompt spelled out and tokenized by transformers.
    ids = qwen_hf_tokenizer.encode(f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>")
    assert answer.usage.prompt_tokens == len(ids)
    spelled = client.completions.create(model="qwen", prompt=ids, max_tokens=48, temperature=0)
    assert spelled.choices[0].text == choice.text and spelled.usage == answer.usage
    assert spelled.choices[0].finish_reason == "stop"
    # Token-id prompts take a suffix too; "" asks for no infill.
    as_ids = client.completions.create(model="qwen", prompt=qwen_hf_tokenizer.encode(PREFIX), suffix=SUFFIX,
                                       max_tokens=48, temperature=0)
    assert as_ids.choices[0].text == choice.text
    plain = client.completions.create(model="qwen", prompt=PREFIX, suffix="", max_tokens=4, temperature=0)
    assert plain.usage.prompt_tokens == len(qwen_hf_tokenizer.encode(PREFIX))


def test_suffix_is_refused_where_it_cannot_apply(served, served_qwen):
    for url, body in [(served.url, {"model": "smol", "prompt": PREFIX, "suffix": SUFFIX}),  # SmolLM2: no FIM tokens
                      (served_qwen.url, {"model": "qwen", "prompt": PREFIX, "suffix": SUFFIX, "echo": True}),
                      (served_qwen.url, {"model": "qwen", "prompt": PREFIX, "suffix": 7})]:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "suffix"
