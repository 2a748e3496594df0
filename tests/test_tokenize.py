"""POST /tokenize and /detokenize (vLLM's shapes) against the live `served` server; the references are
the engine's own tokenizer (what a generation request is encoded with) and transformers' tokenizer of
the same GGUF file."""

import httpx
import pytest
from helpers import CHAT, NAME

TEXT = "Unicode: café, 東京 🙂 and\nnewlines  "


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body)


def test_a_prompt_is_the_engines_and_transformers_encoding(served, hf_tokenizer):
    answer = post(served, "/tokenize", {"model": NAME, "prompt": TEXT}).json()
    assert answer["tokens"] == served.engine.tokenizer.encode(TEXT) == hf_tokenizer.encode(TEXT)
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == served.engine.config.max_model_len
    assert "token_strs" not in answer


def test_add_special_tokens_false_is_the_bare_encoding(served):
    answer = post(served, "/tokenize", {"prompt": TEXT, "add_special_tokens": False}).json()
    assert answer["tokens"] == served.engine.tokenizer.encode(TEXT, add_special_tokens=False)


def test_token_strs_are_the_vocabularys_pieces(served, hf_tokenizer):
    answer = post(served, "/tokenize", {"prompt": TEXT, "return_token_strs": True}).json()
    assert answer["token_strs"] == hf_tokenizer.convert_ids_to_tokens(answer["tokens"])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_messages_are_the_chat_templates_rendering(served, hf_tokenizer, add_generation_prompt):
    messages = [{"role": "system", "content": "Be terse."}, *CHAT]
    answer = post(served, "/tokenize", {"messages": messages, "add_generation_prompt": add_generation_prompt}).json()
    assert answer["tokens"] == served.engine.tokenizer.encode_chat(messages, add_generation_prompt)
    assert answer["tokens"] == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)


def test_messages_tokenize_to_the_chat_routes_prompt_tokens(served):
    answer = post(served, "/tokenize", {"messages": CHAT}).json()
    chat = served.client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1)
    assert answer["count"] == chat.usage.prompt_tokens


def test_detokenize_inverts_tokenize(served):
    tokens = post(served, "/tokenize", {"prompt": TEXT}).json()["tokens"]
    answer = post(served, "/detokenize", {"model": NAME, "tokens": tokens}).json()
    assert answer == {"prompt": served.engine.tokenizer.decode(tokens, skip_special_tokens=False)}
    assert answer["prompt"].endswith(TEXT)


def test_detokenize_keeps_special_tokens(served):
    tokens = post(served, "/tokenize", {"messages": CHAT}).json()["tokens"]
    text = post(served, "/detokenize", {"tokens": tokens}).json()["prompt"]
    assert text == served.engine.tokenizer.apply_chat_template(CHAT)


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "hello"}, "tokens"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, None),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
])
def test_a_bad_request_is_an_openai_shaped_400(served, path, body, param):
    response = post(served, path, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_an_unknown_model_is_404(served):
    response = post(served, "/tokenize", {"model": "nope", "prompt": "hi"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
