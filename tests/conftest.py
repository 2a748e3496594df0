"""Shared fixtures: the bundled model, its HF transformers reference, and engines built once per session."""

import importlib.metadata
import os

import pytest

from jaxinfer.weights import resolve_model_path

SMOLLM2 = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return resolve_model_path(SMOLLM2)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))


@pytest.fixture(scope="session")
def hf_model(smollm2_path):
    """The reference: HF transformers (torch, CPU, float32) loading the same GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_model, hf_tokenizer):
    """The bundled model as a Hugging Face directory (safetensors + config + tokenizer), made by transformers."""
    import copy

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("smollm2-hf")
    # A GGUF-loaded model refuses save_pretrained (its config says "quantized with gguf"): copy its
    # dequantized weights into a plain model of the same config first.
    config = copy.deepcopy(hf_model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(path, safe_serialization=True, max_shard_size="200MB")  # sharded: 3 files + index
    hf_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llm():
    """The engine most tests share: float32 weights and activations (quantization "none": the HF
    reference runs the same dequantized weights), page_size 16."""
    from jaxinfer import LLM

    return LLM(SMOLLM2, max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512, quantization="none")
