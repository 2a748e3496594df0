"""jaxinfer: an LLM inference engine on JAX/XLA.

Importing it changes nothing process-wide. The engine logs what it is doing (model, dtype, pages,
compile buckets) at INFO on the "jaxinfer" logger, which propagates and has no handler of its own:
an application shows those lines by configuring logging (`logging.basicConfig(level="INFO")`, as
`jaxinfer serve` does); without that, Python still prints WARNINGs and above on stderr. JAX's
persistent compilation cache is for the application to turn on too (`jaxinfer serve` does):
`jaxinfer.compilation.enable_compilation_cache()`.
"""

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine import LLMEngine
from jaxinfer.offline import LLM
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "ModelConfig",
           "RequestOutput", "CompletionOutput"]
