"""The model's own sampling defaults (vLLM's `--generation-config auto`): read from an HF directory's
generation_config.json and from a GGUF's general.sampling keys (written here with the gguf package's
own writer), applied to what a request leaves out, offline and on the server; `vllm` turns them off.

A tiny random Llama; its defaults include top_k 1, so a request that leaves top_k out decodes
greedily: its tokens must equal a temperature-0 request's (a random model's sampled tokens at
temperature 0.5 and no top-k would not: its top two logits are close).
"""

import json
import logging

import anthropic
import httpx
import openai
import pytest
from helpers import live_server
from test_architectures_vs_hf import BASE, write_gguf
from tp_worker import write_random_llama

from jaxinfer import LLM, SamplingParams
from jaxinfer.api import create_app
from jaxinfer.async_engine import AsyncLLMEngine
from jaxinfer.generation_config import sampling_defaults
from jaxinfer.weights.gguf import GGUFCheckpoint
from jaxinfer.weights.hf import HFCheckpoint

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, warmup=False, weight_cache_dir=None)
# Qwen3's own generation_config.json but for top_k (20 there)
GENERATION_CONFIG = {"bos_token_id": 1, "do_sample": True, "eos_token_id": [2], "temperature": 0.5, "top_p": 0.95,
                     "top_k": 1, "transformers_version": "4.51.0"}
DEFAULTS = {"temperature": 0.5, "top_p": 0.95, "top_k": 1}
PROMPTS = [[5, 60, 7, 200, 31, 9], [100, 3, 250, 77, 12]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_random_llama(str(tmp_path_factory.mktemp("generation-config")), {})
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump(GENERATION_CONFIG, f)
    with open(f"{path}/tokenizer_config.json", "w") as f:  # for the Responses API, which renders messages
        json.dump({"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, f)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, quantization="none", **ENGINE)


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_the_defaults_are_read_from_generation_config_json(model_dir):
    assert sampling_defaults(HFCheckpoint(model_dir)) == DEFAULTS
    assert sampling_defaults(HFCheckpoint(model_dir), "vllm") == {}
    with pytest.raises(ValueError, match="generation_config must be one of auto, vllm"):
        sampling_defaults(HFCheckpoint(model_dir), "model")


def test_the_defaults_are_read_from_a_ggufs_sampling_keys(model_dir, tmp_path, caplog):
    config = BASE | {"hidden_size": 64, "intermediate_size": 128}
    path = write_gguf(tmp_path / "m.gguf", "llama", config, __import__("pathlib").Path(model_dir),
                      sampling={"temp": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "penalty_repeat": 1.1})
    # min_p 0 asks for nothing and is left out; the float32 values come back as written
    assert sampling_defaults(GGUFCheckpoint(path)) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95,
                                                       "repetition_penalty": 1.1}
    bad = write_gguf(tmp_path / "bad.gguf", "llama", config, __import__("pathlib").Path(model_dir),
                     sampling={"temp": 0.6, "top_p": 1.5})
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        assert sampling_defaults(GGUFCheckpoint(bad)) == {"temperature": 0.6}
    assert "top_p = 1.5" in caplog.text


def test_offline_generate_without_sampling_params_uses_the_models_defaults(llm, model_dir):
    assert llm.get_default_sampling_params() == SamplingParams(**DEFAULTS)
    greedy = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                 SamplingParams(temperature=0, max_tokens=16), use_tqdm=False))
    assert tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)) == greedy
    # Preconditions: without the model's top_k the same temperature samples other tokens.
    sampled = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                  SamplingParams(temperature=0.5, max_tokens=16, seed=1), use_tqdm=False))
    assert sampled != greedy
    plain = LLM(model_dir, quantization="none", generation_config="vllm", **ENGINE)
    assert plain.get_default_sampling_params() == SamplingParams()


def test_the_server_applies_the_defaults_to_what_a_request_leaves_out(llm):
    greedy = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                 SamplingParams(temperature=0, max_tokens=16), use_tqdm=False))
    engine = AsyncLLMEngine(llm.engine).start()
    try:
        with live_server(create_app(engine, served_model_name="tiny")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for prompt, expected in zip(PROMPTS, greedy):
                answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=16)
                assert answer.choices[0].text == llm.tokenizer.decode(expected)
            # Anthropic's Messages API: a request without temperature samples under the model's top_k 1.
            messages = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages
            question = [{"role": "user", "content": "hi there"}]
            texts = [messages.create(model="tiny", max_tokens=12, messages=question, **extra).content[0].text
                     for extra in ({"extra_body": {"temperature": 0}}, {}, {})]
            assert texts[1] == texts[2] == texts[0]
            # The Responses API echoes the sampling fields it used: the model's, or the request's own.
            echo = httpx.post(f"{url}/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2},
                              timeout=60).json()
            assert (echo["temperature"], echo["top_p"]) == (0.5, 0.95)
            echo = httpx.post(f"{url}/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2,
                                                           "temperature": 0.0, "top_p": 1.0}, timeout=60).json()
            assert (echo["temperature"], echo["top_p"]) == (0.0, 1.0)
    finally:
        engine.shutdown()
