"""jaxinfer: an LLM inference engine on JAX/XLA."""

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine import LLM, CompletionOutput, LLMEngine, RequestOutput
from jaxinfer.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineConfig", "ModelConfig", "RequestOutput", "CompletionOutput"]
