"""jaxinfer: an LLM inference engine on JAX/XLA."""

import logging
import os
import sys

# The one logger setup: the engine says what it is doing (model, dtype, pages, compile buckets) at
# INFO, on stderr, whether it runs under the server or in a notebook. JAXINFER_LOG_LEVEL changes it.
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner or notebook may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


_logger = logging.getLogger("jaxinfer")
if not _logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(os.environ.get("JAXINFER_LOG_LEVEL", "INFO").upper())
    _logger.propagate = False

from jaxinfer.config import EngineConfig, ModelConfig  # noqa: E402
from jaxinfer.engine import LLM, CompletionOutput, LLMEngine, RequestOutput  # noqa: E402
from jaxinfer.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineConfig", "ModelConfig", "RequestOutput", "CompletionOutput"]
