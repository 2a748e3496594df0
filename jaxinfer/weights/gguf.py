"""GGUF checkpoints: metadata, config and tensors, read through the `gguf` package.

Tensors are handed out by their Hugging Face names in HF orientation (`[out_features, in_features]`),
so one parameter mapping per model serves both checkpoint formats. llama.cpp stores the rows of
`attn_q`/`attn_k` permuted for its interleaved RoPE; they are permuted back here, so the model uses
HF's rotate-half RoPE for both formats. (Only the "llama" architecture is permuted; Qwen2 and Gemma 3
are not.) llama.cpp stores Gemma's RMSNorm weights as HF's weight + 1 (the factor the norm applies);
they are handed out as HF stores them, as transformers' own GGUF loader does.

Q8_0, Q4_0 and Q4_1 tensors can also be handed out as they are stored (`quantized_tensor`): the same
integers, scales and mins, only rearranged into `kernels_pallas.quant_matmul`'s [in, out] layouts;
Q4_K in Q4_1's form (below); K-quants as stored too (`kquant_tensor`, for `jaxinfer.kquant`).
"""

import logging
import os

import numpy as np
from gguf import GGUFReader, LlamaFileType, MODEL_ARCH_NAMES, get_tensor_name_map
from gguf.quants import dequantize

from jaxinfer import kquant
from jaxinfer.config import ARCHITECTURES, ModelConfig, UnsupportedModelError
from jaxinfer.quant import WeightFormat

logger = logging.getLogger("jaxinfer")

_ARCH_BY_NAME = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
# GGUF block types that map onto our formats (blocks of 32 weights along the input dim): Q8_0, Q4_0
# and Q4_1 bit for bit. Q4_K is w = (d * sc) * code - dmin * m per 32 weights, Q4_1's form with a
# scale and min made of two factors each: its codes are kept and the products rounded once to
# float16 (5 bits a weight where int8 would take 8; within 2^-11 of a factor: `quantized_tensor`).
# This is how the paths without the native K-quant kernel (GPUs, tensor parallelism) keep Q4_K.
NATIVE_FORMATS = {"Q8_0": WeightFormat("int8", 32), "Q4_0": WeightFormat("int4", 32, symmetric=True),
                  "Q4_1": WeightFormat("int4", 32, symmetric=False), "Q4_K": WeightFormat("int4", 32, symmetric=False)}


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
        if arch not in ARCHITECTURES or arch not in _ARCH_BY_NAME:
            raise UnsupportedModelError(
                f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if "rope_freqs.weight" in self.tensors:
            factors = tuple(float(f) for f in self._read("rope_freqs.weight"))
        else:
            factors = None
        name = os.path.basename(path)
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        self.config = ModelConfig.from_gguf(
            self.metadata, has_output_tensor="output.weight" in self.tensors, rope_freq_factors=factors, name=name,
            num_tokens=len(tokens.data) if tokens is not None else 0)
        self._names = get_tensor_name_map(_ARCH_BY_NAME[arch], self.config.num_layers)
        logger.info("model %s: GGUF, %s, %d layers, %d tensors, file type %s", path, arch, self.config.num_layers,
                    len(self.tensors), _file_type(self.metadata.get("general.file_type")))

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

    def native_format(self, hf_name: str) -> WeightFormat | None:
        """The format `quantized_tensor` gives for this tensor; None when it must be dequantized."""
        return NATIVE_FORMATS.get(self.tensor_type(hf_name))

    def quantized_tensor(self, hf_name: str) -> dict[str, np.ndarray]:
        """A Q8_0/Q4_0/Q4_1/Q4_K matrix, transposed to W[in, out]: {"data", "scales"(, "mins")}.

        Q8_0 -> int8 [in, out] with float16 scales [in // 32, out]; Q4_0/Q4_1 -> uint8 [in // 2, out]
        (low nibble = even row) with float16 scales (and mins) [in // 32, out]. Q4_K -> Q4_1's
        arrays: the codes as stored, scale d * sc and min -(dmin * m) of each 32 rounded to float16.
        """
        gguf_name = self.gguf_name(hf_name)
        t = self.tensors[gguf_name]
        kind = t.tensor_type.name
        if kind not in NATIVE_FORMATS:
            raise ValueError(f"{gguf_name} is {kind}, not one of {tuple(NATIVE_FORMATS)}")
        if kind == "Q4_K":
            return _q4_k_as_q4_1(self.kquant_tensor(hf_name))  # rows un-permuted there
        rows, cols = (int(d) for d in reversed(t.shape))  # [out, in]
        blocks = np.asarray(t.data).reshape(rows, cols // 32, -1)  # [out, in // 32, bytes per block]
        scales = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [out, in // 32]
        if kind == "Q8_0":
            q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
            mins = None
        else:
            mins = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else None
            packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]  # [out, in // 32, 16]
            # A block holds element j in the low nibble of byte j and element j + 16 in its high nibble.
            q = np.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(rows, cols)
        arrays = {"data": q, "scales": scales} | ({} if mins is None else {"mins": mins})
        if self.config.architecture == "llama":  # output rows hold whole blocks: permuting them is exact
            heads = {"attn_q.weight": self.config.num_heads, "attn_k.weight": self.config.num_kv_heads}
            for suffix, num_heads in heads.items():
                if gguf_name.endswith(suffix):
                    arrays = {k: _unpermute_rope_rows(v, num_heads) for k, v in arrays.items()}
        arrays = {k: np.ascontiguousarray(v.T) for k, v in arrays.items()}  # [in..., out]
        if kind != "Q8_0":
            arrays["data"] = arrays["data"][0::2] | (arrays["data"][1::2] << 4)  # as pack_int4
        return arrays

    def kquant_tensor(self, hf_name: str) -> dict[str, np.ndarray]:
        """A Q4_K/Q5_K/Q6_K matrix's codes and factors as stored (`kquant.decode_blocks`), rows
        (output channels) first."""
        gguf_name = self.gguf_name(hf_name)
        t = self.tensors[gguf_name]
        kind = t.tensor_type.name
        if kind not in kquant.TYPES:
            raise ValueError(f"{gguf_name} is {kind}, not one of {tuple(kquant.TYPES)}")
        rows = int(t.shape[-1])
        parts = kquant.decode_blocks(np.asarray(t.data).reshape(rows, -1), kind)
        if self.config.architecture == "llama":  # output rows hold whole super-blocks: permuting them is exact
            heads = {"attn_q.weight": self.config.num_heads, "attn_k.weight": self.config.num_kv_heads}
            for suffix, num_heads in heads.items():
                if gguf_name.endswith(suffix):
                    parts = {k: _unpermute_rope_rows(v, num_heads) for k, v in parts.items()}
        return parts

    def raw_rows(self, hf_name: str) -> np.ndarray:
        """A matrix's bytes as stored, [rows, bytes a row] uint8 (rows: output channels or vocabulary
        entries); not un-permuted (for the embedding, which is not)."""
        t = self.tensors[self.gguf_name(hf_name)]
        return np.asarray(t.data).reshape(int(t.shape[-1]), -1)

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
        if cfg.architecture == "gemma3" and gguf_name.endswith("norm.weight"):
            return w - 1.0  # llama.cpp's convert_hf_to_gguf.py adds 1 to every Gemma norm weight
        if cfg.architecture != "llama":  # only llama.cpp's "llama" converter permutes (Qwen2 uses NeoX RoPE)
            return w
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rope_rows(w, cfg.num_heads)
        elif gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rope_rows(w, cfg.num_kv_heads)
        return w


def _q4_k_as_q4_1(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`kquant.decode_blocks`' Q4_K arrays (rows first) -> `quantized_tensor`'s int4 arrays [in, out].

    gguf computes each weight as float32(d * sc) * code - float32(dmin * m); rounding the two
    products to float16 changes a weight by at most 15 half-ulps of the scale plus one of the min.
    """
    d = np.repeat(parts["d"].astype(np.float32), kquant.SUPER // kquant.BLOCK, axis=1)  # per 32 columns
    dmin = np.repeat(parts["dmin"].astype(np.float32), kquant.SUPER // kquant.BLOCK, axis=1)
    scales = (d * parts["sc"].astype(np.float32)).astype(np.float16)
    mins = (-(dmin * parts["m"].astype(np.float32))).astype(np.float16)
    codes = parts["codes"].T  # [in, out]
    return {"data": np.ascontiguousarray(codes[0::2] | (codes[1::2] << 4)), "scales": np.ascontiguousarray(scales.T),
            "mins": np.ascontiguousarray(mins.T)}


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q/k (interleaved pairs -> two halves)."""
    if w.ndim == 1:
        return w.reshape(num_heads, -1, 2).swapaxes(1, 2).reshape(w.shape)
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _file_type(value) -> str:
    """GGUF's general.file_type by name (MOSTLY_Q4_1), or as stored when unknown."""
    try:
        return LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return str(value)
