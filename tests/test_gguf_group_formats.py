"""GGUF blocks in grouped formats where no byte stack runs them (a GPU: `weights.gguf.group_format`):
each projection in the narrowest of int4/int5/int6/int8 groups that holds every layer's codes
exactly, against gguf's own dequantization (random blocks of every type, the real Qwen2.5-Coder-0.5B
file) and, through a whole one-layer model, against the file dequantized to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import kquant, quant
from tests.test_kquants import (BLOCK_BYTES, KINDS, gguf_q4_k_error_bound, gguf_weight, one_layer_gguf,  # noqa: F401
                                qwen, random_blocks)


def test_group_format_is_the_narrowest_that_holds_every_layer_exactly():
    """Q5_0 (most projections of small models' Q4_K_M files) as int5 at its own 5.5 bits, Q6_K as
    int6 in its groups of 16, a projection mixing types in the smallest format all fit; none for
    Q8_0 beside a type with mins, and no int5/int6 for K not a multiple of 128."""
    from jaxinfer.weights.gguf import group_format

    def name(kinds, k=896):
        fmt = group_format(set(kinds), k)
        return None if fmt is None else fmt.name

    assert name(["Q5_0"]) == "int5-g32-sym"
    assert name(["Q5_1"]) == name(["Q5_K"]) == name(["Q5_0", "Q4_K"]) == "int5-g32"
    assert name(["Q6_K"]) == "int6-g16-sym" and name(["Q6_K", "Q5_0"]) == "int6-g16-sym"
    assert name(["Q4_K", "Q6_K"]) == "int6-g16"  # Q4_K_M's ffn_down
    assert name(["Q8_0", "Q5_0"]) == "int8-g32"  # its attn_v
    assert name(["Q4_0"]) == "int4-g32-sym" and name(["Q4_K"]) == name(["Q4_1"]) == "int4-g32"
    assert name(["Q8_0", "Q4_K"]) is None
    assert name(["Q5_0"], k=576) == "int8-g32" and name(["Q6_K"], k=576) is None  # 576 = 4.5 x 128


def kquant_error_bound(raw, kind):
    """[K, N]: how far a K-quant weight may move when its factor a = d * sc (and min b = dmin * m),
    formed in float32, is rounded to float16: half an ulp (2^-11 relative, 2^-25 absolute below
    float16's normal range) times the largest code and zero, and of b."""
    if kind == "Q4_K":
        return gguf_q4_k_error_bound(raw)
    from gguf.quants import Q4_K

    blocks = raw.reshape(-1, BLOCK_BYTES[kind])
    if kind == "Q6_K":  # ql 128, qh 64, sc int8 16, d
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        a = np.abs(d * blocks[:, 192:208].view(np.int8).astype(np.float32))  # per 16
        bound = (63 + 32) * (a * 2.0 ** -11 + 2.0 ** -25)
        return np.repeat(bound.reshape(raw.shape[0], -1), 16, axis=1).T * (1 + 1e-6)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # Q5_K: as Q4_K's, codes < 32
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    a, b = np.abs(d * sc.reshape(len(blocks), 8)), np.abs(dmin * m.reshape(len(blocks), 8))
    bound = 31 * (a * 2.0 ** -11 + 2.0 ** -25) + b * 2.0 ** -11 + 2.0 ** -25
    return np.repeat(bound.reshape(raw.shape[0], -1), 32, axis=1).T * (1 + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_each_type_in_each_group_format_that_holds_it_dequantizes_like_gguf(kind):
    """Random blocks of every type through every grouped format that `holds` it: the blocks of 32
    bit for bit gguf's weights (float16 factors, or -2^k times one, kept as they are), the K-quants
    within the float16 rounding of their factors (a code or factor out of place misses by a step)."""
    from jaxinfer.weights.gguf import GROUP_FORMATS, _as_group_format, holds

    k, n = 512, 64
    raw = random_blocks(np.random.default_rng(21), kind, n, k)
    want = gguf_weight(raw, kind)
    formats = [fmt for fmt in GROUP_FORMATS if holds(fmt, kind)]
    assert formats, kind
    for fmt in formats:
        arrays = _as_group_format(kquant.decode_blocks(raw, kind), kind, fmt)
        w = quant.QuantizedWeight(jnp.asarray(arrays["data"]), jnp.asarray(arrays["scales"]),
                                  None if "mins" not in arrays else jnp.asarray(arrays["mins"]), fmt.kind,
                                  fmt.group_size)
        assert w.shape == (k, n) and ("mins" in arrays) == (not fmt.symmetric and fmt.kind != "int8")
        error = np.abs(np.asarray(jax.jit(quant.dequantize)(w)) - want)
        if kquant.TYPES[kind].block == kquant.BLOCK:
            assert error.max() == 0, (fmt.name, error.max())
        else:
            assert (error <= kquant_error_bound(raw, kind)).all(), (fmt.name, error.max())


def test_real_projections_in_group_formats_keep_the_files_weights(qwen):
    """Qwen2.5-Coder-0.5B Q4_K_M where no byte stack runs (`grouped`: a GPU): its Q5_0 projections
    as int5 at about the file's 5.5 bits (they were requantized to int8 per channel), attn_v (Q8_0 and Q5_0
    layers) int8 in groups of 32, ffn_down (Q4_K and Q6_K) int6 with mins; each layer's weights
    gguf's (Q5_0, Q8_0: exactly)."""
    from jaxinfer.models.llama import _LAYER_TENSORS
    from jaxinfer.models.params import projection_formats

    formats = projection_formats(qwen.config, qwen, "native", grouped=True)
    assert {p: (fmt.name, stored) for p, (fmt, stored) in formats.items()} == {
        **dict.fromkeys(("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"), ("int5-g32-sym", True)),
        "v_proj": ("int8-g32", True), "down_proj": ("int6-g16", True)}
    for proj, (fmt, _) in formats.items():
        names = [_LAYER_TENSORS[(proj, "w")][0].format(layer) for layer in range(qwen.config.num_layers)]
        for kind in sorted({qwen.tensor_type(name) for name in names}):
            name = next(name for name in names if qwen.tensor_type(name) == kind)
            arrays = qwen.quantized_tensor(name, fmt)
            w = quant.QuantizedWeight(*(jnp.asarray(arrays[key]) if key in arrays else None
                                        for key in ("data", "scales", "mins")), fmt.kind, fmt.group_size)
            raw = qwen.raw_rows(name)
            error = np.abs(np.asarray(jax.jit(quant.dequantize)(w)) - gguf_weight(raw, kind))
            if kind in ("Q5_0", "Q8_0"):
                assert error.max() == 0, (proj, kind)
            else:
                assert (error <= kquant_error_bound(raw, kind)).all(), (proj, kind, error.max())
            if fmt.kind == "int5":  # the file's 5.5 bits a weight, and a partly used last band: K = 896 = 512 + 384
                bits = (w.data.nbytes + w.scales.nbytes) * 8 / (w.shape[0] * w.shape[1])
                assert 5.5 <= bits <= 5.5 + 1 / 7 + 1e-9, bits  # 128 band rows where 112 would do


def test_a_row_split_keeps_a_format_whose_groups_fit_each_devices_rows(qwen):
    """Under tensor parallelism the row-parallel projections (o_proj: 896 rows, down_proj: 4,864) are
    cut into `row_split` pieces of input rows: int5/int6 need 128 rows a piece, the others their
    group; where nothing fits, the layers are requantized to int8 per channel. Column splits keep
    the formats of one device."""
    from jaxinfer.models.params import projection_formats

    def names(row_split):
        formats = projection_formats(qwen.config, qwen, "native", grouped=True, row_split=row_split)
        return {p: (fmt.name, stored) for p, (fmt, stored) in formats.items()}

    one = names(1)
    assert names(2) == one | {"o_proj": ("int8-g32", True)}  # 448 rows a device: Q5_0 in int8's groups
    assert names(4) == one | {"o_proj": ("int8-g32", True), "down_proj": ("int8", False)}  # 1,216: not 128s
    assert names(7) == one | {"down_proj": ("int8", False)}  # 128 and 694.9 rows: o_proj int5 still
    # without `grouped` (byte stacks' files read as their Q8_0/Q4_0/Q4_1/Q4_K where one type throughout)
    v0 = ["model.layers.0.self_attn.v_proj.weight"]  # Q8_0: int8 in groups of 32
    assert qwen.stack_format(v0, row_split=4).name == "int8-g32"  # 224 rows a device
    assert qwen.stack_format(v0, row_split=8) is None and qwen.stack_format(v0, row_split=3) is None  # 112, 298.7


@pytest.fixture(scope="module")
def q5_q6_llama(tmp_path_factory):
    """A 1-layer llama GGUF of Q4_K_M's other types: attn_q/k/output, ffn_gate/up Q5_0, attn_v and
    ffn_down Q6_K."""
    return one_layer_gguf(tmp_path_factory.mktemp("q5_q6") / "tiny-q5-q6.gguf", 22, {
        "attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q6_K", "attn_output": "Q5_0", "ffn_gate": "Q5_0",
        "ffn_up": "Q5_0", "ffn_down": "Q6_K"})


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_a_model_of_q5_0_and_q6_k_in_group_formats_computes_the_files_weights(q5_q6_llama, backend):
    """The model of `grouped` formats (int5 for Q5_0, int6 for Q6_K: a GPU's load) through the layer
    stack and the dispatcher (the reference, and the Triton kernel interpreted) gives the logits of
    the same file dequantized to float32 by gguf."""
    from jaxinfer.models import load_model
    from jaxinfer.models.params import projection_formats
    from tests.helpers import prefill_logits

    c = q5_q6_llama
    formats = projection_formats(c.config, c, "native", grouped=True)
    assert {fmt.name for fmt, _ in formats.values()} == {"int5-g32-sym", "int6-g16-sym"}
    grouped = load_model(c.config, c, quantization="native", grouped=True, quant_backend=backend, cache_dir=None)
    full = load_model(c.config, c, quantization="none", cache_dir=None)
    assert grouped.layers.q_proj.fmt.kind == "int5" and grouped.layers.down_proj.fmt.kind == "int6"
    tokens = list(np.random.default_rng(23).integers(0, 32, 20))
    got, want = prefill_logits(grouped, tokens), prefill_logits(full, tokens)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
