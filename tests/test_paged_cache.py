"""Generation through the paged cache does not depend on page size, batch composition or checkpoint format."""

import pydoc_data.topics

import pytest

from jaxinfer import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [
    "Hello",
    "Write a haiku about the ocean, the moon and the tides that connect them.",
    pydoc_data.topics.topics["if"][:600],
    pydoc_data.topics.topics["while"][:1200] + "\nExplain:",
]


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference_tokens(llm):
    """Each prompt alone, page_size 16."""
    return [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]


def test_batch_of_mixed_lengths_matches_each_prompt_alone(llm, reference_tokens):
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference_tokens


def test_chunked_prefill_matches_whole_prompt_prefill(reference_tokens):
    # A 64-token budget splits the long prompts over several steps, next to other sequences' decode rows.
    small_budget = LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
                      warmup=False, quantization="none")
    assert tokens(small_budget.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference_tokens


@pytest.mark.parametrize("page_size", [1, 8])
def test_page_size_does_not_change_tokens(page_size, reference_tokens):
    llm = LLM("SmolLM2-135M-Instruct", page_size=page_size, max_model_len=512, max_num_seqs=4, warmup=False,
              quantization="none")
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference_tokens
    assert llm.engine.allocator.num_free_pages == llm.engine.allocator.num_pages


def test_hf_directory_gives_the_same_tokens_as_the_gguf(hf_dir, reference_tokens):
    llm = LLM(hf_dir, max_model_len=512, max_num_seqs=4, warmup=False, quantization="none")
    assert llm.engine.model_config.architecture == "llama"
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference_tokens
