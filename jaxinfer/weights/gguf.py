"""GGUF checkpoints: metadata, config and tensors, read through the `gguf` package.

Tensors are handed out by their Hugging Face names in HF orientation (`[out_features, in_features]`),
so one parameter mapping per model serves both checkpoint formats. llama.cpp stores the rows of
`attn_q`/`attn_k` permuted for its interleaved RoPE; they are permuted back here, so the model uses
HF's rotate-half RoPE for both formats. (Only the "llama" architecture is permuted; Qwen2 is not.)
"""

import logging
import os

import numpy as np
from gguf import GGUFReader, MODEL_ARCH_NAMES, get_tensor_name_map
from gguf.quants import dequantize

from jaxinfer.config import LLAMA_FAMILY, ModelConfig, UnsupportedModelError

logger = logging.getLogger("jaxinfer")

_ARCH_BY_NAME = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}


class GGUFCheckpoint:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the gguf package raises ValueError/struct.error/... on bad files
            raise ValueError(f"{path} is not a valid GGUF file: {e}") from e
        self.path = path
        self.metadata = {}
        for key, field in self.reader.fields.items():
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                       "tokenizer.ggml.scores"):
                continue  # large arrays: the tokenizer reads them itself
            try:
                self.metadata[key] = field.contents()
            except Exception:  # a field of a type the reader cannot decode: not one we use
                continue
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.metadata.get("general.architecture", "")
        if arch not in LLAMA_FAMILY or arch not in _ARCH_BY_NAME:
            raise UnsupportedModelError(
                f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(LLAMA_FAMILY)}")
        if "rope_freqs.weight" in self.tensors:
            factors = tuple(float(f) for f in self._read("rope_freqs.weight"))
        else:
            factors = None
        name = os.path.basename(path)
        self.config = ModelConfig.from_gguf(
            self.metadata, has_output_tensor="output.weight" in self.tensors, rope_freq_factors=factors, name=name)
        self._names = get_tensor_name_map(_ARCH_BY_NAME[arch], self.config.num_layers)
        logger.info("GGUF %s: %s, %d tensors, file type %s", path, arch, len(self.tensors),
                    self.metadata.get("general.file_type"))

    def gguf_name(self, hf_name: str) -> str:
        base, _, suffix = hf_name.rpartition(".")
        mapped = self._names.get_name(base)
        if mapped is None:
            raise KeyError(f"no GGUF tensor for {hf_name}")
        return f"{mapped}.{suffix}"

    def has(self, hf_name: str) -> bool:
        return self.gguf_name(hf_name) in self.tensors

    def tensor_type(self, hf_name: str) -> str:
        return self.tensors[self.gguf_name(hf_name)].tensor_type.name

    def _read(self, gguf_name: str) -> np.ndarray:
        t = self.tensors[gguf_name]
        # GGUF lists dims innermost first; the dequantized array comes out in row-major (HF) order.
        shape = tuple(int(d) for d in reversed(t.shape))
        return dequantize(t.data, t.tensor_type).reshape(shape)

    def tensor(self, hf_name: str) -> np.ndarray:
        """The tensor `hf_name` in HF orientation, dequantized to float32."""
        gguf_name = self.gguf_name(hf_name)
        if gguf_name not in self.tensors:
            raise KeyError(f"{self.path}: tensor {gguf_name} ({hf_name}) is missing")
        w = self._read(gguf_name).astype(np.float32, copy=False)
        cfg = self.config
        if cfg.architecture != "llama":  # only llama.cpp's "llama" converter permutes (Qwen2 uses NeoX RoPE)
            return w
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rope_rows(w, cfg.num_heads)
        elif gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rope_rows(w, cfg.num_kv_heads)
        return w


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q/k (interleaved pairs -> two halves)."""
    if w.ndim == 1:
        return w.reshape(num_heads, -1, 2).swapaxes(1, 2).reshape(w.shape)
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
