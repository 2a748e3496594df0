"""Our tokenizer (built from GGUF metadata, chat templates rendered by our Jinja setup) against transformers'."""

import pytest

from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: café, naïve, 東京, Ελληνικά, emoji 🙂🚀 and a zero-width\u200bjoiner.",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
     {"role": "user", "content": "Another one, in 日本語?"}],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_round_trips(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, conversation, add_generation_prompt):
    ours = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    ref = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == ref
    ref_ids = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                               tokenize=True, return_dict=False)
    assert tokenizer.encode_chat(conversation, add_generation_prompt) == list(ref_ids)


def test_tokenizer_from_hf_dir_matches_gguf(tokenizer, hf_dir):
    from_dir = Tokenizer.from_hf_dir(hf_dir)
    for text in TEXTS:
        assert from_dir.encode(text) == tokenizer.encode(text)
    assert from_dir.apply_chat_template(CONVERSATIONS[1]) == tokenizer.apply_chat_template(CONVERSATIONS[1])
    assert from_dir.eos_token_ids == tokenizer.eos_token_ids


def test_incremental_detokenization_never_splits_characters(tokenizer):
    # Emoji and CJK are several tokens per character in a byte-level BPE: partial bytes must be held back.
    text = "Voilà 🙂🚀 東京タワー — done."
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Prompt:"))
    deltas = [detok.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were incomplete characters
