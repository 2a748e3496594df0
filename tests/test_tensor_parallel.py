"""Tensor parallelism (`jaxinfer.tensor_parallel`): a model split over N devices gives what one
device gives. The reference is the same engine at `tensor_parallel_size=1`, the step as it was.

The engines run in a subprocess (tests/tp_worker.py) with 4 forced host CPU devices; this session
has one. Tolerance: with float activations the split changes only the order of float32 sums (each
all-reduce adds per-device partial sums), a few 1e-6 in logprobs here; 1e-4 leaves room. With the
CPU default, int8 activations (each block of 32 values rounded to int8 in the native kernels), a
1-ulp change in a row can move a rounding by one step, and 30 layers amplify it to ~0.1 in a
logprob: there the greedy tokens are the specification, up to a near tie where they part
(helpers.assert_same_greedy_tokens_up_to_a_near_tie). The weight formats' checks keep a float32 KV
cache: the CPU default's float16 cache would round those 1-ulp differences to whole float16 steps.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import assert_same_greedy_tokens_up_to_a_near_tie

from jaxinfer.cli import build_parser, engine_overrides

SMOLLM2 = "SmolLM2-135M-Instruct"  # 9 query heads, 3 KV heads: TP 3 divides both
WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
LOGPROB_ATOL = 1e-4
NEW_TOKENS = 6
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "List three primary colors:"]
# Random models (token-id prompts): a Llama with heads and KV heads that TP 2 and 4 divide, and a
# Qwen3 with KV heads fewer than 4 devices (each replicated on 2), q/k/v biases split with the heads
# they belong to, its per-head q/k norms (replicated) and a head_dim of 32 against hidden / heads = 16.
DIVIDING = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
REPLICATED_KV = dict(DIVIDING, num_key_value_heads=2, attention_bias=True, model_type="qwen3", head_dim=32)
RANDOM_PROMPTS = [list(range(5, 40)), [100, 3, 250, 77], [7] * 20]
# Weight formats whose split differs: full precision; int8 per column (row split: scales whole);
# int4 in groups of 32 rows (row split on group boundaries). Float activations: exact up to sum order.
FORMATS = {"float": dict(quantization="none"),
           "int8": dict(quantization="int8", cpu_integer_matmul=False, kv_cache_dtype="float32"),
           "int4": dict(quantization="int4", cpu_integer_matmul=False, kv_cache_dtype="float32"),
           # o_proj's K is 128: one group
           "int4-g128": dict(quantization="int4", quantization_group_size=128, kv_cache_dtype="float32"),
           # the Pallas kernels (attention, K/V write, int4 matmul) in interpret mode, run per shard
           "pallas": dict(quantization="int4", attention_backend="pallas_interpret", matmul_backend="pallas_interpret",
                          kv_cache_dtype="float32")}


def run_workers(jobs: list[dict]) -> list[list[dict]]:
    """Each job {model, prompts, runs, max_tokens} in one worker process: its results per run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, WORKER, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=300 * len(jobs))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def job(model: str, prompts, runs: list[dict], max_tokens: int = NEW_TOKENS) -> dict:
    return dict(model=model, prompts=prompts, max_tokens=max_tokens, runs=runs)


def run_worker(model: str, prompts, runs: list[dict], max_tokens: int = NEW_TOKENS) -> list[dict]:
    return run_workers([job(model, prompts, runs, max_tokens)])[0]


def max_logprob_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for la, lb in zip(a["logprobs"], b["logprobs"]) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def smollm2():
    """{(tp, configuration): result}: the default configuration and float weights and activations."""
    keys = [(1, "default"), (3, "default"), (1, "float"), (3, "float"), (2, "default")]
    runs = [dict(tp=tp, **({} if name == "default" else FORMATS[name])) for tp, name in keys]
    return dict(zip(keys, run_worker(SMOLLM2, PROMPTS, runs)))


@pytest.fixture(scope="module")
def random_models():
    """{(model, format, tp): result} for the two random Llamas."""
    jobs, keys = [], []
    for model, fields, sizes in (("dividing", DIVIDING, dict(float=(1, 2, 4), int8=(1, 4), int4=(1, 4), **{"int4-g128": (4,)})),
                                 ("replicated_kv", REPLICATED_KV, dict(float=(1, 4), int8=(1, 4)))):
        keys.append([(model, name, tp) for name in sizes for tp in sizes[name]])
        jobs.append(job("random:" + json.dumps(fields), RANDOM_PROMPTS,
                        [dict(tp=tp, **FORMATS[name]) for _, name, tp in keys[-1]]))
    # Interpret mode is slow: one prompt, three tokens.
    keys.append([("dividing", "pallas", 1), ("dividing", "pallas", 2)])
    jobs.append(job("random:" + json.dumps(DIVIDING), RANDOM_PROMPTS[1:2],
                    [dict(tp=tp, **FORMATS["pallas"]) for tp in (1, 2)], max_tokens=3))
    return {key: result for job_keys, results in zip(keys, run_workers(jobs), strict=True)
            for key, result in zip(job_keys, results, strict=True)}


@pytest.fixture(scope="module")
def q5_q6_split(tmp_path_factory):
    """{tp: result}: a 1-layer GGUF of Q4_K_M's 5- and 6-bit types (attn_output Q5_0, ffn_down Q6_K:
    the row-parallel ones) on the Pallas kernels, interpreted: the formats a GPU runs (int5, int6),
    split at TP 2 (o_proj 256 rows, down_proj 512: 128 and 256 a device)."""
    from tests.test_kquants import one_layer_gguf

    path = tmp_path_factory.mktemp("q5_q6_tp") / "tiny-q5-q6.gguf"
    one_layer_gguf(path, 31, {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q6_K", "attn_output": "Q5_0",
                              "ffn_gate": "Q5_1", "ffn_up": "Q5_0", "ffn_down": "Q6_K"})
    runs = [dict(tp=tp, max_model_len=128, quantization="native", matmul_backend="pallas_interpret",
                 kv_cache_dtype="float32")
            for tp in (1, 2)]
    return dict(zip((1, 2), run_worker(str(path), [[5, 3, 25, 7, 30, 1]], runs, max_tokens=3)))


def test_int5_int6_weights_split_by_rows_equal_one_device(q5_q6_split):
    """GGUF's Q5_0/Q6_K kept as int5/int6 under tensor parallelism (they were requantized to int8):
    each device's rows packed again with their own high-bit bands, the same tokens and logprobs."""
    one, split = q5_q6_split[1], q5_q6_split[2]
    assert {"int5-g32-sym", "int5-g32", "int6-g16-sym"} <= set(split["formats"]), split["formats"]
    assert split["formats"] == one["formats"]
    assert split["tokens"] == one["tokens"]
    assert max_logprob_difference(split, one) < LOGPROB_ATOL


@pytest.mark.parametrize("fmt", ["int5", "int6"])
@pytest.mark.parametrize("size", [2, 4])
def test_a_row_split_of_high_bit_formats_dequantizes_to_the_rows_of_the_whole(fmt, size):
    """Each device's piece of an int5/int6 stack (codes repacked, scales and mins split by group)
    dequantizes to its rows of the whole weight; the bands of a piece start at its own row 0."""
    import types

    import jax.numpy as jnp
    import numpy as np

    from jaxinfer import quant, tensor_parallel
    from kernels_pallas import quant_matmul as qmm

    layers, k, n, group = 2, 1024, 64, 16
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 1 << (4 + qmm.HIGH_BITS[fmt]), (layers, k, n))
    data = np.stack([qmm.pack_high_bits(q, fmt) for q in codes])
    scales = rng.uniform(0.5, 2, (layers, k // group, n)).astype(np.float16)
    mins = rng.uniform(-1, 1, (layers, k // group, n)).astype(np.float16)
    node = types.SimpleNamespace(fmt=quant.WeightFormat(fmt, group, symmetric=False), in_features=k)
    pieces = {name: tensor_parallel._split("down_proj", name, leaf, node=node, c=None, size=size)
              for name, leaf in (("w", data), ("scales", scales), ("mins", mins))}
    for layer in range(layers):
        whole = quant.dequantize(quant.QuantizedWeight(jnp.asarray(data[layer]), jnp.asarray(scales[layer]),
                                                       jnp.asarray(mins[layer]), fmt, group))
        for d in range(size):
            piece = quant.dequantize(quant.QuantizedWeight(*(pieces[name][d][layer] for name in ("w", "scales", "mins")),
                                                           fmt, group))
            rows = slice(d * k // size, (d + 1) * k // size)
            assert pieces["w"][d].shape[1] == k // size // 2 + qmm.high_rows(fmt, k // size)
            np.testing.assert_array_equal(np.asarray(piece), np.asarray(whole[rows]))
    node.in_features = 640  # 320 rows a device at TP 2: not a multiple of 128
    with pytest.raises(ValueError, match="down_proj's 640 input rows do not split into 2 parts of a multiple of 128"):
        tensor_parallel._split("down_proj", "w", data[:, :320 + 128], node=node, c=None, size=2)


def test_smollm2_tp3_greedy_tokens_equal_tp1_in_the_default_configuration(smollm2):
    """Up to a near tie: the split changes the all-reduce's float rounding (module docstring)."""
    for split, one in zip(smollm2[3, "default"]["top"], smollm2[1, "default"]["top"], strict=True):
        assert_same_greedy_tokens_up_to_a_near_tie(split, one)


def test_smollm2_tp3_splits_the_embedding_and_lm_head_by_vocabulary_entry(smollm2):
    """49,152 entries: 16,384 a device, the LM head in the file's Q8_0 blocks, tied to the embedding."""
    assert smollm2[3, "default"]["vocab_parallel"] and smollm2[3, "float"]["vocab_parallel"]


def test_smollm2_tp3_float_tokens_and_logprobs_equal_tp1(smollm2):
    assert smollm2[3, "float"]["tokens"] == smollm2[1, "float"]["tokens"]
    assert max_logprob_difference(smollm2[3, "float"], smollm2[1, "float"]) < LOGPROB_ATOL


@pytest.mark.parametrize("fmt, tp", [("float", 2), ("float", 4), ("int8", 4), ("int4", 4), ("pallas", 2)])
def test_random_model_split_by_heads_equals_one_device(random_models, fmt, tp):
    one, split = random_models["dividing", fmt, 1], random_models["dividing", fmt, tp]
    assert split["tokens"] == one["tokens"]
    assert max_logprob_difference(split, one) < LOGPROB_ATOL


@pytest.mark.parametrize("fmt", ["float", "int8"])
def test_fewer_kv_heads_than_devices_are_replicated(random_models, fmt):
    """2 KV heads on 4 devices: each goes to the 2 devices whose query heads read it (a Qwen3: its
    q/k norms are replicated with them)."""
    one, split = random_models["replicated_kv", fmt, 1], random_models["replicated_kv", fmt, 4]
    assert split["tokens"] == one["tokens"]
    assert max_logprob_difference(split, one) < LOGPROB_ATOL


def test_a_size_the_heads_do_not_allow_is_an_error_at_start_up(smollm2):
    error = smollm2[2, "default"]["error"]
    assert error.startswith("ValueError: tensor_parallel_size 2 does not fit")
    assert "9 attention heads do not divide by 2" in error and "3 KV heads" in error


def test_a_row_split_off_the_group_boundaries_is_an_error_at_start_up(random_models):
    """int4 in groups of 128 rows: o_proj's 128 rows are one group, which 4 devices cannot share."""
    assert random_models["dividing", "int4-g128", 4]["error"] == (
        "ValueError: tensor_parallel_size 4: o_proj's 128 input rows do not split into 4 equal parts on its "
        "format's boundaries (int4-g128)")


def test_a_size_past_the_device_count_is_an_error_at_start_up():
    from jaxinfer import LLM

    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs 2 devices, but only 1"):
        LLM(SMOLLM2, tensor_parallel_size=2, warmup=False)


def test_the_flag_sets_the_engine_config():
    args = build_parser().parse_args(["--tensor-parallel-size", "3"])
    assert engine_overrides(args) == {"tensor_parallel_size": 3}
