"""Hugging Face checkpoint directories: `config.json` plus safetensors (one file or sharded)."""

import json
import logging
import os

import numpy as np
from safetensors import safe_open

from jaxinfer.config import ModelConfig

logger = logging.getLogger("jaxinfer")


class HFCheckpoint:
    def __init__(self, path: str):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
        with open(config_path) as f:
            self.config = ModelConfig.from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)))
        self.path = path
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no .safetensors files")
            weight_map = {}
            for file in files:
                with safe_open(os.path.join(path, file), framework="numpy") as f:
                    weight_map.update({name: file for name in f.keys()})
        self._weight_map = weight_map
        self._open = {}
        logger.info("model %s: Hugging Face checkpoint, %s, %d layers, %d tensors in %d files", path,
                    self.config.architecture, self.config.num_layers, len(weight_map), len(set(weight_map.values())))

    def has(self, hf_name: str) -> bool:
        return hf_name in self._weight_map

    def tensor(self, hf_name: str) -> np.ndarray:
        """The tensor `hf_name` as stored (HF orientation, its own dtype: bf16 stays bf16)."""
        file = self._weight_map.get(hf_name)
        if file is None:
            raise KeyError(f"{self.path}: tensor {hf_name} is missing")
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework="numpy")
        return self._open[file].get_tensor(hf_name)
