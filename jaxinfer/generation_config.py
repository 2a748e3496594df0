"""A model's own sampling defaults, as vLLM's `--generation-config auto` reads them: what a request
that leaves temperature, top_p, top_k, min_p or repetition_penalty out gets (Qwen3 asks for
temperature 0.6, top_p 0.95, top_k 20; Gemma 3 for top_k 64, top_p 0.95).

An HF directory gives them in `generation_config.json`; a GGUF file in its `general.sampling.*` keys,
which llama.cpp's convert_hf_to_gguf.py writes from that same file. `"vllm"` ignores them: every
default is `SamplingParams`'s own (OpenAI's: temperature 1, no truncation).
"""

import json
import logging
import math
import os

import numpy as np

logger = logging.getLogger("jaxinfer")

GENERATION_CONFIGS = ("auto", "vllm")
# SamplingParams field -> its key in generation_config.json and in GGUF metadata
FIELDS = {"temperature": ("temperature", "general.sampling.temp"),
          "top_p": ("top_p", "general.sampling.top_p"),
          "top_k": ("top_k", "general.sampling.top_k"),
          "min_p": ("min_p", "general.sampling.min_p"),
          "repetition_penalty": ("repetition_penalty", "general.sampling.penalty_repeat")}
# Values that ask for nothing, left out of the defaults (HF writes top_k 50 as its own default only
# when a model sets it, so it is kept).
_NEUTRAL = {"top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_defaults(checkpoint, generation_config: str = "auto") -> dict:
    """{SamplingParams field: value} from the checkpoint (`generation_config` "auto"), or {} ("vllm").
    Values out of SamplingParams' ranges are left out with a warning."""
    if generation_config not in GENERATION_CONFIGS:
        raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIGS)}, got {generation_config!r}")
    if generation_config == "vllm":
        return {}
    metadata = getattr(checkpoint, "metadata", None)
    if metadata is not None:  # GGUF
        # float32 in the file: 0.6 is read back as 0.6000000238..., given as the float32's shortest repr
        found = {name: float(str(np.float32(metadata[key]))) if isinstance(metadata[key], float) else metadata[key]
                 for name, (_, key) in FIELDS.items() if key in metadata}
        source = "the GGUF's general.sampling keys"
    else:
        path = os.path.join(checkpoint.path, "generation_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            values = json.load(f)
        found = {name: values[key] for name, (key, _) in FIELDS.items() if values.get(key) is not None}
        source = "generation_config.json"
    defaults = {}
    for name, value in found.items():
        value = _checked(name, value)
        if value is None:
            logger.warning("the model's %s gives %s = %r, which is not a valid value: ignored", source, name,
                           found[name])
        elif _NEUTRAL.get(name) != value:
            defaults[name] = value
    if defaults:
        logger.info("sampling defaults from %s (a request's own values win; --generation-config vllm: none): %s",
                    source, ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults


def _checked(name: str, value):
    """`value` as SamplingParams takes it, or None where it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if name == "top_k":
        return int(value) if value == int(value) and value >= -1 else None
    value = float(value)
    ok = {"temperature": value >= 0, "top_p": 0 < value <= 1, "min_p": 0 <= value <= 1,
          "repetition_penalty": value > 0}[name]
    return value if ok else None
