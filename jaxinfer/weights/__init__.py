"""From a model name or path to an open checkpoint.

A name the registry knows (`jaxinfer.registry`: `jaxinfer pull NAME`) resolves to its file; anything
else is a path to a GGUF file or to a Hugging Face directory (config.json + safetensors).
"""

import os

from jaxinfer.registry import DEFAULT_MODEL, MODELS, installed_path, lookup
from jaxinfer.weights.gguf import GGUFCheckpoint
from jaxinfer.weights.hf import HFCheckpoint

__all__ = ["DEFAULT_MODEL", "open_checkpoint", "resolve_model_path"]


def resolve_model_path(model: str) -> str:
    """The file or directory that `model` names. A path that exists wins over a model name."""
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return path
    entry = lookup(model)
    if entry is not None:
        found = installed_path(entry)
        if found is None:
            raise FileNotFoundError(f"model {model!r} is not on this machine; fetch it with `jaxinfer pull {entry.name}`")
        return found
    raise FileNotFoundError(f"unknown model {model!r}: not a known model name ({', '.join(MODELS)}; `jaxinfer list` "
                            "shows them) and no such GGUF file or model directory")


def open_checkpoint(model: str) -> GGUFCheckpoint | HFCheckpoint:
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return HFCheckpoint(path)
    return GGUFCheckpoint(path)
