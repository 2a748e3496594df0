"""The native CPU kernels (kernels_cpu) equal their plain jnp references, and the engine uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_cpu import native
from jaxinfer import ops
from kernels_pallas.paged_attention import ragged_paged_attention_reference
from jaxinfer.quant import QuantizedWeight, quant_matmul_reference, quantize_int8
from tests.test_paged_attention_xla import ragged_case

# Skipped only where the kernels are not even tried: no compiler, or JAXINFER_NATIVE=0. Where a
# compiler exists and the build fails, every test here fails (the first with the compiler's message).
pytestmark = pytest.mark.skipif(native.turned_off() is not None, reason=f"native kernels off: {native.turned_off()}")


def test_the_kernels_build_and_register_where_a_compiler_exists():
    native.load()  # raises with the compiler's message if the build fails
    assert native.available()


def test_the_attention_keeps_its_page_prefetches_through_the_compiler():
    """paged_attention.cc prefetches pages ahead into L2 (prefetcht1) and the next one into L1: a
    build the compiler optimized them out of computes the same numbers, only slower (as one did
    until 2026-12-06), so no other test would notice. objdump comes with g++'s binutils."""
    import shutil
    import subprocess

    library = native.load()
    code = subprocess.run([shutil.which("objdump") or "objdump", "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True, check=True).stdout
    assert "prefetcht1" in code


def test_a_failed_build_raises_with_the_compilers_message_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mno-such-option"))
    monkeypatch.setenv("JAXINFER_NATIVE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="failed:\n.*-mno-such-option"):
        native.load()
    assert list(tmp_path.iterdir()) == []


def int8_weight(rng, k, n, layers=None):
    shape = (k, n) if layers is None else (layers, k, n)
    data = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
    scales = jnp.asarray(rng.uniform(1e-3, 2e-2, shape[:-2] + (n,)), jnp.float16)
    return data, scales


def reference(x, data, scales):
    """x @ (data * scales) in float64 NumPy: independent of both XLA and the kernel."""
    w = np.asarray(data, np.float64) * np.asarray(scales.astype(jnp.float32), np.float64)
    return np.asarray(x, np.float64) @ w


def quantized_activations(x):
    """x rounded as the integer path rounds it: int8 per row in blocks of 32, scale = max|x| / 127,
    round half to even, in float32."""
    blocks = np.asarray(x, np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    q = np.round(blocks * inv)
    return (q * (amax / np.float32(127))).reshape(x.shape)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 32])
@pytest.mark.parametrize("k, n", [(576, 1536), (1536, 576), (576, 192), (64, 100), (32, 16)])
def test_int8_matmul_matches_reference(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    data, scales = int8_weight(rng, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    want = reference(x, data, scales)
    scale = np.abs(want).max()
    for layout in ("kn", "blocked"):
        w = native.to_blocked(data) if layout == "blocked" else data
        got = np.asarray(jax.jit(native.int8_matmul)(x, w, scales))
        np.testing.assert_allclose(got, want, atol=2e-6 * scale * np.sqrt(k / 64), rtol=0, err_msg=layout)
    if native.has_integer_path() and k % 32 == 0:
        got = np.asarray(jax.jit(native.int8_matmul)(x, native.to_vnni(data), scales))
        # exactly the weights times the 8-bit activations, up to float32 rounding...
        np.testing.assert_allclose(got, reference(quantized_activations(x), data, scales),
                                   atol=2e-6 * scale * np.sqrt(k / 64), rtol=0, err_msg="vnni")
        # ...which stay within 1% of the full-precision product
        np.testing.assert_allclose(got, want, atol=1e-2 * scale, rtol=0, err_msg="vnni vs float")


def test_blocked_layout_round_trips_and_pads_only_when_it_must():
    rng = np.random.default_rng(0)
    for n, width in [(1536, 192), (576, 64), (49152, 256), (100, 64)]:
        data, _ = int8_weight(rng, 64, n, layers=2)
        blocked = native.to_blocked(data)
        assert blocked.shape == (2, -(-n // width), 64, width)
        np.testing.assert_array_equal(native.from_blocked(blocked, n), data)
        vnni = native.to_vnni(data)
        assert vnni.shape == (2, -(-n // 64), 16, 64, 4)
        np.testing.assert_array_equal(native.from_vnni(vnni, n), data)
        np.testing.assert_array_equal(vnni[1, 0, 3, 5], data[1, 12:16, 5])  # 4 consecutive k of a column


def test_int8_matmul_reads_the_requested_layer_of_a_stack_in_place():
    rng = np.random.default_rng(1)
    data, scales = int8_weight(rng, 128, 320, layers=5)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    blocked = native.to_blocked(data)

    @jax.jit
    def every_layer(x, data, scales):  # the model's pattern: a scan passing the layer index
        return jax.lax.scan(lambda c, layer: (c, native.int8_matmul(x, data, scales, layer)), 0, jnp.arange(5))[1]

    got = np.asarray(every_layer(x, blocked, scales))
    for layer in range(5):
        want = reference(x, data[layer], scales[layer])
        np.testing.assert_allclose(got[layer], want, atol=1e-5 * np.abs(want).max())


# GGUF's block formats as `group_matmul` takes them: (bits, codes, with mins). Values are
# scale * code + min per group of 32 rows; without mins, scale * (code - zero point).
GROUP_FORMATS = {"q8_0": (8, False), "q4_0": (4, False), "q4_1": (4, True)}


def group_weight(rng, fmt, k, n, layers=None):
    """Random codes, scales (and mins) of a grouped weight, as the "kn" arrays the model holds
    (`quant.QuantizedWeight`: int8 for 8 bits, packed nibbles for 4), and W itself in float64."""
    bits, with_mins = GROUP_FORMATS[fmt]
    lead = () if layers is None else (layers,)
    codes = rng.integers(0, 2 ** bits, (*lead, k, n))
    scales = rng.uniform(1e-3, 2e-2, (*lead, k // 32, n)).astype(np.float16)
    mins = rng.uniform(-0.2, 0.1, scales.shape).astype(np.float16) if with_mins else None
    offset = mins.astype(np.float64) if with_mins else -native.ZERO_POINTS[bits] * scales.astype(np.float64)
    w = np.repeat(scales.astype(np.float64), 32, axis=-2) * codes + np.repeat(offset, 32, axis=-2)
    data = (jnp.asarray(codes - 128, jnp.int8) if bits == 8 else
            jnp.asarray(codes[..., 0::2, :] | (codes[..., 1::2, :] << 4), jnp.uint8))
    return data, jnp.asarray(scales), None if mins is None else jnp.asarray(mins), w


@pytest.fixture(scope="module")
def group_path():
    if not native.has_group_path():
        pytest.skip("this build has no grouped integer path (needs AVX2 with FMA and F16C, or AVX-512 VNNI)")


@pytest.mark.parametrize("fmt", GROUP_FORMATS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 64])
@pytest.mark.parametrize("k, n", [(576, 1536), (1536, 576), (576, 192), (64, 112)])
def test_group_matmul_matches_reference(group_path, fmt, m, k, n):
    rng = np.random.default_rng(m * 1000 + n + k)
    bits = GROUP_FORMATS[fmt][0]
    data, scales, mins, w = group_weight(rng, fmt, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    got = np.asarray(jax.jit(native.group_matmul, static_argnames="bits")(
        x, native.to_group_codes(data, bits), scales, mins, bits=bits))
    want = np.asarray(x, np.float64) @ w
    scale = np.abs(want).max()
    # exactly the weights times the 8-bit activations, up to float32 rounding...
    np.testing.assert_allclose(got, quantized_activations(x).astype(np.float64) @ w,
                               atol=2e-6 * scale * np.sqrt(k / 64), rtol=0)
    # ...which stay within 1% of the full-precision product
    np.testing.assert_allclose(got, want, atol=1e-2 * scale, rtol=0)


@pytest.mark.parametrize("fmt", GROUP_FORMATS)
def test_group_codes_round_trip_and_place_each_code(fmt):
    rng = np.random.default_rng(3)
    bits = GROUP_FORMATS[fmt][0]
    for n in (1536, 576, 112):
        data, *_ = group_weight(rng, fmt, 64, n, layers=2)
        codes = native.to_group_codes(data, bits)
        np.testing.assert_array_equal(native.from_group_codes(codes, bits, n), data)
    if bits == 8:  # column 5, k 12..15 of layer 1: 4 adjacent bytes
        np.testing.assert_array_equal(codes[1, 0, 3, 5], np.asarray(data[1, 12:16, 5], np.int16) + 128)
    else:  # byte (group 1, quad 2, column 5, i 3): k = 32 + 8 + 3 = 43 low, 59 high
        values = np.stack([np.asarray(data) & 0xF, np.asarray(data) >> 4], axis=-2).reshape(2, 64, n)
        assert codes[1, 0, 1, 2, 5, 3] == values[1, 43, 5] | (values[1, 59, 5] << 4)


def test_group_matmul_reads_the_requested_layer_of_a_stack(group_path):
    rng = np.random.default_rng(4)
    data, scales, mins, w = group_weight(rng, "q4_1", 128, 320, layers=3)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    codes = native.to_group_codes(data, 4)

    @jax.jit
    def every_layer(x, codes, scales, mins):
        return jax.lax.scan(lambda c, layer: (c, native.group_matmul(x, codes, scales, mins, layer, bits=4)), 0,
                            jnp.arange(3))[1]

    got = np.asarray(every_layer(x, codes, scales, mins))
    for layer in range(3):
        want = quantized_activations(x).astype(np.float64) @ w[layer]
        np.testing.assert_allclose(got[layer], want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kernel", ["vnni", "q8_0", "q4_0", "q4_1"])
def test_integer_matmul_rows_do_not_depend_on_the_batch(kernel):
    """Bitwise: a row's result alone equals its result in batches of every size (the row passes of
    4, 3, 2 and 1 rows and the tile widths they use must round alike; from 128 rows the threads
    share the rows out by 64)."""
    rng = np.random.default_rng(5)
    k, n = 576, 1536
    if kernel == "vnni":
        if not native.has_integer_path():
            pytest.skip("no integer path in this build")
        data, scales = int8_weight(rng, k, n)
        vnni = native.to_vnni(data)
        run = jax.jit(lambda x: native.int8_matmul(x, vnni, scales))
    else:
        if not native.has_group_path():
            pytest.skip("no grouped path in this build")
        bits = GROUP_FORMATS[kernel][0]
        data, scales, mins, _ = group_weight(rng, kernel, k, n)
        codes = native.to_group_codes(data, bits)
        run = jax.jit(lambda x: native.group_matmul(x, codes, scales, mins, bits=bits))
    x = jnp.asarray(rng.standard_normal((150, k)), jnp.float32)
    alone = np.stack([np.asarray(run(x[i:i + 1]))[0] for i in range(0, 150, 11)])
    for m in (2, 3, 5, 8, 13, 67, 150):
        batch = np.asarray(run(x[:m]))
        np.testing.assert_array_equal(batch[::11], alone[:len(batch[::11])], err_msg=f"m={m}")


# q, k and v of a small GQA layer: N 576, 192, 192 (192: three blocks of 64, fewer than the threads' share)
FUSED_SHAPES = (576, 192, 192)


@pytest.mark.parametrize("m", [1, 5, 130])  # 130: the threads split the rows (by 64) as well as the blocks
def test_fused_int8_matmul_is_each_single_call_bit_for_bit(m):
    rng = np.random.default_rng(6 + m)
    weights = [int8_weight(rng, 576, n, layers=2) for n in FUSED_SHAPES]
    x = jnp.asarray(rng.standard_normal((m, 576)), jnp.float32)
    layouts = {"kn": lambda d: d, "blocked": native.to_blocked}
    if native.has_integer_path():
        layouts["vnni"] = native.to_vnni
    for name, layout in layouts.items():
        laid = [(layout(data), scales) for data, scales in weights]
        fused = jax.jit(lambda x, layer: native.int8_matmul_fused(x, laid, layer))
        assert fused.lower(x, 1).as_text().count("jaxinfer_int8_matmul_fused") == 1
        got = fused(x, 1)
        for (data, scales), (w, _), y in zip(weights, laid, got):
            np.testing.assert_array_equal(y, native.int8_matmul(x, w, scales, 1), err_msg=name)
            want = reference(quantized_activations(x) if name == "vnni" else x, data[1], scales[1])
            np.testing.assert_allclose(y, want, atol=2e-6 * np.abs(want).max() * 3, rtol=0, err_msg=name)


@pytest.mark.parametrize("m", [1, 5, 130])
def test_fused_group_matmul_takes_formats_of_both_widths_bit_for_bit(group_path, m):
    """q in Q4_1, k in Q8_0, v in Q4_0 (a GGUF file may mix them): one call, each output its own
    single call's, bit for bit, and the weights times the 8-bit activations."""
    rng = np.random.default_rng(7 + m)
    fmts = ("q4_1", "q8_0", "q4_0")
    weights = [group_weight(rng, fmt, 576, n, layers=2) for fmt, n in zip(fmts, FUSED_SHAPES)]
    laid = [(native.to_group_codes(data, GROUP_FORMATS[fmt][0]), scales, mins, GROUP_FORMATS[fmt][0])
            for fmt, (data, scales, mins, _) in zip(fmts, weights)]
    x = jnp.asarray(rng.standard_normal((m, 576)), jnp.float32)
    got = jax.jit(lambda x, layer: native.group_matmul_fused(x, laid, layer))(x, 0)
    for (codes, scales, mins, bits), (*_, w), y in zip(laid, weights, got):
        np.testing.assert_array_equal(y, native.group_matmul(x, codes, scales, mins, 0, bits=bits))
        want = quantized_activations(x).astype(np.float64) @ w[0]
        np.testing.assert_allclose(y, want, atol=2e-6 * np.abs(want).max() * 3, rtol=0)


def test_quant_matmuls_fuses_what_one_kernel_takes_and_runs_the_rest_alone(group_path):
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_normal((256, 384)), jnp.float32)
    per_channel = quantize_int8(w, scale_dtype=jnp.float16)
    grouped = quantize_int8(w, group_size=32, scale_dtype=jnp.float16)  # Q8_0
    codes = QuantizedWeight(native.to_group_codes(grouped.data, 8), grouped.scales, None, "int8", 32, "codes")
    layouts = [per_channel, codes, grouped, codes, per_channel]  # "kn" grouped: XLA's dequantize-then-dot
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    run = jax.jit(lambda x, ws: ops.quant_matmuls(x, ws, backend="xla"))
    text = run.lower(x, layouts).as_text()
    assert text.count("jaxinfer_int8_matmul_fused") == 1 and text.count("jaxinfer_group_matmul_fused") == 1
    for weight, y in zip(layouts, run(x, layouts)):
        np.testing.assert_array_equal(y, ops.quant_matmul(x, weight, backend="xla"))
        np.testing.assert_allclose(y, quant_matmul_reference(x, weight), atol=2e-2 * np.abs(y).max(), rtol=0)


def test_fused_kernels_refuse_weights_that_disagree():
    rng = np.random.default_rng(9)
    single = int8_weight(rng, 64, 32)
    stacked = int8_weight(rng, 64, 32, layers=2)
    x = jnp.zeros((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="all layer stacks or all single"):
        native.int8_matmul_fused(x, [single, stacked], 0)
    with pytest.raises(ValueError, match="needs `layer`"):
        native.int8_matmul_fused(x, [stacked, stacked])
    with pytest.raises(TypeError, match="float32 x"):
        native.int8_matmul_fused(x.astype(jnp.bfloat16), [single])
    wrong_k = int8_weight(rng, 32, 32)
    with pytest.raises(Exception, match="shapes disagree"):
        jax.block_until_ready(native.int8_matmul_fused(x, [single, wrong_k]))


def test_dispatch_sends_per_channel_int8_to_the_kernel_and_other_formats_to_xla():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((256, 384)), jnp.float32)
    qw = quantize_int8(w, scale_dtype=jnp.float16)
    blocked = QuantizedWeight(native.to_blocked(qw.data), qw.scales, None, "int8", 0, "blocked")
    grouped = quantize_int8(w, group_size=32, scale_dtype=jnp.float16)
    for m in (1, 33, 100):
        x = jnp.asarray(rng.standard_normal((m, 256)), jnp.float32)
        for weight, native_path in ((blocked, True), (qw, True), (grouped, False)):
            text = jax.jit(lambda x, w: ops.quant_matmul(x, w, backend="xla")).lower(x, weight).as_text()
            assert ("jaxinfer_int8_matmul" in text) == native_path, (m, weight.layout, weight.group_size)
            got = ops.quant_matmul(x, weight, backend="xla")
            np.testing.assert_allclose(np.asarray(got), np.asarray(quant_matmul_reference(x, weight)), atol=1e-4,
                                       rtol=1e-4)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("sliding_window, soft_cap", [(None, None), (40, None), (None, 20.0)])
def test_paged_attention_matches_reference(num_heads, num_kv_heads, sliding_window, soft_cap):
    rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
    # decode rows over short and long context, a short prefill, a chunk after cached context,
    # padding rows and a padding sequence
    case = ragged_case(rng, [1, 9, 1, 6, 1], [5, 9, 300, 228, 129], num_heads=num_heads,
                       num_kv_heads=num_kv_heads, num_tokens=32, num_seqs=8)
    options = dict(sm_scale=0.125, sliding_window=sliding_window, soft_cap=soft_cap)
    want = ragged_paged_attention_reference(*case, **options)
    got = jax.jit(lambda *a: native.ragged_paged_attention(*a, **options))(*case)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert not np.asarray(got)[18:].any()  # padding rows are zeros


@pytest.mark.parametrize("head_dim, page_size", [(128, 8), (256, 32), (64, 24), (80, 16)])
def test_paged_attention_head_dims_and_page_sizes(head_dim, page_size):
    """Key tiles are cut at page ends: pages smaller than, larger than and not a multiple of the
    vector width; Gemma 3's head_dim 256; 80, a head size the kernel has no unrolled copy for."""
    rng = np.random.default_rng(head_dim + page_size)
    case = ragged_case(rng, [1, 20, 1, 37], [3, 20, 131, 90], num_heads=4, num_kv_heads=2, head_dim=head_dim,
                       page_size=page_size, num_tokens=64, num_seqs=5)
    for window in (None, 19):
        options = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
        want = ragged_paged_attention_reference(*case, **options)
        got = jax.jit(lambda *a: native.ragged_paged_attention(*a, **options))(*case)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim, page_size, window, soft_cap", [(64, 16, None, None), (64, 16, 40, 20.0),
                                                                  (256, 8, None, None)])
def test_paged_attention_reads_a_float16_cache(head_dim, page_size, window, soft_cap):
    """A float16 cache (the CPU default) is widened exactly as it is read: the result is bit for bit
    the float32 kernel's on the same values held as float32, and the reference's on the float16 cache."""
    rng = np.random.default_rng(head_dim + page_size + (window or 0))
    q, k_cache, v_cache, *meta = ragged_case(rng, [1, 20, 1, 37], [3, 20, 131, 90], num_heads=9, num_kv_heads=3,
                                             head_dim=head_dim, page_size=page_size, num_tokens=64, num_seqs=5)
    k_half, v_half = k_cache.astype(jnp.float16), v_cache.astype(jnp.float16)
    options = dict(sm_scale=head_dim ** -0.5, sliding_window=window, soft_cap=soft_cap)
    run = jax.jit(lambda *a: native.ragged_paged_attention(*a, **options))
    got = np.asarray(run(q, k_half, v_half, *meta))
    np.testing.assert_array_equal(got, np.asarray(run(q, k_half.astype(jnp.float32), v_half.astype(jnp.float32), *meta)))
    want = ragged_paged_attention_reference(q, k_half, v_half, *meta, **options)
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="float32 or float16 caches of one dtype"):
        native.ragged_paged_attention(q, k_half, v_cache, *meta, sm_scale=0.125)


def test_paged_attention_row_does_not_depend_on_the_rest_of_the_batch():
    """A sequence's rows come out bit for bit the same alone and beside others, and a prefill row the
    same whether its chunk is long or short (rows are blocked by 16 per work item): the CPU default's
    answers may not depend on the load."""
    rng = np.random.default_rng(7)
    q, k_cache, v_cache, layer, qsl, lens, tables = ragged_case(rng, [1, 40, 1], [77, 60, 33], num_heads=9,
                                                                num_kv_heads=3)
    run = jax.jit(lambda *a: native.ragged_paged_attention(*a, sm_scale=0.125, sliding_window=None))
    full = np.asarray(run(q, k_cache, v_cache, layer, qsl, lens, tables))
    # The prefill sequence alone: its last 7 rows as a chunk of their own after 53 cached tokens.
    alone = np.asarray(run(q[34:41], k_cache, v_cache, layer, np.array([0, 7], np.int32), lens[1:2], tables[1:2]))
    np.testing.assert_array_equal(alone, full[34:41])
    # Its last row as a one-row chunk (the kernel's one-row items, a decode row's path) against the
    # same row in a block of 8.
    alone = np.asarray(run(q[40:41], k_cache, v_cache, layer, np.array([0, 1], np.int32), lens[1:2], tables[1:2]))
    np.testing.assert_array_equal(alone, full[40:41])
    # The decode row of the last sequence alone.
    alone = np.asarray(run(q[41:42], k_cache, v_cache, layer, np.array([0, 1], np.int32), lens[2:3], tables[2:3]))
    np.testing.assert_array_equal(alone, full[41:42])


def test_paged_attention_never_reads_outside_the_page_pool():
    """A block table entry past the pool (never in a valid batch) is skipped, not read."""
    rng = np.random.default_rng(3)
    q, k_cache, v_cache, layer, qsl, lens, tables = ragged_case(rng, [1], [40], num_heads=4, num_kv_heads=2)
    tables[0, 1] = 10 ** 6
    out = native.ragged_paged_attention(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.125)
    assert np.isfinite(np.asarray(out)).all()


def bad_metadata_case():
    """Three sequences (1, 4 and 1 query rows over 10, 20 and 5 tokens) and a padding one, 8 rows,
    block tables 4 pages of 16 wide: a valid batch for the tests below to break one field of."""
    return ragged_case(np.random.default_rng(4), [1, 4, 1], [10, 20, 5], num_heads=4, num_kv_heads=2,
                       num_tokens=8, num_seqs=4, max_pages=4)


def test_bad_metadata_case_is_valid_as_built():
    q, k_cache, v_cache, layer, qsl, lens, tables = bad_metadata_case()
    got = native.ragged_paged_attention(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.125)
    want = ragged_paged_attention_reference(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("field, index, value, message", [
    ("qsl", 0, -1, "query_start_loc"),  # rows before q
    ("qsl", 2, 0, "query_start_loc"),  # decreasing: [0, 1, 0, 6, 6]
    ("qsl", 4, 9, "query_start_loc"),  # the padding sequence's end past the 8 rows
    ("qsl", 3, 100, "query_start_loc"),  # a row range far past q and the output
    ("lens", 1, 3, "seq_lens"),  # fewer tokens than query rows: a negative first position
    ("lens", 1, 65, "seq_lens"),  # more tokens than 4 pages of 16 hold: keys past the block table row
    ("lens", 3, 2 ** 30, "seq_lens"),  # a padding sequence too
])
def test_paged_attention_refuses_metadata_that_would_index_out_of_bounds(field, index, value, message):
    """query_start_loc, seq_lens and the block tables index q, the output and the page pool: the
    kernel checks them at the FFI boundary and returns an error instead of touching memory."""
    q, k_cache, v_cache, layer, qsl, lens, tables = bad_metadata_case()
    {"qsl": qsl, "lens": lens}[field][index] = value
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"INVALID_ARGUMENT.*{message}"):
        out = jax.jit(lambda *a: native.ragged_paged_attention(*a, sm_scale=0.125))(
            q, k_cache, v_cache, layer, qsl, lens, tables)
        out.block_until_ready()


def test_vnni_layout_refuses_a_weight_of_minus_128():
    """The AVX2 integer path negates weights with vpsignb, and -(-128) is -128 in int8: the layout
    for that path takes only [-127, 127] (the quantizer's range) and says so at load."""
    data = np.ones((32, 64), np.int8)
    data[5, 7] = -128
    with pytest.raises(ValueError, match="-128"):
        native.to_vnni(jnp.asarray(data))
    data[5, 7] = -127
    native.to_vnni(jnp.asarray(data))  # the quantizer's whole range is accepted


def test_default_cpu_engine_runs_q_k_v_and_gate_up_as_one_kernel_call_each(served):
    """In the default configuration each layer's q, k and v projections are one native call, and its
    gate and up another (`quant.project`); o and down stay single."""
    runner = served.engine.runner
    for tokens in (1, 64):
        batch = runner._empty_batch(*runner.padded_shape(tokens, 1))
        text = runner._step.lower(runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
        fused = [line for line in text.splitlines() if "_matmul_fused" in line and "custom_call" in line]
        assert len(fused) == 2, fused


def test_default_cpu_engine_keeps_a_float16_cache_read_by_the_native_kernel(served):
    """The default configuration (quantized weights on the CPU) keeps K/V in float16, as llama.cpp
    does, and its steps read them with the native kernel's float16 entry; kv_cache_dtype says otherwise."""
    engine = served.engine
    assert engine.kv_cache_dtype == jnp.float16 and engine.runner.k_cache.dtype == jnp.float16
    runner = engine.runner
    batch = runner._empty_batch(*runner.padded_shape(1, 1))
    assert "jaxinfer_ragged_paged_attention_f16" in runner._step.lower(
        runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
    from jaxinfer.loading import resolve_kv_cache_dtype
    assert resolve_kv_cache_dtype("auto", jnp.float32, "none", "cpu") == jnp.float32  # full precision stays so
    assert resolve_kv_cache_dtype("auto", jnp.bfloat16, "int4", "gpu") == jnp.bfloat16
    assert resolve_kv_cache_dtype("float32", jnp.float32, "native", "cpu") == jnp.float32
    with pytest.raises(ValueError, match="kv_cache_dtype float16 differs from the model's dtype bfloat16"):
        resolve_kv_cache_dtype("float16", jnp.bfloat16, "int4", "gpu")
    from jaxinfer.config import EngineConfig
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="int8")


def test_cpu_engine_runs_attention_through_the_native_kernel(llm):
    """The session model (float32, CPU; the HF comparisons of tests/test_model_vs_hf.py run through
    it): decode and prefill steps call the native attention. tests/test_quant.py checks the int8
    model, whose projections call the native matmul, end to end."""
    runner = llm.engine.runner
    for tokens in (1, 64):
        batch = runner._empty_batch(*runner.padded_shape(tokens, 1))
        text = runner._step.lower(runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
        assert "jaxinfer_ragged_paged_attention" in text


@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read(), reason="the main run already is the AVX2 build")
def test_avx2_build_passes_the_kernel_tests_too():
    """Machines without AVX-512 (CI's may be such) build the AVX2 paths: build them here with
    -mno-avx512f and run this file's kernel tests against them in a fresh process."""
    import os
    import subprocess
    import sys

    # Without F16C too (a machine with neither): the float16 cache and the int8 matmul's float16
    # scales are widened by plain code.
    for flags, tests in (("-mno-avx512f", "not engine and not avx2_build"),
                         ("-mno-avx512f -mno-f16c", "float16 or int8_matmul_matches")):
        env = {**os.environ, "JAXINFER_NATIVE_CFLAGS": flags}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                                 "-k", tests], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, flags + result.stdout[-3000:] + result.stderr[-3000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], flags
