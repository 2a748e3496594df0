"""How close the default configuration's greedy text stays to full precision, on a fixed prompt set.

The reference is HF transformers (torch, float32) on the same GGUF file, dequantized: the file's own
weights at full precision. On the CPU the default runs the file's Q4_1 blocks as stored with int8
activations (kernels_cpu/group_matmul.cc) and its Q8_0 head as stored, as llama.cpp does, so the
only error it adds is the activations' rounding. The bound below is the measured result less a
margin; docs/QUANTIZATION.md gives the numbers beside llama.cpp's on the same file and prompts.
"""

import pydoc_data.topics

import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.evaluate import top_tokens

TOPICS = pydoc_data.topics.topics
NEW_TOKENS = 32
PLAIN = ["The capital of France is", "def fibonacci(n):", "List three primary colors:\n1.",
         TOPICS["assert"][:1300] + "\n\nIn short, the assert statement", "Once upon a time, in a small village,",
         "The three laws of thermodynamics are", "import numpy as np\n\ndef softmax(x):",
         "Q: What is 17 times 23?\nA:", "The mitochondria is", TOPICS["with"][:600] + "\n\nTo summarize,"]
CHATS = [[{"role": "user", "content": text}] for text in [
    "What is the boiling point of water at sea level?", "Write a haiku about autumn.",
    "Explain recursion to a child.", "Give me three tips for better sleep.",
    "Summarize this documentation in one sentence:\n" + TOPICS["for"][:1000],
    "Translate 'good morning' into Spanish and French.",
    "What is the difference between a list and a tuple in Python?", "Who wrote Pride and Prejudice?"]]
# Teacher-forced agreement: at each of HF's greedy tokens (547 positions: some prompts end at EOS
# first), given HF's own context, how often the default's best token is HF's. Measured on the CPU
# default (native Q4_1 blocks, int8 activations, Q8_0 head): 530 to 538, as the attention's last-bit
# rounding varied (the native kernel before and after key tiles, XLA's attention, q scaled by 1 +- 1e-6);
# HF's token in the default's top 5 at all 547. How many prompts keep HF's 32 greedy tokens throughout
# moved from 5 to 10 of 18 under the same 1e-6 perturbations (one flipped near-tie ends a prompt's
# run), too noisy to hold a bound on.
MIN_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    ids = [hf_tokenizer.encode(p) for p in PLAIN]
    ids += [hf_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in CHATS]
    return [list(map(int, p)) for p in ids]


@pytest.fixture(scope="module")
def default_llm():
    llm = LLM("SmolLM2-135M-Instruct", max_model_len=1024, max_num_seqs=18, max_num_batched_tokens=512,
              warmup=False)
    assert llm.engine.quantization == "native" and llm.engine.lm_head_quantization == "native"
    return llm


@pytest.fixture(scope="module")
def reference(prompts, hf_model):
    return hf_model.greedy(prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def teacher_forced(prompts, reference, default_llm):
    """[prompt][position] the default's 5 best tokens after the prompt and HF's tokens before that
    position (its float16 KV cache too)."""
    seqs = [p + r for p, r in zip(prompts, reference)]
    n = max(map(len, seqs))
    top = top_tokens(default_llm.engine.model, [s + [0] * (n - len(s)) for s in seqs], 5,  # padded at the end
                     cache_dtype=default_llm.engine.kv_cache_dtype)
    return [top[i, len(p) - 1:len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, reference))]


def test_default_agrees_with_full_precision_given_its_context(reference, teacher_forced):
    positions = sum(map(len, reference))
    agree = sum(int((top[:, 0] == ref).sum()) for top, ref in zip(teacher_forced, reference))
    assert agree >= MIN_AGREEMENT * positions, (agree, positions)
    for i, (top, ref) in enumerate(zip(teacher_forced, reference)):
        missing = [j for j, t in enumerate(ref) if t not in top[j]]
        assert not missing, (i, missing)  # HF's token is among the default's 5 best everywhere


def test_served_greedy_text_is_the_models_best_token_until_it_leaves_full_precision(
        prompts, reference, teacher_forced, default_llm):
    """The engine's greedy text (18 prompts batched, long ones prefilled in chunks, logprobs on) is
    the model's own best token at each step: identical to the teacher-forced forward up to and
    including the first token where it leaves HF's text (the contexts are the same until there)."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5)
    outputs = [out.outputs[0] for out in default_llm.generate(prompts, params, use_tqdm=False)]
    for i, (out, ref, top) in enumerate(zip(outputs, reference, teacher_forced)):
        same = next((j for j, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b), len(ref) - 1)
        assert list(out.token_ids[:same + 1]) == top[:same + 1, 0].tolist(), i
        assert [t for t, _ in out.logprobs[same].top] == top[same].tolist(), i
