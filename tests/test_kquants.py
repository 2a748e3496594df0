"""GGUF blocks kept as stored in byte stacks (`jaxinfer.kquant`: K-quants and the blocks of 32):
the layout dequantizes bitwise like `gguf.quants.dequantize`, and the native kernel
(`kernels_cpu/kquant_matmul.cc`) equals a float64 NumPy product of those weights with the kernel's
int8 activations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from jaxinfer import kquant, ops, quant, registry
from kernels_cpu import native
from tests.test_native_cpu import quantized_activations

KINDS = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
BLOCK_BYTES = kquant.BLOCK_BYTES
QWEN = os.path.join(registry.model_dir(), "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")  # `jaxinfer pull`'s

needs_kernel = pytest.mark.skipif(native.turned_off() is not None or not native.has_group_path(),
                                  reason="no native grouped integer path in this build")


def random_blocks(rng, kind, rows, k):
    """A matrix [rows, k] of this type as the file stores it: random bytes, with d (and dmin, or the
    blocks of 32's m) set to float16 values of a real model's range (random bytes would make them
    inf or NaN)."""
    block = kquant.TYPES[kind].block
    raw = rng.integers(0, 256, (rows, k // block, BLOCK_BYTES[kind]), dtype=np.uint8)
    factors = rng.uniform(1e-4, 2e-3, (rows, k // block, 2)).astype(np.float16)
    factors[..., 1] *= -1 if block == 32 else 1  # a min below zero, as a block's minimum usually is
    factors = factors.view(np.uint8)
    if kind == "Q6_K":
        raw[..., 208:210] = factors[..., :2]
    elif kind in ("Q4_K", "Q5_K", "Q4_1", "Q5_1"):
        raw[..., 0:4] = factors
    else:
        raw[..., 0:2] = factors[..., :2]
    return raw.reshape(rows, -1)


def gguf_weight(raw, kind):
    """W[K, N] float32 by gguf's own dequantization (the file's rows are output channels)."""
    return gguf_dequantize(raw, GGMLQuantizationType[kind]).reshape(raw.shape[0], -1).T


def stack(raws, kinds):
    data, index = kquant.stack_layers([(kind, kquant.pack_layer(kquant.decode_blocks(raw, kind), kind))
                                       for raw, kind in zip(raws, kinds)])
    k = gguf_weight(raws[0], kinds[0]).shape[0]
    return kquant.KQuantWeight(jnp.asarray(data), jnp.asarray(index), k, raws[0].shape[0], tuple(kinds))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k, n", [(512, 192), (256, 80)])  # 80: the last block of 64 columns padded
def test_dequantize_equals_gguf_bitwise(kind, k, n):
    raw = random_blocks(np.random.default_rng(len(kind) + n), kind, n, k)
    layer = jnp.asarray(kquant.pack_layer(kquant.decode_blocks(raw, kind), kind))
    got = np.asarray(jax.jit(kquant.dequantize_layer, static_argnums=(1, 2, 3))(layer, kind, k, n))
    np.testing.assert_array_equal(got.view(np.uint32), gguf_weight(raw, kind).view(np.uint32))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_rows_in_the_files_bytes_dequantize_like_gguf_bitwise(kind):
    """An embedding kept as stored: rows gathered from the file's bytes, then dequantized."""
    raw = random_blocks(np.random.default_rng(7), kind, 40, 256)
    ids = np.array([3, 0, 39, 3])
    got = np.asarray(jax.jit(kquant.dequantize_rows, static_argnums=1)(jnp.asarray(raw)[ids], kind))
    np.testing.assert_array_equal(got.view(np.uint32), gguf_weight(raw, kind).T[ids].view(np.uint32))


@pytest.mark.parametrize("kind", KINDS)
def test_layout_bytes_are_the_files_but_for_q4_k_and_q5_k_scales(kind):
    """Bits a weight in memory: the file's (Q5_0 5.5, Q8_0 8.5, ...), plus Q4_K/Q5_K's 6-bit scales
    and mins kept as bytes."""
    k, n = 4864, 896
    bits = kquant.TYPES[kind].layer_bytes(k, n) * 8 / (k * n)
    file_bits = BLOCK_BYTES[kind] * 8 / kquant.TYPES[kind].block
    assert bits == file_bits + (0.125 if kind in ("Q4_K", "Q5_K") else 0)


def test_stack_of_mixed_types_dequantizes_each_layer_by_its_own_type():
    rng = np.random.default_rng(1)
    kinds = ["Q4_K", "Q6_K", "Q5_0", "Q5_K", "Q8_0", "Q4_1", "Q5_1", "Q4_0", "Q6_K"]
    raws = [random_blocks(rng, kind, 64, 512) for kind in kinds]
    w = stack(raws, kinds)
    run = jax.jit(kquant.dequantize)  # the layer traced, as under lax.scan
    for layer, (raw, kind) in enumerate(zip(raws, kinds)):
        np.testing.assert_array_equal(np.asarray(run(w, layer)), gguf_weight(raw, kind), err_msg=f"layer {layer}")


def test_xla_reference_matmul_equals_a_float64_product():
    rng = np.random.default_rng(2)
    kinds = ["Q4_K", "Q6_K", "Q5_0"]
    raws = [random_blocks(rng, kind, 128, 512) for kind in kinds]
    w = stack(raws, kinds)
    x = jnp.asarray(rng.standard_normal((5, 512)), jnp.float32)
    for layer in (1, 2):
        got = np.asarray(jax.jit(kquant.matmul_reference)(x, w, layer))
        want = np.asarray(x, np.float64) @ gguf_weight(raws[layer], kinds[layer]).astype(np.float64)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def check_kernel(got, x, weight):
    """The kernel is the weights times the int8 activations up to float32 rounding, and within 1%
    of the full-precision product."""
    w64 = np.asarray(weight, np.float64)
    want = quantized_activations(np.asarray(x)).astype(np.float64) @ w64
    full = np.asarray(x, np.float64) @ w64
    scale = np.abs(full).max()
    np.testing.assert_allclose(got, want, atol=2e-6 * scale * np.sqrt(w64.shape[0] / 64), rtol=0)
    np.testing.assert_allclose(got, full, atol=1e-2 * scale, rtol=0)


kernel = jax.jit(native.kquant_matmul, static_argnames="n")


# K 288: blocks of 32 only (Qwen2.5-0.5B's 896 is not a multiple of 256 either)
SHAPES = [(kind, k, n) for kind in KINDS for k, n in [(768, 192), (512, 80), (288, 48)]
          if k % kquant.TYPES[kind].block == 0]


@needs_kernel
@pytest.mark.parametrize("kind, k, n", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 17])
def test_kernel_matches_reference(kind, m, k, n):
    rng = np.random.default_rng(m * 100 + n + len(kind))
    raw = random_blocks(rng, kind, n, k)
    w = stack([raw], [kind])
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    y = np.full((m, n), np.nan, np.float32)  # a column the kernel leaves unwritten fails below
    y[:] = np.asarray(kernel(x, w.data, w.index, 0, n=n))
    check_kernel(y, x, gguf_weight(raw, kind))


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_a_mixed_stack_runs_each_layer_by_its_own_type_under_scan(backend):
    """"xla" on the CPU: the native kernel. Any other backend (a GPU's "pallas", here its interpret
    mode) has no K-quant kernel and runs the jnp reference: the layer dequantized, then a dot."""
    if backend == "xla" and (native.turned_off() is not None or not native.has_group_path()):
        pytest.skip("no native grouped integer path in this build")
    rng = np.random.default_rng(3)
    kinds = ["Q6_K", "Q5_0", "Q8_0", "Q4_K", "Q5_0", "Q5_K", "Q5_1", "Q6_K"]
    raws = [random_blocks(rng, kind, 128, 512) for kind in kinds]
    w = stack(raws, kinds)
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)

    @jax.jit
    def every_layer(x, w):
        return jax.lax.scan(lambda c, layer: (c, ops.quant_matmul(x, w, backend=backend, layer=layer)), 0,
                            jnp.arange(len(kinds)))[1]

    got = np.asarray(every_layer(x, w))
    for layer, (raw, kind) in enumerate(zip(raws, kinds)):
        if backend == "xla":
            check_kernel(got[layer], x, gguf_weight(raw, kind))
        else:
            want = np.asarray(x, np.float64) @ gguf_weight(raw, kind).astype(np.float64)
            np.testing.assert_allclose(got[layer], want, atol=1e-5 * np.abs(want).max(), rtol=0)


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_rows_do_not_depend_on_the_batch(kind):
    """Bitwise: a row alone equals the same row in batches of 2 to 150 (row passes of 4, 3, 2, 1;
    from 128 rows the threads share the rows out by 64)."""
    rng = np.random.default_rng(4)
    k, n = 512, 320
    w = stack([random_blocks(rng, kind, n, k)], [kind])
    x = jnp.asarray(rng.standard_normal((150, k)), jnp.float32)
    run = jax.jit(lambda x: native.kquant_matmul(x, w.data, w.index, 0, n=n))
    alone = np.stack([np.asarray(run(x[i:i + 1]))[0] for i in range(0, 150, 11)])
    for m in (2, 3, 5, 8, 13, 67, 150):
        batch = np.asarray(run(x[:m]))
        np.testing.assert_array_equal(batch[::11], alone[:len(batch[::11])], err_msg=f"m={m}")


@pytest.fixture(scope="module")
def qwen():
    if not os.path.exists(QWEN):
        pytest.skip(f"{QWEN} not present")
    from jaxinfer.weights.gguf import GGUFCheckpoint

    return GGUFCheckpoint(QWEN)


def test_native_keeps_k_quant_and_q5_0_projections_only_where_their_kernel_runs(qwen):
    from jaxinfer.models.params import projection_formats

    kept = projection_formats(qwen.config, qwen, "native", kquants=True)
    assert kept["down_proj"][0].kind == "kquant" and kept["down_proj"][1]
    assert kept["q_proj"][0] == quant.WeightFormat("kquant", layer_types=("Q5_0",) * 24)
    assert set(kept["v_proj"][0].layer_types) == {"Q5_0", "Q8_0"}  # mixed across layers: one stack
    assert projection_formats(qwen.config, qwen, "native")["down_proj"] == (quant.weight_format("int8"), False)
    assert projection_formats(qwen.config, qwen, "native")["q_proj"] == (quant.weight_format("int8"), False)


def test_real_q5_0_embedding_kept_as_stored(qwen):
    """Qwen2.5-Coder-0.5B's token embedding (Q5_0, not tied to its Q8_0 head): its rows, read from
    the file's bytes, equal gguf's dequantization."""
    from jaxinfer.models.params import _stored_embed_type

    assert _stored_embed_type(qwen.config, qwen) == "Q5_0"
    raw = qwen.raw_rows("model.embed_tokens.weight")
    ids = np.array([0, 151643, 785, 12])
    got = np.asarray(kquant.dequantize_rows(jnp.asarray(raw[ids]), "Q5_0"))
    np.testing.assert_array_equal(got, gguf_weight(raw[ids], "Q5_0").T)


class StubCheckpoint:
    """Every layer's projections of the types given, by layer."""

    def __init__(self, types):
        self.types = types

    def tensor_type(self, name):
        return self.types[int(name.split(".")[2])]

    def kquant_tensor(self, name):
        raise NotImplementedError


def test_a_stack_of_one_block_type_of_32_stays_with_group_matmul_unless_mixed():
    """SmolLM2's Q8_0 (or a Q4_0 file) keeps its path and numbers; a mix of those types, or Q5_0
    anywhere, goes to the byte stack."""
    from jaxinfer.config import ModelConfig
    from jaxinfer.models.params import kquant_formats

    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=64, tie_word_embeddings=True)
    for uniform in ("Q8_0", "Q4_0", "Q4_1"):
        assert kquant_formats(config, StubCheckpoint([uniform, uniform])) == {}
    mixed = kquant_formats(config, StubCheckpoint(["Q8_0", "Q4_0"]))
    assert mixed["q_proj"].layer_types == ("Q8_0", "Q4_0")
    assert kquant_formats(config, StubCheckpoint(["Q5_0", "Q5_0"]))["down_proj"].layer_types == ("Q5_0", "Q5_0")


def test_real_q4_k_m_down_proj_kept_as_stored(qwen):
    """Qwen2.5-Coder-0.5B Q4_K_M: ffn_down mixes Q4_K and Q6_K layers. The stored form of four
    layers dequantizes bitwise like gguf, and the model's layer stack runs them by their own type."""
    from jaxinfer.models.params import kquant_formats

    checkpoint = qwen
    fmt = kquant_formats(checkpoint.config, checkpoint)["down_proj"]
    assert set(fmt.layer_types) == {"Q4_K", "Q6_K"} and len(fmt.layer_types) == checkpoint.config.num_layers
    layers = [fmt.layer_types.index("Q6_K"), fmt.layer_types.index("Q4_K"), 22, 23]
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in layers]
    tensors = [checkpoint.tensors[checkpoint.gguf_name(name)] for name in names]
    kinds = [t.tensor_type.name for t in tensors]
    want = [gguf_weight(np.asarray(t.data).reshape(int(t.shape[-1]), -1), kind) for t, kind in zip(tensors, kinds)]
    data, index = kquant.stack_layers([(kind, kquant.pack_layer(checkpoint.kquant_tensor(name), kind))
                                       for name, kind in zip(names, kinds)])
    k, n = want[0].shape
    w = kquant.KQuantWeight(jnp.asarray(data), jnp.asarray(index), k, n, tuple(kinds))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, k)), jnp.float32)
    for i, weight in enumerate(want):
        np.testing.assert_array_equal(np.asarray(jax.jit(kquant.dequantize)(w, i)), weight, err_msg=kinds[i])
        if native.turned_off() is None and native.has_group_path():
            check_kernel(np.asarray(kernel(x, w.data, w.index, i, n=n)), x, weight)


def test_real_v_proj_mixing_q5_0_and_q8_0_kept_as_stored(qwen):
    """Qwen2.5-Coder-0.5B "Q4_K_M": attn_v is Q5_0 in some layers, Q8_0 in others (K = 896 is not a
    multiple of 256). All 24 layers in one stack dequantize bitwise like gguf; the kernel runs a
    layer of each type."""
    from jaxinfer.models.params import kquant_formats

    fmt = kquant_formats(qwen.config, qwen)["v_proj"]
    names = [f"model.layers.{i}.self_attn.v_proj.weight" for i in range(qwen.config.num_layers)]
    data, index = kquant.stack_layers([(kind, kquant.pack_layer(qwen.kquant_tensor(name), kind))
                                       for name, kind in zip(names, fmt.layer_types)])
    k, n = qwen.config.hidden_size, qwen.config.num_kv_heads * qwen.config.head_dim
    assert len(data) == kquant.stack_bytes(fmt.layer_types, k, n)
    w = kquant.KQuantWeight(jnp.asarray(data), jnp.asarray(index), k, n, fmt.layer_types)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, k)), jnp.float32)
    run = jax.jit(kquant.dequantize)
    for layer, name in enumerate(names):
        t = qwen.tensors[qwen.gguf_name(name)]
        want = gguf_weight(np.asarray(t.data).reshape(n, -1), t.tensor_type.name)
        np.testing.assert_array_equal(np.asarray(run(w, layer)), want, err_msg=f"layer {layer}")
        if layer in (fmt.layer_types.index("Q5_0"), fmt.layer_types.index("Q8_0")) and native.has_group_path():
            check_kernel(np.asarray(kernel(x, w.data, w.index, layer, n=n)), x, want)


@needs_kernel
@pytest.mark.parametrize("m", [1, 5, 130])
def test_fused_kernel_is_each_single_call_bit_for_bit(m):
    """q, k and v of different types in one call (a Q4_K_M file's v may be Q6_K or Q8_0): each
    output bit for bit its own call's, and the weights times the int8 activations."""
    rng = np.random.default_rng(20 + m)
    stacks = [(("Q4_K", "Q5_0"), 256), (("Q6_K", "Q8_0"), 64), (("Q5_K", "Q4_1"), 80)]
    raws = [[random_blocks(rng, kind, n, 512) for kind in kinds] for kinds, n in stacks]
    weights = [stack(r, kinds) for r, (kinds, _) in zip(raws, stacks)]
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    fused = jax.jit(lambda x, layer: native.kquant_matmul_fused(x, [(w.data, w.index, w.n) for w in weights], layer))
    for layer in (0, 1):
        for w, r, y in zip(weights, raws, fused(x, layer)):
            np.testing.assert_array_equal(y, kernel(x, w.data, w.index, layer, n=w.n))
            check_kernel(np.asarray(y), x, gguf_weight(r[layer], w.types[layer]))


@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read(), reason="the main run already is the AVX2 build")
@needs_kernel
def test_avx2_build_passes_the_kernel_tests_too():
    """Machines without AVX-512 build the AVX2 path (vpmaddubsw): build it with -mno-avx512f and
    run this file's kernel tests against it in a fresh process."""
    import subprocess
    import sys

    env = {**os.environ, "JAXINFER_NATIVE_CFLAGS": "-mno-avx512f"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                             "-k", "(kernel or mixed_stack) and not avx2_build"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


# --- Q4_K in Q4_1's form: where the native K-quant kernel does not run (GPUs, tensor parallelism) ---

def gguf_q4_k_error_bound(raw):
    """[K, N]: how far a weight may move when its Q4_K block's two factors, formed by gguf as
    float32(d * sc) and float32(dmin * m), are rounded to float16: half an ulp of each (2^-11
    relative, 2^-25 absolute below float16's normal range) times the code (<= 15) and 1."""
    from gguf.quants import Q4_K

    blocks = raw.reshape(-1, BLOCK_BYTES["Q4_K"])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # gguf's own unpacking of the 6-bit factors
    scale, shift = np.abs(d * sc.reshape(len(blocks), 8)), np.abs(dmin * m.reshape(len(blocks), 8))
    bound = 15 * (scale * 2.0 ** -11 + 2.0 ** -25) + shift * 2.0 ** -11 + 2.0 ** -25
    return np.repeat(bound.reshape(raw.shape[0], -1), 32, axis=1).T * (1 + 1e-6)


def dequantized_int4(arrays):
    w = quant.QuantizedWeight(jnp.asarray(arrays["data"]), jnp.asarray(arrays["scales"]), jnp.asarray(arrays["mins"]),
                              "int4", 32)
    return np.asarray(jax.jit(quant.dequantize)(w))


def test_q4_k_in_q4_1_form_is_within_float16_rounding_of_gguf():
    """Random Q4_K super-blocks as the int4-g32-with-min arrays the GPU kernels run: 5 bits a weight
    (codes as stored, a float16 scale and min per 32), every weight within the rounding of its two
    factors of gguf's dequantization (a code or factor out of place would miss by a whole step)."""
    from jaxinfer.weights.gguf import _q4_k_as_q4_1

    k, n = 512, 192
    raw = random_blocks(np.random.default_rng(11), "Q4_K", n, k)
    arrays = _q4_k_as_q4_1(kquant.decode_blocks(raw, "Q4_K"))
    assert {name: (a.shape, a.dtype) for name, a in arrays.items()} == {
        "data": ((k // 2, n), np.uint8), "scales": ((k // 32, n), np.float16), "mins": ((k // 32, n), np.float16)}
    error = np.abs(dequantized_int4(arrays) - gguf_weight(raw, "Q4_K"))
    assert (error <= gguf_q4_k_error_bound(raw)).all(), error.max()


def test_real_q4_k_layer_in_q4_1_form(qwen):
    """Qwen2.5-Coder-0.5B's first Q4_K ffn_down layer through `quantized_tensor` (the path of a GPU):
    every weight within the float16 rounding of its factors of gguf's value, 0.1% of a weight on average."""
    name = next(f"model.layers.{i}.mlp.down_proj.weight" for i in range(qwen.config.num_layers)
                if qwen.tensor_type(f"model.layers.{i}.mlp.down_proj.weight") == "Q4_K")
    assert qwen.native_format(name) == quant.WeightFormat("int4", 32, symmetric=False)
    t = qwen.tensors[qwen.gguf_name(name)]
    raw = np.asarray(t.data).reshape(int(t.shape[-1]), -1)
    want = gguf_weight(raw, "Q4_K")
    error = np.abs(dequantized_int4(qwen.quantized_tensor(name)) - want)
    assert (error <= gguf_q4_k_error_bound(raw)).all(), error.max()
    assert error.mean() < 2.0 ** -10 * np.abs(want).mean()


@pytest.fixture(scope="module")
def q4_k_llama(tmp_path_factory):
    """A 1-layer llama GGUF whose attn_q/attn_k (rows in llama.cpp's RoPE order), ffn_gate and ffn_up
    are Q4_K, attn_v and ffn_down Q6_K, attn_output Q8_0."""
    return one_layer_gguf(tmp_path_factory.mktemp("q4_k") / "tiny-q4_k.gguf", 12, {
        "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q4_K",
        "ffn_up": "Q4_K", "ffn_down": "Q6_K"})


def one_layer_gguf(path, seed, kinds):
    """A 1-layer llama GGUF at `path` (hidden 256, ffn 512, 4 heads of 64, 2 KV heads, unit norms), each
    projection (attn_q/k/v/output, ffn_gate/up/down) of its type in `kinds`: random blocks with a real
    model's factor range."""
    from tests.helpers import tiny_llama_gguf

    rng = np.random.default_rng(seed)
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
    tensors = {f"blk.0.{name}.weight": (random_blocks(rng, kinds[name], rows, k), GGMLQuantizationType[kinds[name]])
               for name, (rows, k) in shapes.items()}
    tensors |= {name: (np.ones(256, np.float32), GGMLQuantizationType.F32)
                for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight")}
    return tiny_llama_gguf(path, 256, 512, tensors)


def test_q4_k_projections_are_kept_as_4_bit_where_the_k_quant_kernel_does_not_run(q4_k_llama):
    """Without the native K-quant kernel `native` keeps the Q4_K projections as int4 g32 (they were
    requantized to int8 before: 8 bits a weight against 5), q and k rows back in HF's RoPE order
    like the dequantized tensor; Q6_K still goes to int8. With the kernel, all stay K-quants."""
    from jaxinfer.models.params import projection_formats

    c = q4_k_llama
    int4 = quant.WeightFormat("int4", 32, symmetric=False)
    formats = projection_formats(c.config, c, "native")
    assert {p: formats[p] for p in ("q_proj", "k_proj", "gate_proj", "up_proj")} == dict.fromkeys(
        ("q_proj", "k_proj", "gate_proj", "up_proj"), (int4, True))
    assert formats["v_proj"] == formats["down_proj"] == (quant.weight_format("int8"), False)
    assert formats["o_proj"] == (quant.WeightFormat("int8", 32), True)
    # `--quantization int4` (group 32, with a min) takes the file's Q4_K rather than requantizing
    assert projection_formats(c.config, c, "int4")["q_proj"] == (int4, True)
    kept = projection_formats(c.config, c, "native", kquants=True)
    assert {p: fmt.kind for p, (fmt, _) in kept.items() if p != "o_proj"} == dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), "kquant")
    assert kept["o_proj"] == formats["o_proj"]  # Q8_0 throughout: the grouped kernel's, either way
    for proj in ("q_proj", "k_proj", "gate_proj"):
        name = f"model.layers.0.{'self_attn' if proj[0] in 'qk' else 'mlp'}.{proj}.weight"
        want = c.tensor(name).T  # gguf's dequantization, q/k rows un-permuted
        error = np.abs(dequantized_int4(c.quantized_tensor(name)) - want)
        assert error.max() <= 2.0 ** -10 * np.abs(want).max(), (proj, error.max())
