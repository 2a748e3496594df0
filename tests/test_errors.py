"""Bad models and bad arguments raise errors that name the problem."""

import json

import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.api import protocol
from jaxinfer.api.protocol import APIError
from jaxinfer.config import UnsupportedModelError
from jaxinfer.weights import open_checkpoint


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        open_checkpoint(str(missing))


def test_unknown_model_name_lists_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match="unknown model 'not-a-model'.*SmolLM2-135M-Instruct"):
        LLM("not-a-model")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        open_checkpoint(str(tmp_path))


def test_corrupt_gguf_is_reported_as_such(tmp_path, smollm2_path):
    bad = tmp_path / "corrupt.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(4096))  # a valid header, truncated mid-metadata
    with pytest.raises(ValueError, match="corrupt.gguf is not a valid GGUF file"):
        open_checkpoint(str(bad))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match="garbage.gguf is not a valid GGUF file"):
        open_checkpoint(str(garbage))


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_checkpoint(str(tmp_path))


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"min_p": 2}, "min_p"), ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"), ({"stop": ["x" * 257]}, "stop"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids"), ({"stop_token_ids": 5}, "stop_token_ids"),
    # float32 holds these parameters on the device: an infinite or NaN value, or one past its range, is refused
    ({"temperature": float("inf")}, "temperature"), ({"temperature": 1e39}, "temperature"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"), ({"repetition_penalty": 1e300}, "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("body, param", [
    ({"stop": ["x" * 257]}, "stop"), ({"stop_token_ids": list(range(257))}, "stop_token_ids")])
def test_the_api_answers_stop_bounds_with_400_naming_the_field(body, param):
    with pytest.raises(APIError) as raised:
        protocol.parse_completion_request({"prompt": "hi", **body})
    assert (raised.value.status, raised.value.param) == (400, param)


def test_prompt_longer_than_max_model_len_is_rejected_without_leaking_pages(llm):
    free = llm.engine.allocator.num_free_pages
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["word " * 2000], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(["hello"], SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len"):  # the first prompt was admitted: it must not linger
        llm.generate(["fine", "word " * 2000], SamplingParams(max_tokens=4))
    assert llm.engine.allocator.num_free_pages == free
    assert not llm.engine.has_unfinished_requests()


def test_out_of_int32_seed_and_top_k_are_accepted(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2, temperature=1.0, seed=2**40, top_k=2**40),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_vllm_prompt_forms_give_the_same_tokens(llm):
    text = "The capital of France is"
    ids = llm.tokenizer.encode(text)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    outs = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}, ids], params, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    single = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)  # one dict, not in a list
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


@pytest.mark.parametrize("prompts, message", [
    ({"text": "hi"}, r"exactly one of 'prompt' or 'prompt_token_ids'.*\['text'\]"),
    ([{"prompt": "hi", "prompt_token_ids": [1]}], "exactly one of"),
    ([{"prompt": 5}], "'prompt' must be a str"),
    ([{"prompt_token_ids": "1 2 3"}], "'prompt_token_ids' must be a list of ints"),
    (["ok", 3.5], "prompt 1: a prompt is a str"),
    (42, "got int"),
])
def test_wrong_prompt_form_is_named(llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
