"""Checkpoints quantized by the libraries that define the formats (tests/data/quantized/, written by
scripts/make_quantized_fixtures.py with compressed-tensors and gptqmodel; VERSIONS.txt there):
a tiny random Llama (hidden 128, 2 layers) as compressed-tensors W4A16 (symmetric and asymmetric,
group 32; asymmetric per channel), W8A16 per channel, W8A8 `int-quantized`, FP8 per channel / per
tensor / 128x128 blocks, HF "fp8" blocks (`weight_scale_inv`), GPTQ 4-bit (act-order too) and
8-bit, and AWQ GEMM.

The reference for the weights is each library's own dequantization, saved beside the checkpoint
(`reference/dequantized.safetensors`, in the dtype the library computes in; for llm-compressor's
checkpoint, transformers loading it with `run_compressed=False`). The reference for the
model is HF transformers on those dequantized weights (float32).

Tolerances. Where the engine's format holds the checkpoint's values as they are (symmetric int4,
int8, fp8 with per-channel or per-tensor scales), our dequantization rounded to the library's dtype
is the library's, bit for bit. Elsewhere the difference is one rounding: a zero point folded into
a float16 min (-scale * zero) and the library's product rounded to bf16/fp16, or (FP8 blocks) the
float32 block scale stored as float16; so |ours - library| <= 2^-8 (|w| + |min|), two bf16 ulps.
Greedy tokens: the reference runs the library's rounded weights, we run ours, so at a near tie
they may part; the rule is the issue's: at the first divergence our token is in HF's top 5. Logits:
these random models' last-position logits span about 1.2, and ours are within 0.009 of HF's (the
CPU default runs int4 g32 and int8 on int8 activations); 0.03 leaves room for that, while a weight
read wrongly (a column order, a zero point) moves them by far more.
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import jax.numpy as jnp

from helpers import prefill_logits
from jaxinfer import LLM, SamplingParams, quant
from jaxinfer.weights.hf import HFCheckpoint
from jaxinfer.weights.quantized import UnsupportedQuantization

DATA = os.path.join(os.path.dirname(__file__), "data", "quantized")
# name: (its engine format, bit-exact after rounding to the library's dtype)
FIXTURES = {
    "ct-w4a16-g32-sym": ("int4-g32-sym", True),
    "ct-w4a16-g32-asym": ("int4-g32", False),
    "ct-w8a16-channel": ("int8", True),
    "ct-w4a16-channel-asym": ("int4-g128", False),  # one scale per channel, repeated over K's one group
    "ct-w8a8-int-quantized": ("int8", True),  # int8 activations in the config: the engine keeps float
    "llmc-gptq-w4a16-g32-asym": ("int4-g32", False),  # llm-compressor's oneshot GPTQ (actorder "weight")
    "ct018-w4a16-g32-asym-actorder": ("int4-g32-actorder", False),  # compressed-tensors 0.18's weight_g_idx
    "ct-fp8-channel": ("fp8", True),
    "ct-fp8-tensor": ("fp8", True),
    "ct-fp8-block": ("fp8-g128", True),
    "fp8-block": ("fp8-g128", False),
    "gptq-g32-sym": ("int4-g32-sym", True),
    "gptq-g32-actorder": ("int4-g32-actorder", False),
    "gptq-8bit-g32": ("int8-g32", True),
    "awq-gemm-g32": ("int4-g32", False),
}
ENGINE = dict(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64, page_size=16, warmup=False,
              weight_cache_dir=None)
NEW_TOKENS = 8
LOGITS_ATOL = 0.03
PROMPT_LENGTHS = (40, 23)


def fixture_path(name):
    return os.path.join(DATA, name)


def reference_weights(name) -> dict[str, np.ndarray]:
    with safe_open(os.path.join(fixture_path(name), "reference", "dequantized.safetensors"), "numpy") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def our_dequantized(checkpoint: HFCheckpoint, hf_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(W [out, in] float32 by the format's reference `quant.dequantize`, |min| of each element's group
    (zeros without mins)). Act-order: the rows, stored sorted by group, put back (row perm[i] of W is
    row i of the stored weight, which the layer meets with x[..., perm])."""
    fmt = checkpoint.native_format(hf_name)
    arrays = checkpoint.quantized_tensor(hf_name)
    mins = arrays.get("mins")
    w = quant.QuantizedWeight(jnp.asarray(arrays["data"]), jnp.asarray(arrays["scales"]),
                              None if mins is None else jnp.asarray(mins), fmt.kind, fmt.group_size)
    dense = np.asarray(quant.dequantize(w))  # [K, N]
    k = dense.shape[0]
    mins = np.zeros_like(dense) if mins is None else np.repeat(np.abs(mins.astype(np.float32)), k // mins.shape[0], 0)
    if "input_perm" in arrays:
        unsorted, unsorted_mins = np.empty_like(dense), np.empty_like(mins)
        unsorted[arrays["input_perm"]], unsorted_mins[arrays["input_perm"]] = dense, mins
        dense, mins = unsorted, unsorted_mins
    return dense.T, mins.T


@pytest.mark.parametrize("name", FIXTURES)
def test_projections_load_in_the_expected_format(name):
    checkpoint = HFCheckpoint(fixture_path(name))
    for hf_name in reference_weights(name):
        assert checkpoint.native_format(hf_name).name == FIXTURES[name][0]


@pytest.mark.parametrize("name", FIXTURES)
def test_dequantized_weights_equal_the_librarys(name):
    checkpoint = HFCheckpoint(fixture_path(name))
    exact = FIXTURES[name][1]
    for hf_name, ref in reference_weights(name).items():
        ours, mins = our_dequantized(checkpoint, hf_name)
        if exact:
            np.testing.assert_array_equal(ours.astype(ref.dtype), ref, err_msg=hf_name)
        else:
            ref32 = ref.astype(np.float32)
            bound = 2.0 ** -8 * (np.abs(ref32) + mins) + 1e-12
            assert np.all(np.abs(ours - ref32) <= bound), f"{hf_name}: {np.max(np.abs(ours - ref32) / bound)}"


# --- the model: greedy tokens against HF on the library's dequantized weights ------------------------

def plain_checkpoint(name, path) -> str:
    """An HF directory of the fixture's model in float32 with the library's dequantized projections
    and no quantization_config: what transformers runs as the reference."""
    with open(os.path.join(fixture_path(name), "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    config["torch_dtype"] = config["dtype"] = "float32"
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {key: value.astype(np.float32) for key, value in reference_weights(name).items()}
    checkpoint = HFCheckpoint(fixture_path(name))
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        tensors[key] = checkpoint.tensor(key).astype(np.float32)
    for layer in range(config["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{layer}.{norm}.weight"
            tensors[key] = checkpoint.tensor(key).astype(np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(fixture_path(name), "tokenizer.json"), path)
    return str(path)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 320, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", ["ct-w4a16-g32-asym", "ct-w4a16-channel-asym", "llmc-gptq-w4a16-g32-asym",
                                  "ct018-w4a16-g32-asym-actorder", "ct-w8a16-channel", "ct-fp8-channel", "ct-fp8-block",
                                  "fp8-block", "gptq-g32-sym", "gptq-g32-actorder", "gptq-8bit-g32",
                                  "awq-gemm-g32"])
def test_greedy_tokens_follow_hf_on_the_librarys_weights(name, prompts, hf_reference, tmp_path):
    hf_model = hf_reference.load_dir(plain_checkpoint(name, tmp_path / name))
    llm = LLM(fixture_path(name), **ENGINE)
    assert llm.engine.quantization == "native"
    np.testing.assert_allclose(prefill_logits(llm.engine.model, prompts[0]), hf_model.last_logits(prompts[:1])[0],
                               rtol=0, atol=LOGITS_ATOL)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, hf_model.greedy(prompts, NEW_TOKENS)):
        ours = out.outputs[0].token_ids
        if ours != ref:
            i = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
            logits = hf_model.last_logits([prompt + ref[:i]])[0]
            assert ours[i] in np.argsort(logits)[-5:], f"prompt of {len(prompt)}: token {i} {ours[i]} not in HF's top 5"


# --- errors ------------------------------------------------------------------------------------------

def copy_with_config(name, tmp_path, change) -> str:
    path = tmp_path / name
    shutil.copytree(fixture_path(name), path)
    with open(path / "config.json") as f:
        config = json.load(f)
    change(config["quantization_config"])
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    return str(path)


def test_an_unknown_quant_method_is_an_error_naming_it(tmp_path):
    path = copy_with_config("ct-w4a16-g32-sym", tmp_path, lambda q: q.update(quant_method="bitsandbytes"))
    with pytest.raises(UnsupportedQuantization, match="'bitsandbytes' is not supported"):
        LLM(path, **ENGINE)


def test_an_unsupported_compressed_tensors_scheme_is_an_error_naming_it(tmp_path):
    def two_bits(q):
        q["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    path = copy_with_config("ct-w4a16-g32-sym", tmp_path, two_bits)
    with pytest.raises(UnsupportedQuantization, match="compressed-tensors checkpoint: .*int2 .* not supported"):
        HFCheckpoint(path)


def test_compressed_tensors_int8_act_order_groups_are_refused_with_the_reason(tmp_path):
    def act_order(q):
        q["config_groups"]["group_0"]["weights"].update(actorder="group", strategy="group", group_size=32)
    path = copy_with_config("ct-w8a16-channel", tmp_path, act_order)
    with pytest.raises(UnsupportedQuantization, match="act-order groups .* with int8"):
        HFCheckpoint(path)


def test_a_gptq_packing_other_than_v1_and_v2_is_refused_naming_it(tmp_path):
    path = copy_with_config("gptq-g32-sym", tmp_path, lambda q: q.update(checkpoint_format="marlin"))
    with pytest.raises(UnsupportedQuantization, match="the 'marlin' packing is not supported"):
        HFCheckpoint(path)


def test_the_pallas_kernel_runs_the_fp8_block_format():
    """fp8 with one scale per 128 rows and column (a 128x128 block's scale repeated over its columns)
    is the kernel's grouped path: interpreted, it equals the reference."""
    from kernels_pallas import quant_matmul as qmm

    arrays = HFCheckpoint(fixture_path("ct-fp8-block")).quantized_tensor("model.layers.0.mlp.down_proj.weight")
    data, scales = jnp.asarray(arrays["data"]), jnp.asarray(arrays["scales"])  # [128, 128], [1, 128]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((7, data.shape[0])), jnp.float32)
    ours = qmm.quant_matmul(x, data, scales, fmt="fp8", group_size=128, interpret=True)
    ref = qmm.quant_matmul_reference(x, data, scales, fmt="fp8", group_size=128)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_a_contradicting_quantization_is_an_error_naming_both():
    with pytest.raises(UnsupportedQuantization, match="--quantization int8 contradicts .*compressed-tensors "
                                                      "pack-quantized int4 group 32"):
        LLM(fixture_path("ct-w4a16-g32-sym"), quantization="int8", **ENGINE)
    with pytest.raises(UnsupportedQuantization, match="--quantization gptq contradicts .*AWQ"):
        LLM(fixture_path("awq-gemm-g32"), quantization="gptq", **ENGINE)


def test_a_checkpoint_method_on_a_full_precision_checkpoint_is_an_error(tmp_path):
    path = plain_checkpoint("ct-w4a16-g32-sym", tmp_path / "plain")
    with pytest.raises(ValueError, match="--quantization awq names a awq checkpoint, and this one has no "
                                         "quantization_config"):
        LLM(path, quantization="awq", **ENGINE)


# --- memory -------------------------------------------------------------------------------------------

def test_loading_an_awq_checkpoint_allocates_no_full_precision_copy():
    """Host allocations (numpy, tracked by tracemalloc) while the AWQ checkpoint loads in bfloat16
    stay under 1.5x its file size, which a bf16 copy of all the projections (1.7x the file, with the
    file's own arrays alive) would exceed: the projections go from the file's words to int4 one layer
    at a time into one stacked host buffer per projection. Measured: 1.28-1.31x; here that is mostly
    one layer's unpacking temporaries, as this model has only two layers (for Llama-70B's shapes the
    largest stacked projection, down_proj, is 27% of the file). XLA's device buffers are not tracked:
    on a CPU they are the model itself, once."""
    import tracemalloc

    from jaxinfer.models import load_model

    checkpoint = HFCheckpoint(fixture_path("awq-gemm-g32"))
    load = lambda: load_model(checkpoint.config, checkpoint, dtype=jnp.bfloat16, quantization="native")  # noqa: E731
    load()  # compiles what loading runs, so that only the loading's own arrays are counted
    tracemalloc.start()
    try:
        load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * os.path.getsize(os.path.join(fixture_path("awq-gemm-g32"), "model.safetensors"))


def test_a_quantized_gptq_lm_head_is_refused(tmp_path):
    path = copy_with_config("gptq-g32-sym", tmp_path, lambda q: q.update(lm_head=True))
    with pytest.raises(UnsupportedQuantization, match="a quantized LM head"):
        HFCheckpoint(path)


@pytest.mark.parametrize("name", ["gptq-g32-actorder", "ct018-w4a16-g32-asym-actorder"])
def test_down_proj_act_order_is_absorbed_into_gate_and_up(name):
    """down_proj's input is act(gate) * up, elementwise: its act-order permutation is applied to
    gate/up's output columns at load, so it runs without a gather; q/k/v/o/gate/up keep theirs."""
    layers = LLM(fixture_path(name), **ENGINE).engine.model.layers
    assert layers.down_proj.fmt.name == "int4-g32" and layers.down_proj.input_perm is None
    assert layers.gate_proj.fmt.name == "int4-g32-actorder" and layers.gate_proj.input_perm is not None


def test_the_converted_weight_cache_gives_back_the_same_model(prompts, tmp_path):
    """An act-order GPTQ checkpoint through the converted-weight cache: the second load reads the
    cache (input_perm included) and generates the same tokens as the first."""
    options = ENGINE | dict(weight_cache_dir=str(tmp_path / "cache"))
    tokens = []
    for _ in range(2):
        llm = LLM(fixture_path("gptq-g32-actorder"), **options)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
        tokens.append([o.outputs[0].token_ids for o in outs])
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("m", [1, 64])
def test_the_fp8_block_format_lowers_for_cuda(m):
    """fp8-g128 (FP8 block checkpoints) through the Pallas Triton lowering, as on a GPU."""
    import jax

    from kernels_pallas import quant_matmul as qmm
    from tests.helpers import TRITON_CALL, export_for_cuda

    spec = jax.ShapeDtypeStruct
    exported = export_for_cuda(
        lambda x, data, scales: qmm.quant_matmul(x, data, scales, fmt="fp8", group_size=128),
        spec((m, 512), jnp.bfloat16), spec((512, 384), jnp.float8_e4m3fn), spec((4, 384), jnp.float16))
    assert TRITON_CALL in exported.mlir_module()


def test_unpacked_compressed_tensors_zero_points_read_the_same(tmp_path):
    """Older compressed-tensors releases stored an asymmetric pack-quantized checkpoint's zero points
    unpacked (int8 [out, groups]); the same zero points that way give the same weights. (Written here
    from the fixture's packed ones: value - 8 of each nibble, packed along the output dimension.)"""
    from safetensors.numpy import load_file

    name = "ct-w4a16-g32-asym"
    path = tmp_path / name
    shutil.copytree(fixture_path(name), path)
    tensors = load_file(str(path / "model.safetensors"))
    for key in [k for k in tensors if k.endswith("weight_zero_point")]:
        words = tensors[key]  # int32 [out / 8, groups]
        nibbles = np.stack([words.view(np.uint8) & 0xF, words.view(np.uint8) >> 4], -1)  # [out / 8, groups * 4, 2]
        nibbles = nibbles.reshape(words.shape[0], words.shape[1], 8).transpose(0, 2, 1)  # [out / 8, 8, groups]
        tensors[key] = (nibbles.reshape(-1, words.shape[1]).astype(np.int16) - 8).astype(np.int8)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    packed, unpacked = HFCheckpoint(fixture_path(name)), HFCheckpoint(str(path))
    for hf_name in reference_weights(name):
        np.testing.assert_array_equal(our_dequantized(unpacked, hf_name)[0], our_dequantized(packed, hf_name)[0])
