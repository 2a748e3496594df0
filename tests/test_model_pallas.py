"""The model with the Pallas attention kernels (run by the interpreter) equals the XLA path on real weights."""

import numpy as np

from jaxinfer import LLM, SamplingParams


def test_pallas_attention_in_the_model_matches_xla(llm):
    # Small on purpose: interpret mode runs every kernel program in Python-driven JAX, 30 layers deep.
    pallas = LLM("SmolLM2-135M-Instruct", attention_backend="pallas_interpret", max_model_len=64, max_num_seqs=2,
                 max_num_batched_tokens=32, warmup=False, quantization="none")
    prompts = ["The capital of France is", "def add(a, b):\n   "]  # one prefill chunk each, then decode rows
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=5)
    ours = pallas.generate(prompts, params, use_tqdm=False)
    ref = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]
            np.testing.assert_allclose([v for _, v in la.top], [v for _, v in lb.top], atol=1e-3)
