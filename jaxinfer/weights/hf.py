"""Hugging Face checkpoint directories: `config.json` plus safetensors (one file or sharded).

A checkpoint quantized by its producer (AWQ, GPTQ, compressed-tensors, FP8) says so in config.json's
`quantization_config`; its projections are read in the engine's formats by `quantized_tensor`
(`jaxinfer.weights.quantized`), never as full precision.
"""

import json
import logging
import os

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxinfer.config import ModelConfig
from jaxinfer.weights import quantized

logger = logging.getLogger("jaxinfer")

# Dtypes safetensors' numpy reader does not know (numpy has no float8): read from the file's bytes.
_RAW_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


class HFCheckpoint:
    def __init__(self, path: str):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
        with open(config_path) as f:
            raw_config = json.load(f)
        self.config = ModelConfig.from_hf(raw_config, name=os.path.basename(os.path.normpath(path)))
        try:
            self.quantization = quantized.detect(raw_config.get("quantization_config"))
        except quantized.UnsupportedQuantization as e:
            raise quantized.UnsupportedQuantization(f"{path}: {e}") from None
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
        self._headers = {}
        logger.info("model %s: Hugging Face checkpoint, %s, %d layers, %d tensors in %d files%s", path,
                    self.config.architecture, self.config.num_layers, len(weight_map), len(set(weight_map.values())),
                    f"; quantized: {self.quantization.description}" if self.quantization else "")

    def has(self, hf_name: str) -> bool:
        return hf_name in self._weight_map

    def tensor(self, hf_name: str) -> np.ndarray:
        """The tensor `hf_name` as stored (HF orientation, its own dtype: bf16 stays bf16)."""
        file = self._weight_map.get(hf_name)
        if file is None:
            prefix = hf_name.removesuffix(".weight")
            if self.quantization is not None and self._is_quantized(prefix):
                raise quantized.UnsupportedQuantization(
                    f"{self.path}: {prefix} is stored quantized ({self.quantization.description}), and this load "
                    "asked for it in full precision (a projection whose layers are not all in one format?)")
            raise KeyError(f"{self.path}: tensor {hf_name} is missing")
        header = self._header(file)[hf_name]
        if header["dtype"] in _RAW_DTYPES:
            return self._raw_tensor(file, header)
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework="numpy")
        return self._open[file].get_tensor(hf_name)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        file = self._weight_map.get(hf_name)
        if file is None:
            raise KeyError(f"{self.path}: tensor {hf_name} is missing")
        return tuple(self._header(file)[hf_name]["shape"])

    def _header(self, file: str) -> dict:
        """The safetensors header of `file`: name -> {"dtype", "shape", "data_offsets"}."""
        if file not in self._headers:
            with open(os.path.join(self.path, file), "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[file] = (json.loads(f.read(size)), 8 + size)
        return self._headers[file][0]

    def _raw_tensor(self, file: str, header: dict) -> np.ndarray:
        start, end = header["data_offsets"]
        with open(os.path.join(self.path, file), "rb") as f:
            f.seek(self._headers[file][1] + start)
            data = f.read(end - start)
        return np.frombuffer(data, _RAW_DTYPES[header["dtype"]]).reshape(header["shape"])

    # --- quantized checkpoints (`jaxinfer.weights.quantized`) -------------------------------------

    def _is_quantized(self, prefix: str) -> bool:
        return self.has(f"{prefix}.{self.quantization.stored_names(prefix)[0]}") and (
            self.quantization.kind not in ("ct-float", "fp8")
            or self.has(f"{prefix}.{self.quantization.stored_names(prefix)[1]}"))

    def native_format(self, hf_name: str):
        """The engine format that the projection weight `hf_name` is stored in (None: full precision)."""
        prefix = hf_name.removesuffix(".weight")
        if self.quantization is None or not self._is_quantized(prefix):
            return None
        k, _ = quantized.projection_shape(self.quantization, self.shape, prefix)
        return self.quantization.weight_format(k)

    def quantized_tensor(self, hf_name: str) -> dict:
        """{"data", "scales"(, "mins")}: the weight `hf_name` in its `native_format`, as [K, N]."""
        return quantized.read_projection(self.quantization, self.tensor, self.shape, hf_name.removesuffix(".weight"))
