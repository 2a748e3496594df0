"""The README's Models table, each row a tiny random-weight model built by HF transformers from a
config written here: Llama with llama3 and with linear RoPE scaling, Mistral with a sliding window
shorter than the prompts, Qwen2 with q/k/v biases, GQA and tied embeddings, Qwen3 with its per-head
q/k norms and a head_dim other than hidden_size / heads (as Qwen3-0.6B's 128 against 1024 / 16).

The engine loads each through both loaders: the HF directory transformers saved (config.json +
safetensors), and a GGUF file written here the way llama.cpp's convert_hf_to_gguf.py writes that
architecture (its tensor names, its q/k row permutation for "llama", its metadata keys, Llama 3.1's
`rope_freqs.weight`). The reference is transformers itself (torch, CPU, float32) on the same weights.

Tolerance: both sides are float32 end to end, with logits up to ~3.5 (matrices drawn for
unit-variance outputs), so they differ only by float32 rounding in another summation order: at most
3.3e-6 here. 1e-4 leaves 30x room for that; a real difference is far above it (dropping the
window, the q/k/v biases or the q/k norms moves logits by 2.5 to 4). Greedy tokens are safe too: the smallest
gap between HF's top two logits at these prompts is 0.06.
"""

import dataclasses

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from helpers import prefill_logits
from tests.hf_reference import HFModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxinfer import LLM, SamplingParams
from jaxinfer.models.llama import rope_inv_freq
from jaxinfer.weights.gguf import GGUFCheckpoint
from jaxinfer.weights.hf import HFCheckpoint

NEW_TOKENS = 16
LOGITS_ATOL = 1e-4
VOCAB_SIZE = 320  # 256 byte-level symbols + 64 merges
PROMPT_LENGTHS = (100, 77, 45)  # all longer than Mistral's window; 100 is prefilled in two chunks
# warmup off: compile only the step shapes these prompts use. No weight cache: its entries would be
# keyed by throwaway tmp paths in the user's cache directory.
ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, page_size=16, warmup=False,
              weight_cache_dir=None)

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# name: (HF model_type, config.json fields over BASE)
ARCHITECTURES = {
    # original_max_position_embeddings 64: of head_dim 16's eight wavelengths (6 to 19,869 positions),
    # one is below 64 / high_freq_factor (kept), two are in the smoothed band and five are divided by 8.
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    # A 32-token window: 2 pages of 16, so it starts mid-page and crosses page and chunk boundaries.
    "mistral": ("mistral", {"sliding_window": 32}),
    "qwen2": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
}
GGUF_ARCH = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}  # Mistral converts as "llama"


# --- the files: a byte-level BPE tokenizer, and the GGUF as llama.cpp writes it ---------------------

def byte_level_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a small byte-level BPE: GPT-2's 256 byte symbols, then 64 letter pairs."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    letters = "etaoinsh"
    merges = [f"{a} {b}" for a in letters for b in letters]
    return symbols + [m.replace(" ", "") for m in merges], merges


def write_tokenizer_json(path) -> None:
    """The HF directory's tokenizer.json: the engine needs one to start, the tests give token ids."""
    tokens, merges = byte_level_vocab()
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=[tuple(m.split(" ")) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's LlamaModel.generate_extra_tensors computes it: the divisor of
    each inverse frequency. (llama.cpp reads original_max_position_embeddings from the top level of
    config.json, where Llama 3.1 has none, so it takes its default 8192, which is Llama 3.1's value;
    here the value the rope parameters give, so the file says what the HF model does.)"""
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, low, high, old_len = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings"))
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, medium)).astype(np.float32)


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute of q/k rows: each head's two halves interleaved into pairs."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(config: dict, hf_tensors: dict, arch) -> dict[str, np.ndarray]:
    """The HF tensors under llama.cpp's names; q/k rows permuted for the "llama" architecture only
    (Mistral converts as "llama"; Qwen2 and Qwen3 keep HF's rotate-half order)."""
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out = {}
    for hf_name, w in hf_tensors.items():
        base, _, suffix = hf_name.rpartition(".")
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"] if base.endswith("q_proj") else config["num_key_value_heads"]
            w = permute_rope_rows(w, heads)
        out[f"{names.get_name(base)}.{suffix}"] = w
    rope = config.get("rope_parameters", {})
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(rope, config["hidden_size"] // config["num_attention_heads"])
    return out


def write_gguf(path, model_type: str, config: dict, hf_dir, sampling: dict | None = None) -> str:
    """A float32 GGUF of the HF checkpoint, with the metadata convert_hf_to_gguf.py writes for it
    (`sampling`: general.sampling keys, {"temp": 0.6, ...}, through the gguf writer's add_sampling_*).

    One key is ours: llama.cpp converts Mistral v0.1 as "llama" and writes no sliding window (it
    runs it with full attention); the window goes under GGUF's standard key, `llama.attention.sliding_window`.
    """
    arch = GGUF_ARCH.get(model_type, gguf.MODEL_ARCH.LLAMA)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny-{model_type}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for add, value in ((writer.add_context_length, config["max_position_embeddings"]),
                       (writer.add_embedding_length, config["hidden_size"]),
                       (writer.add_block_count, config["num_hidden_layers"]),
                       (writer.add_feed_forward_length, config["intermediate_size"]),
                       (writer.add_head_count, config["num_attention_heads"]),
                       (writer.add_head_count_kv, config["num_key_value_heads"]),
                       (writer.add_layer_norm_rms_eps, config["rms_norm_eps"])):
        add(value)
    rope = config.get("rope_parameters", {})
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if "head_dim" in config:  # TextModel.set_gguf_parameters, for every architecture
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == gguf.MODEL_ARCH.LLAMA:  # LlamaModel.set_gguf_parameters; Qwen2's and Qwen3's write neither
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)
    tokens, merges = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges(merges)
    hf_tensors = load_file(str(hf_dir / "model.safetensors"))
    for name, w in gguf_tensors(config, hf_tensors, arch).items():
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# --- fixtures: one built model per architecture, one engine per (architecture, loader) -------------

@dataclasses.dataclass(slots=True)
class Built:
    """One architecture's model: held by the reference process, and as the engine's two inputs."""
    name: str
    config: dict  # config.json fields
    hf_model: HFModel
    hf_dir: str
    gguf_path: str


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def built(request, hf_reference, tmp_path_factory) -> Built:
    name = request.param
    model_type, fields = ARCHITECTURES[name]
    config = BASE | fields
    hf_dir = tmp_path_factory.mktemp(name)
    hf_model = hf_reference.build_random(model_type, config, 0, hf_dir)
    write_tokenizer_json(hf_dir)
    gguf_path = write_gguf(tmp_path_factory.mktemp(f"{name}-gguf") / f"{name}.gguf", model_type, config, hf_dir)
    return Built(name, config, hf_model, str(hf_dir), gguf_path)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB_SIZE, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def hf_greedy(built, prompts):
    return built.hf_model.greedy(prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def hf_logits(built, prompts):
    return built.hf_model.last_logits(prompts)


@pytest.fixture(scope="module", params=["hf-dir", "gguf"])
def llm(request, built):
    """Full precision (quantization "none"): the reference's float32 weights, as stored."""
    path = built.hf_dir if request.param == "hf-dir" else built.gguf_path
    return LLM(path, quantization="none", **ENGINE)


def greedy(llm, prompts, max_tokens=NEW_TOKENS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs]


# --- the specification -------------------------------------------------------------------------------

def test_both_loaders_read_the_same_model(built):
    """The HF config and the GGUF metadata give one model: same shapes, bias, window, tying, and the
    same RoPE frequencies (from rope_scaling on one side, from rope_freqs.weight on the other)."""
    hf, gg = HFCheckpoint(built.hf_dir).config, GGUFCheckpoint(built.gguf_path).config
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "rope_theta", "tie_word_embeddings", "attention_bias", "qk_norm", "sliding_window")
    assert {f: getattr(gg, f) for f in fields} == {f: getattr(hf, f) for f in fields}
    assert gg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)  # GGUF stores it as float32
    np.testing.assert_allclose(rope_inv_freq(gg), rope_inv_freq(hf), rtol=1e-6)
    assert hf.sliding_window == built.config.get("sliding_window")
    assert hf.attention_bias == (built.name == "qwen2")
    assert hf.qk_norm == (built.name == "qwen3")
    assert hf.head_dim == built.config.get("head_dim", built.config["hidden_size"] // built.config["num_attention_heads"])


def test_the_scaling_and_the_window_change_what_the_prompts_see(built):
    """Preconditions that make the comparisons below able to fail: the RoPE scaling changes the
    frequencies the prompt positions use, and the window is shorter than every prompt."""
    hf = HFCheckpoint(built.hf_dir).config
    if hf.rope_scaling is not None:
        unscaled = rope_inv_freq(dataclasses.replace(hf, rope_scaling=None))
        # at least two frequencies turn by more than a radian further, or less, within the shortest prompt
        assert (np.abs(rope_inv_freq(hf) - unscaled) * min(PROMPT_LENGTHS) > 1).sum() >= 2
    if hf.sliding_window is not None:
        assert hf.sliding_window < min(PROMPT_LENGTHS)


def test_greedy_tokens_match_hf(llm, prompts, hf_greedy):
    for prompt, ours, ref in zip(prompts, greedy(llm, prompts), hf_greedy):
        assert ours == ref, f"prompt of {len(prompt)} tokens diverged"


def test_last_position_logits_match_hf(llm, prompts, hf_logits):
    for prompt, ref in zip(prompts, hf_logits):
        np.testing.assert_allclose(prefill_logits(llm.engine.model, prompt), ref, rtol=0, atol=LOGITS_ATOL)


def test_default_configuration_runs_and_its_first_token_is_in_hf_top5(built, prompts, hf_logits):
    """`LLM(path)` on the GGUF as a user starts it: on CPU it quantizes the projections (int8 per
    channel), so tokens may differ from full precision; the first one must still be in HF's top 5."""
    llm = LLM(built.gguf_path, **ENGINE)
    for ours, ref in zip(greedy(llm, prompts, max_tokens=1), hf_logits):
        assert ours[0] in np.argsort(ref)[-5:]


def test_a_bias_the_model_does_not_apply_is_refused(tmp_path):
    """A Llama-family config with attention_bias gives o_proj a bias too (HF's Llama and Qwen3): only
    q/k/v biases are read here, so a checkpoint that holds o_proj's is refused, not run without it."""
    from safetensors.numpy import save_file
    from tp_worker import write_random_llama

    from jaxinfer.config import UnsupportedModelError

    path = write_random_llama(str(tmp_path), dict(attention_bias=True, model_type="qwen3"))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.ones(BASE["hidden_size"], np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="model.layers.0.self_attn.o_proj.bias"):
        LLM(path, quantization="none", **ENGINE)


def test_a_qwen2_window_on_the_layers_from_max_window_layers_on_matches_hf(hf_reference, prompts, tmp_path_factory):
    """Qwen2 with `use_sliding_window`: transformers puts the window on layers max_window_layers and
    up and none before them. A 32-token window on the second of two layers, from an HF directory (a
    GGUF does not carry use_sliding_window): logits and greedy tokens as HF's, where the same model
    with the window on both layers, or on neither, gives logits far from them."""
    fields = dict(BASE, num_key_value_heads=1, use_sliding_window=True, sliding_window=32)
    hf = {}
    for first in (1, 0, 2):  # the model under test, then the window on both layers and on none
        hf_dir = tmp_path_factory.mktemp(f"qwen2-window-{first}")
        hf[first] = hf_reference.build_random("qwen2", dict(fields, max_window_layers=first), 0, hf_dir)
        if first == 1:
            write_tokenizer_json(hf_dir)
            path = str(hf_dir)
    logits = {first: model.last_logits(prompts) for first, model in hf.items()}
    for other in (0, 2):  # the same draws (seed 0): only the windows differ
        assert all(np.abs(a - b).max() > 100 * LOGITS_ATOL for a, b in zip(logits[other], logits[1]))
    llm = LLM(path, quantization="none", **ENGINE)
    assert llm.engine.model_config.layer_windows() == (0, 32)
    for prompt, ref in zip(prompts, logits[1]):
        np.testing.assert_allclose(prefill_logits(llm.engine.model, prompt), ref, rtol=0, atol=LOGITS_ATOL)
    assert greedy(llm, prompts) == hf[1].greedy(prompts, NEW_TOKENS)
