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

import functools
import logging
import os
import struct

import numpy as np
from gguf import GGUFReader, GGUFValueType, LlamaFileType, MODEL_ARCH_NAMES, get_tensor_name_map
from gguf.quants import dequantize

from jaxinfer import kquant
from jaxinfer.config import ARCHITECTURES, ModelConfig, UnsupportedModelError
from jaxinfer.quant import WeightFormat
from kernels_pallas import quant_matmul as qmm

logger = logging.getLogger("jaxinfer")

_ARCH_BY_NAME = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
# GGUF block types that map onto our formats (blocks of 32 weights along the input dim): Q8_0, Q4_0
# and Q4_1 bit for bit. Q4_K is w = (d * sc) * code - dmin * m per 32 weights, Q4_1's form with a
# scale and min made of two factors each: its codes are kept and the products rounded once to
# float16 (5 bits a weight where int8 would take 8; within 2^-11 of a factor: `quantized_tensor`).
# This is how the paths without the native K-quant kernel (GPUs, tensor parallelism) keep Q4_K.
NATIVE_FORMATS = {"Q8_0": WeightFormat("int8", 32), "Q4_0": WeightFormat("int4", 32, symmetric=True),
                  "Q4_1": WeightFormat("int4", 32, symmetric=False), "Q4_K": WeightFormat("int4", 32, symmetric=False)}
# Where no byte stack runs (`jaxinfer.kquant`: the native CPU kernel), a GPU among them, a projection
# takes the narrowest of these formats that holds every layer's codes exactly (`group_format`): a
# layer's weights are w = a * code + b per sub-block, and the format keeps the codes, with a and b
# rounded once to float16 (exact for the blocks of 32, whose a and b are float16 or -2^k times one;
# a K-quant's d * sc within 2^-11, as Q4_K's above). So Q5_0 (most projections of the Q4_K_M files of
# small models) is int5 at its own 5.5 bits, Q6_K int6 at 7, and a mix (Q4_K_M's ffn_down of Q4_K and
# Q6_K layers, attn_v of Q8_0 and Q5_0) the smallest format both fit: int6 with mins (8 bits a weight),
# int8 in groups of 32. Before these formats, all of them were requantized to int8 per channel.
GROUP_FORMATS = (WeightFormat("int4", 32, symmetric=True), WeightFormat("int4", 32, symmetric=False),
                 WeightFormat("int5", 32, symmetric=True), WeightFormat("int5", 32, symmetric=False),
                 WeightFormat("int6", 16, symmetric=True), WeightFormat("int6", 16, symmetric=False),
                 WeightFormat("int8", 32))
FORMAT_BITS = {"int4": 4, "int5": 5, "int6": 6, "int8": 8}
# Each type's code bits, rows per (a, b) pair, and zero (w = a * (code - zero)) where it has no min.
BLOCK_CODES = {"Q4_0": (4, 32, 8), "Q4_1": (4, 32, None), "Q4_K": (4, 32, None), "Q5_0": (5, 32, 16),
               "Q5_1": (5, 32, None), "Q5_K": (5, 32, None), "Q6_K": (6, 16, 32), "Q8_0": (8, 32, 128)}


def holds(fmt: WeightFormat, kind: str) -> bool:
    """Whether `fmt` holds a `kind` layer's codes and factors exactly (`GROUP_FORMATS`)."""
    if kind not in BLOCK_CODES:
        return False
    bits, rows, zero = BLOCK_CODES[kind]
    if rows % fmt.group_size or bits > FORMAT_BITS[fmt.kind]:
        return False
    if fmt.kind == "int8":  # signed codes, no min: code - zero
        return zero is not None
    if not fmt.symmetric:
        return True
    # symmetric: w = a * (code' - half), code' = code + half - zero in [0, 2 * half)
    half = 2 ** (FORMAT_BITS[fmt.kind] - 1)
    return zero is not None and zero <= half and 2 ** bits - zero <= half


def group_format(kinds, k: int) -> WeightFormat | None:
    """The first of `GROUP_FORMATS` that holds every layer type of `kinds` for K = `k` input rows, or None."""
    for fmt in GROUP_FORMATS:
        if fmt.kind in ("int5", "int6") and k % 128:
            continue
        if k % fmt.group_size == 0 and all(holds(fmt, kind) for kind in kinds):
            return fmt
    return None


class _Reader(GGUFReader):
    """The gguf package's reader, with its metadata arrays read whole: the package makes two memory-mapped
    arrays per element (a length and the bytes, for each of a vocabulary's 150k tokens and merges),
    which was most of the time a model took to load. Here an array of numbers is one array, and an
    array of strings one memoryview slice per string: the fields decode (`contents()`) to the same
    values (tests/test_gguf_config.py checks them against the package's own reader)."""

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        item_type, n, offs = GGUFValueType(raw_itype[0]), int(count[0]), orig_offs + 12
        types = [GGUFValueType.ARRAY, item_type]
        nptype = self.gguf_scalar_to_np.get(item_type)
        if nptype is not None:
            values = self._get(offs, nptype, n)
            if len(values) != n:
                raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, count, values], [2], types
        if item_type != GGUFValueType.STRING:  # arrays of arrays: the package's way
            return super()._get_field_parts(orig_offs, raw_type)
        buffer = memoryview(self.data)
        parts = [raw_itype, count]
        for _ in range(n):
            (length,) = struct.unpack_from("=Q", buffer, offs)  # the host's order, as "I" says
            if offs + 8 + length > len(buffer):
                raise ValueError(f"string at offset {offs} runs past the end of the file")
            parts.append(buffer[offs + 8:offs + 8 + length])
            offs += 8 + length
        return offs - orig_offs, parts, list(range(2, 2 + n)), types


def decoded_fields(reader: GGUFReader) -> dict:
    """Every metadata value of a parsed file as Python values (lists for arrays); a field of a type the
    reader cannot decode is left out (none that we use)."""
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # noqa: BLE001 - the gguf package raises various errors on odd fields
            continue
    return fields


def read_gguf(path: str) -> tuple[dict, dict]:
    """(metadata: `decoded_fields`, tensors: name -> `gguf.ReaderTensor`, the data memory-mapped) of a
    GGUF file. The parse is kept for the file as it is (path, size, modification time): the gguf
    package's reader makes an array for each element of each metadata array, 5 s for SmolLM2's
    49,152-token vocabulary and 14-16 s for Qwen2.5's and Gemma 3's on these cores, and a process that
    builds several engines on one file (a notebook, a test run) parses it once. What is kept is the
    decoded values, not the reader's per-element arrays (about 0.5 GB for Qwen2.5's vocabulary).
    The returned values are shared: read them, do not change them."""
    stat = os.stat(path)
    return _read_gguf(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, mtime_ns: int, size: int) -> tuple[dict, dict]:
    try:
        reader = _Reader(path)
    except Exception as e:  # the gguf package raises ValueError/struct.error/... on bad files
        raise ValueError(f"{path} is not a valid GGUF file: {e}") from e
    return decoded_fields(reader), {t.name: t for t in reader.tensors}


class GGUFCheckpoint:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        # every metadata value (`fields`, the tokenizer's arrays among them), and without the large
        # arrays the tokenizer reads itself (`metadata`)
        self.fields, self.tensors = read_gguf(path)
        self.metadata = {k: v for k, v in self.fields.items() if k not in (
            "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
        arch = self.metadata.get("general.architecture", "")
        if arch not in ARCHITECTURES or arch not in _ARCH_BY_NAME:
            raise UnsupportedModelError(
                f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if "rope_freqs.weight" in self.tensors:
            factors = tuple(float(f) for f in self._read("rope_freqs.weight"))
        else:
            factors = None
        name = os.path.basename(path)
        self.config = ModelConfig.from_gguf(
            self.metadata, has_output_tensor="output.weight" in self.tensors, rope_freq_factors=factors, name=name,
            num_tokens=len(self.fields.get("tokenizer.ggml.tokens", ())))
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

    def stack_format(self, hf_names, grouped: bool = False, row_split: int = 1) -> WeightFormat | None:
        """The format the layers `hf_names` of one projection keep as stored: the one `native_format`
        of them all; with `grouped` (no byte stack runs them) `group_format`'s for their types.
        `row_split`: each device holds 1 / row_split of the input rows (a row-parallel projection under
        tensor parallelism), so a format's groups (and int5/int6's 128 rows) must fit that piece; None
        where none does."""
        k = int(self.tensors[self.gguf_name(hf_names[0])].shape[0])  # GGUF dims: [in, out]
        if k % row_split:
            return None
        if not grouped:
            found = {self.native_format(name) for name in hf_names}
            fmt = found.pop() if len(found) == 1 else None
            return None if fmt is None or fmt.group_size and (k // row_split) % fmt.group_size else fmt
        return group_format({self.tensor_type(name) for name in hf_names}, k // row_split)

    def quantized_tensor(self, hf_name: str, fmt: WeightFormat | None = None) -> dict[str, np.ndarray]:
        """A matrix's blocks as stored, transposed to W[in, out]: {"data", "scales"(, "mins")}.

        Without `fmt`, a Q8_0/Q4_0/Q4_1/Q4_K matrix in its `native_format`: Q8_0 -> int8 [in, out]
        with float16 scales [in // 32, out]; Q4_0/Q4_1 -> uint8 [in // 2, out] (low nibble = even row)
        with float16 scales (and mins) [in // 32, out]; Q4_K -> Q4_1's arrays: the codes as stored,
        scale d * sc and min -(dmin * m) of each 32 rounded to float16. With `fmt` (one of
        `GROUP_FORMATS` that `holds` the type), any type of `BLOCK_CODES` in that format.
        """
        gguf_name = self.gguf_name(hf_name)
        t = self.tensors[gguf_name]
        kind = t.tensor_type.name
        if fmt is not None and fmt != NATIVE_FORMATS.get(kind):
            if not holds(fmt, kind):
                raise ValueError(f"{gguf_name} is {kind}, which {fmt.name} does not hold exactly")
            return _as_group_format(self.kquant_tensor(hf_name), kind, fmt)
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
    return _as_group_format(parts, "Q4_K", NATIVE_FORMATS["Q4_K"])


def _as_group_format(parts: dict[str, np.ndarray], kind: str, fmt: WeightFormat) -> dict[str, np.ndarray]:
    """`kquant.decode_blocks`' arrays of a `kind` matrix (rows = output channels) -> `fmt`'s arrays [in, out]:
    the codes as stored (shifted to `fmt`'s zero where it is symmetric), each sub-block's w = a * code + b
    with a and b rounded once to float16, repeated over `fmt`'s smaller groups."""
    bits, sub, zero = BLOCK_CODES[kind]
    codes = parts["codes"].astype(np.int64)  # [rows, K]
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        per_super = kquant.SUPER // sub
        sc = parts["sc"].view(np.int8) if kind == "Q6_K" else parts["sc"]
        a = np.repeat(parts["d"].astype(np.float32), per_super, axis=1) * sc.astype(np.float32)
        b = None if zero is not None else -(np.repeat(parts["dmin"].astype(np.float32), per_super, axis=1)
                                             * parts["m"].astype(np.float32))
    else:
        a = parts["d"].astype(np.float32)
        b = None if zero is not None else parts["m"].astype(np.float32)
    repeat = sub // fmt.group_size
    out = {"scales": np.repeat(a.astype(np.float16), repeat, axis=1)}
    if fmt.kind == "int8":
        out["data"] = (codes - zero).astype(np.int8)
    elif fmt.symmetric:
        out["data"] = codes + (2 ** (FORMAT_BITS[fmt.kind] - 1) - zero)
    else:
        out["data"] = codes
        b = -zero * a if b is None else b  # a power of two times a: rounds as a does
        out["mins"] = np.repeat(b.astype(np.float16), repeat, axis=1)
    out = {key: np.ascontiguousarray(value.T) for key, value in out.items()}  # [in..., out]
    if fmt.kind == "int4":
        out["data"] = (out["data"][0::2] | (out["data"][1::2] << 4)).astype(np.uint8)
    elif fmt.kind in qmm.HIGH_BITS:
        out["data"] = qmm.pack_high_bits(out["data"], fmt.kind)
    return out


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
