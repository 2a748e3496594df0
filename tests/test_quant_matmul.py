"""Weight-only quantized matmul: the packed formats, the quantizers, the reference and the kernel.

- The layouts are checked against a NumPy decoder written from the module docstring, one
  element at a time (`decode_numpy`): that is the independent check of `dequantize`, which the
  reference (the XLA path on CPU) is built on.
- The Pallas kernel, run by the interpreter, is checked against the reference over M = 1, 7, 64,
  every format and int4 group size 32/64/128, with N not a multiple of the block. The
  interpreter fills the output with NaN before the kernel runs, so an unwritten element fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import ops, quant
from kernels_pallas import quant_matmul as qm


def pallas_quant_matmul(x, qw, **options):
    """The Pallas kernel, interpreted, on a `QuantizedWeight`'s arrays."""
    return qm.quant_matmul(x, qw.data, qw.scales, qw.mins, fmt=qw.format, group_size=qw.group_size, interpret=True,
                           **options)


def random_weight(seed, k=256, n=96):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)), jnp.float32)


def decode_numpy(w: quant.QuantizedWeight):
    """W[K, N] in float64, decoded element by element from the documented layout."""
    data = np.asarray(w.data.astype(jnp.float32) if w.format == "fp8" else w.data)
    scales = np.asarray(w.scales, np.float64)
    mins = None if w.mins is None else np.asarray(w.mins, np.float64)
    k, n = w.shape
    out = np.zeros((k, n))
    for row in range(k):
        for col in range(n):
            if w.format == "int4":
                byte = int(data[row // 2, col])
                q = (byte >> 4) if row % 2 else (byte & 0xF)
                q = float(q) if mins is not None else float(q) - 8
            elif w.format in ("int5", "int6"):
                byte = int(data[row // 2, col])
                q = (byte >> 4) if row % 2 else (byte & 0xF)
                h, span = (1, 512) if w.format == "int5" else (2, 256)  # high bits; rows a band covers
                pair = row // 2
                band, run, band_row = pair // (span // 2), pair % (span // 2) // 64, pair % 64
                high = int(data[k // 2 + 64 * band + band_row, col])
                q |= ((high >> (2 * h * run + (h if row % 2 else 0))) & ((1 << h) - 1)) << 4
                q = float(q) if mins is not None else float(q) - 2 ** (3 + h)
            else:
                q = float(data[row, col])
            scale = scales[row // w.group_size, col] if w.group_size else scales[col]
            value = q * scale
            if mins is not None:
                value += mins[row // w.group_size, col]
            out[row, col] = value
    return out


QUANTIZERS = {
    "int8": lambda w: quant.quantize_int8(w),
    "int8-g32": lambda w: quant.quantize_int8(w, group_size=32),
    "int4-sym-g32": lambda w: quant.quantize_int4(w, group_size=32),
    "int4-asym-g32": lambda w: quant.quantize_int4(w, group_size=32, symmetric=False),
    "int4-sym-g64": lambda w: quant.quantize_int4(w, group_size=64),
    "int4-asym-g128": lambda w: quant.quantize_int4(w, group_size=128, symmetric=False),
    "fp8": lambda w: quant.quantize_fp8(w),
}
# Relative error of W itself after round-to-nearest on Gaussian weights, per format.
QUANTIZATION_ERROR = {"int8": 0.01, "int4": 0.15, "fp8": 0.04}


# GGUF's 5- and 6-bit codes as stored (`weights.gguf.group_format`): (format, group size, symmetric)
HIGH_BIT_CASES = {"int5-g32-sym": ("int5", 32, True), "int5-g32-min": ("int5", 32, False),
                  "int6-g16-sym": ("int6", 16, True), "int6-g16-min": ("int6", 16, False)}


def high_bit_weight(name, k=640, n=96, seed=0):
    """(QuantizedWeight, the codes [K, N] it packs): random codes and a real model's factor range.
    K = 640: an int5 band of 512 rows and a last one with a quarter of its bits used."""
    fmt, group_size, symmetric = HIGH_BIT_CASES[name]
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** int(fmt[-1]), (k, n))
    scales = jnp.asarray(rng.uniform(1e-3, 2e-2, (k // group_size, n)), jnp.float16)
    mins = None if symmetric else jnp.asarray(rng.uniform(-0.3, 0.0, (k // group_size, n)), jnp.float16)
    return quant.QuantizedWeight(jnp.asarray(qm.pack_high_bits(q, fmt)), scales, mins, fmt, group_size), q


# --- Formats and quantizers -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HIGH_BIT_CASES))
def test_int5_int6_layout_follows_the_docstring_and_keeps_every_code(name):
    """The packed codes decode, element by element from the documented layout, to the codes packed
    (times their group's scale, plus its min or minus the format's zero); 5 or 6 bits a code where
    K fills whole bands."""
    qw, q = high_bit_weight(name, k=640, n=8)
    fmt, group_size, symmetric = HIGH_BIT_CASES[name]
    scales = np.repeat(np.asarray(qw.scales, np.float64), group_size, axis=0)
    offset = np.repeat(np.asarray(qw.mins, np.float64), group_size, axis=0) if qw.mins is not None else (
        -scales * (16 if fmt == "int5" else 32))
    want = q * scales + offset
    np.testing.assert_allclose(decode_numpy(qw), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), want, rtol=1e-6, atol=1e-6)
    assert qw.shape == (640, 8)
    full, _ = high_bit_weight(name, k=1024, n=8)
    assert full.data.nbytes * 8 == 1024 * 8 * int(fmt[-1])
    with pytest.raises(ValueError, match="multiple of 128"):
        qm.pack_high_bits(q[:96], fmt)
    with pytest.raises(ValueError, match="codes must lie in"):
        qm.pack_high_bits(q + 64, fmt)


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_dequantize_follows_the_documented_layout(name):
    w = random_weight(0, k=128, n=8)
    qw = QUANTIZERS[name](w)
    np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), decode_numpy(qw), rtol=1e-6,
                               atol=1e-6)
    error = np.linalg.norm(decode_numpy(qw) - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert error <= QUANTIZATION_ERROR[qw.format]


def test_int4_pack_unpack_round_trip_low_nibble_is_even_row():
    q = jnp.asarray(np.random.default_rng(1).integers(0, 16, (64, 5)), jnp.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (32, 5) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed & 0xF), np.asarray(q[0::2]))
    np.testing.assert_array_equal(np.asarray(qm.unpack_int4(packed)), np.asarray(q))


def test_int4_symmetric_keeps_each_groups_largest_magnitude_exactly():
    # Q4_0's rule: that value maps to q = 0, i.e. scale * -8.
    w = random_weight(2, k=64, n=4)
    qw = quant.quantize_int4(w, group_size=32)
    groups = np.asarray(w).reshape(2, 32, 4)
    biggest = np.take_along_axis(groups, np.abs(groups).argmax(axis=1)[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(np.asarray(qw.scales) * -8, biggest, rtol=1e-6)


def test_int4_asymmetric_keeps_each_groups_min_and_max():
    w = random_weight(3, k=64, n=4)
    qw = quant.quantize_int4(w, group_size=32, symmetric=False)
    groups = np.asarray(w).reshape(2, 32, 4)
    np.testing.assert_allclose(np.asarray(qw.mins), groups.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qw.mins + 15 * qw.scales), groups.max(axis=1),
                               rtol=1e-5)


@pytest.mark.parametrize("kind, top", [("int5", 31), ("int6", 63)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int5_int6_round_to_nearest_is_within_half_a_step(kind, top, symmetric):
    """`quantize_nibbles` at 5 and 6 bits (random weights of the GPU smoke run's Q4_K_M-like model):
    each weight within half its group's step of W (symmetric: a step where the other sign's far end
    is clipped to the top code, as Q5_0's), the largest magnitude (symmetric: the code 0,
    Q5_0's rule) or min and max (with mins) kept; `pack_high_bits` traced gives numpy's bytes."""
    w = random_weight(4, k=256, n=8)
    qw = quant.quantize_nibbles(w, kind, group_size=16, symmetric=symmetric)
    groups = np.asarray(w).reshape(16, 16, 8)
    scales = np.asarray(qw.scales, np.float32)
    codes = np.asarray(qm.unpack_high_bits(qw.data, kind, 256))
    error = np.abs(np.asarray(quant.dequantize(qw)).reshape(16, 16, 8) - groups)
    # symmetric: the far end of the other sign (up to the code 2^b) is clipped to 2^b - 1, a step off
    steps = np.where(symmetric & (codes.reshape(16, 16, 8) == top), 1.0, 0.5)
    assert (error <= np.abs(scales)[:, None] * steps * (1 + 1e-4)).all()
    if symmetric:
        biggest = np.take_along_axis(groups, np.abs(groups).argmax(axis=1)[:, None], axis=1)[:, 0]
        np.testing.assert_allclose(scales * -(top + 1) / 2, biggest, rtol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(qw.mins), groups.min(axis=1), rtol=1e-6)
        assert codes.min() == 0 and codes.max() == top
    np.testing.assert_array_equal(np.asarray(qw.data), qm.pack_high_bits(codes, kind))


def test_e4m3_integer_decode_matches_every_finite_fp8_value():
    """The kernel decodes fp8 with integer ops (no native conversion before sm_89)."""
    codes = jnp.arange(256, dtype=jnp.uint8)
    values = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
    finite = ~jnp.isnan(values.astype(jnp.float32))
    decoded = qm._e4m3_to_float32(values)
    np.testing.assert_array_equal(np.asarray(decoded)[np.asarray(finite)],
                                  np.asarray(values.astype(jnp.float32))[np.asarray(finite)])


def test_quantized_weight_is_a_pytree_that_scans_over_layers():
    stacked = jax.vmap(lambda w: quant.quantize_int4(w, group_size=32))(
        jnp.stack([random_weight(4, k=64, n=8), random_weight(5, k=64, n=8)]))
    assert stacked.data.shape == (2, 32, 8) and stacked.format == "int4"
    x = jnp.ones((3, 64), jnp.float32)
    _, outs = jax.lax.scan(lambda c, w: (c, quant.quant_matmul_reference(x, w)), 0, stacked)
    assert outs.shape == (2, 3, 8)


# --- The reference and the Pallas kernel ------------------------------------------------------

def relative_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def test_reference_is_dequantize_then_dot():
    w = random_weight(6, k=128, n=8)
    x = np.random.default_rng(7).standard_normal((5, 128))
    for name, quantize in QUANTIZERS.items():
        qw = quantize(w)
        out = quant.quant_matmul_reference(jnp.asarray(x, jnp.float32), qw)
        assert relative_error(out, x @ decode_numpy(qw)) <= 1e-5, name


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_pallas_quant_matmul_matches_reference(name, m):
    qw = QUANTIZERS[name](random_weight(8))
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 256)), jnp.float32)
    out = pallas_quant_matmul(x, qw)
    assert out.shape == (m, 96) and out.dtype == jnp.float32
    assert relative_error(out, quant.quant_matmul_reference(x, qw)) <= 1e-5


@pytest.mark.parametrize("name", ["int8", "int4-asym-g128", "fp8"])
def test_pallas_quant_matmul_bfloat16(name):
    qw = QUANTIZERS[name](random_weight(9))
    x = jnp.asarray(np.random.default_rng(10).standard_normal((7, 256)), jnp.bfloat16)
    out = pallas_quant_matmul(x, qw)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, quant.quant_matmul_reference(x, qw)) <= 1e-2


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("name", list(HIGH_BIT_CASES))
def test_pallas_quant_matmul_high_bit_formats(name, m):
    """int5/int6: the nibbles and their band's high bits, a scale (and min) read per row for
    groups smaller than a block (Q6_K's 16); N = 96 not a multiple of the 64-column block."""
    qw, _ = high_bit_weight(name, seed=m)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 640)), jnp.float32)
    out = pallas_quant_matmul(x, qw)
    assert out.shape == (m, 96)
    assert relative_error(out, quant.quant_matmul_reference(x, qw)) <= 1e-5
    with pytest.raises(ValueError, match="multiple of 128"):
        qm.quant_matmul(x[:, :576], qw.data, qw.scales[:18], fmt=qw.format, group_size=32, interpret=True)


def test_pallas_quant_matmul_with_k_not_a_multiple_of_the_block():
    qw = quant.quantize_int8(random_weight(11, k=200, n=40))
    x = jnp.asarray(np.random.default_rng(12).standard_normal((3, 200)), jnp.float32)
    out = pallas_quant_matmul(x, qw, block_k=64)
    assert relative_error(out, quant.quant_matmul_reference(x, qw)) <= 1e-5


def test_dispatch_quant_matmul_keeps_leading_dims():
    qw = quant.quantize_int4(random_weight(13, k=64, n=16), group_size=32)
    x = jnp.asarray(np.random.default_rng(14).standard_normal((2, 3, 64)), jnp.float32)
    xla = ops.quant_matmul(x, qw, backend="xla")
    pallas = ops.quant_matmul(x, qw, backend="pallas_interpret")
    assert xla.shape == (2, 3, 16)
    assert relative_error(pallas, xla) <= 1e-5
