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
    path = tmp_path_factory.mktemp("smollm2-hf")
    hf_model.save_pretrained(path, safe_serialization=True)
    hf_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llm():
    """The engine most tests share: float32 on CPU, page_size 16."""
    from jaxinfer import LLM

    return LLM(SMOLLM2, max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512)
