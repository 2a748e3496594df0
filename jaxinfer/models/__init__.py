"""The model for a checkpoint's architecture."""

from jaxinfer.config import ModelConfig
from jaxinfer.models.gemma3 import load_gemma3
from jaxinfer.models.llama import Llama
from jaxinfer.models.params import load_llama


def load_model(config: ModelConfig, checkpoint, **options) -> Llama:
    """The model `config.architecture` names, with the checkpoint's weights (`params.load_stacked`'s
    options). Gemma 3 is built like Llama (a subclass): the engine treats both alike."""
    loader = load_gemma3 if config.architecture == "gemma3" else load_llama
    return loader(config, checkpoint, **options)
