"""Continuous batching: outputs do not depend on batching, chunking, prefix caching or preemption."""

import random

import pydoc_data.topics
import pytest

from jaxinfer import LLM, SamplingParams

TOPICS = pydoc_data.topics.topics
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
SHARED_PREFIX = TOPICS["for"][:900]


def mixed_prompts():
    """24 prompts of 1 to ~300 tokens."""
    names = sorted(TOPICS)[:24]
    lengths = [3, 40, 120, 400, 800, 1200] * 4
    return [TOPICS[name][:n] for name, n in zip(names, lengths)]


def shared_prefix_prompts():
    """6 prompts behind one ~200-token prefix, 6 without it."""
    tails = mixed_prompts()[:12]
    return [SHARED_PREFIX + f"\nQuestion {i}: " + t[:60] if i % 2 == 0 else t for i, t in enumerate(tails)]


# Every engine here runs the default configuration (on the CPU: int8 weights, int8 activations, the
# native kernels): it is the one that must give a sequence the same tokens whatever shares its batch.
# A test of the float-activation path says so in its name.


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone():
    """The reference engine: no prefix caching, a budget that takes any prompt in one step; one prompt at a time."""
    llm = LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=512,
              enable_prefix_caching=False, warmup=False)

    def run(prompts):
        return [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    return run


@pytest.fixture(scope="module")
def batched():
    """64 sequences a step, 128 tokens a step: long prompts are prefilled in chunks beside decode rows."""
    return LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=64, max_num_batched_tokens=128,
               strict_compile=True)


def assert_no_leak(llm):
    allocator = llm.engine.allocator
    assert allocator.num_free_pages == allocator.num_pages
    assert all(count == 0 for count in allocator.ref_counts)
    assert not llm.engine.has_unfinished_requests()


def test_batched_chunked_outputs_equal_each_prompt_alone(alone, batched):
    prompts = mixed_prompts()
    assert tokens(batched.generate(prompts, GREEDY, use_tqdm=False)) == alone(prompts)
    assert_no_leak(batched)


def test_64_sequences_decoding_together_equal_each_alone(batched):
    """Batch sizes from 1 to 64 in one run: ~4-token prompts are admitted ~25 a step (128-token budget),
    and all 64 are decoding together before the first finishes."""
    names = sorted(TOPICS)
    prompts = [f"{names[i % len(names)]} {i}:" for i in range(64)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runner = batched.engine.runner
    execute, sizes = runner.execute, []
    runner.execute = lambda work, *args: sizes.append(len(work)) or execute(work, *args)  # this run only
    try:
        together = tokens(batched.generate(prompts, params, use_tqdm=False))
    finally:
        del runner.execute
    assert max(sizes) == 64
    assert together == [tokens(batched.generate([p], params, use_tqdm=False))[0] for p in prompts]
    assert_no_leak(batched)


def test_logprobs_do_not_depend_on_the_batch(batched):
    prompts = mixed_prompts()[:8]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)
    together = batched.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, together):
        single = batched.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.outputs[0].token_ids == single.token_ids
        for a, b in zip(out.outputs[0].logprobs, single.logprobs):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert abs(a.logprob - b.logprob) <= 1e-5
            assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a.top, b.top))


def test_float_activation_path_is_batch_invariant_too():
    """cpu_integer_matmul=False: int8 weights, float32 activations (the native kernel's float path)."""
    prompts = mixed_prompts()[:6]
    llm = LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
              warmup=False, cpu_integer_matmul=False)
    together = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert together == [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert_no_leak(llm)


def test_prefix_cache_hits_give_the_same_outputs(alone, batched):
    prompts = shared_prefix_prompts()
    allocator = batched.engine.allocator
    hits_before = allocator.prefix_cache_hits
    reference = alone(prompts)
    assert tokens(batched.generate(prompts, GREEDY, use_tqdm=False)) == reference
    # Run again: now every prompt's full pages are cached.
    assert tokens(batched.generate(prompts, GREEDY, use_tqdm=False)) == reference
    assert allocator.prefix_cache_hits - hits_before >= 11 * 160  # ~200-token prefix, 6 prompts, 2 runs
    assert_no_leak(batched)


def test_preemption_when_pages_run_out_keeps_outputs():
    # 40 pages of 16 tokens hold ~3 of these sequences at once; 8 arrive together.
    tiny = LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
               num_pages=40, warmup=False)
    prompts = [TOPICS[name][:700] for name in sorted(TOPICS)[30:38]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    out = tokens(tiny.generate(prompts, params, use_tqdm=False))
    assert tiny.engine.scheduler.num_preemptions > 0
    ref_llm = LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=512,
                  enable_prefix_caching=False, warmup=False)
    assert out == tokens(ref_llm.generate(prompts, params, use_tqdm=False))
    assert_no_leak(tiny)


def test_abort_mid_generation_frees_every_page(batched):
    engine = batched.engine
    ids = [engine.add_request(TOPICS["try"][:300 + 50 * i], SamplingParams(max_tokens=200, ignore_eos=True))
           for i in range(6)]
    for _ in range(5):
        engine.step()
    assert engine.allocator.num_free_pages < engine.allocator.num_pages
    for request_id in ids:
        engine.abort_request(request_id)
    assert_no_leak(batched)


def test_no_compilation_after_warmup(batched):
    """50 requests of random lengths and sampling settings (prompt logprobs too): strict mode raises on
    any compile."""
    rng = random.Random(0)
    text = TOPICS["class"]
    engine = batched.engine
    compiled_before = engine.runner.num_compilations
    for i in range(50):
        start = rng.randrange(0, 2000)
        prompt = text[start:start + rng.randrange(1, 1000)] or "x"
        params = SamplingParams(max_tokens=rng.randrange(1, 8), temperature=rng.choice([0.0, 0.7, 1.2]),
                                top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([-1, 20]), seed=i,
                                repetition_penalty=rng.choice([1.0, 1.2]), logprobs=rng.choice([None, 3]),
                                prompt_logprobs=rng.choice([None, None, None, 2]))
        engine.add_request(prompt, params)
        if i % 3 == 0:
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.num_compilations == compiled_before == 0
    assert_no_leak(batched)


def test_a_step_shape_warm_up_did_not_compile_is_caught(batched):
    """The guard itself: a step whose padded shape has no warmed program raises in strict mode. The
    sequence cap is raised under the runner's feet, so 3 sequences pad to 4 rows where warm-up built 2."""
    from jaxinfer.compilation import CompilationDuringServingError

    llm = LLM("SmolLM2-135M-Instruct", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=4,
              strict_compile=True)
    runner = llm.engine.runner
    assert runner.buckets() == [(1, 1), (2, 2), (4, 2)]
    runner.config = runner.config.replace(max_num_seqs=4)
    with pytest.raises(CompilationDuringServingError, match=r"\(4, 4\)"):
        runner.execute([(seq, 1) for seq in fake_sequences(llm, 3)])
    assert runner.num_compilations == 1


def test_warmed_programs_outlive_jax_dropping_its_own_caches():
    """JAX's jit caches are bounded and process-wide: a process holding thousands of jitted
    functions evicts warmed step programs from them (`jax.clear_caches()` is the same, at once). The
    runner keeps its own executables, so a strict engine then serves without tracing anything."""
    import jax

    llm = LLM("SmolLM2-135M-Instruct", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=4,
              strict_compile=True)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    before = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    jax.clear_caches()
    after = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]  # strict: raises on a trace
    assert after == before and all(len(ids) == 4 for ids in after)
    assert llm.engine.runner.num_compilations == 0


def fake_sequences(llm, n):
    """n one-token sequences with a page each, straight from the allocator."""
    from jaxinfer.sequence import Sequence

    seqs = []
    for i in range(n):
        seq = Sequence(f"guard-{i}", [1], SamplingParams(max_tokens=1), seed=0)
        seq.block_table = [llm.engine.allocator.num_pages - 1 - i]
        seqs.append(seq)
    return seqs


def test_cache_salt_requests_share_prefix_pages_only_with_their_own_salt(batched):
    engine = batched.engine
    prompt = SHARED_PREFIX + "\nSalted question."

    def cached_tokens(cache_salt):
        request_id = engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0), cache_salt=cache_salt)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    metrics = out.metrics
        return metrics.num_cached_tokens

    cached_tokens("tenant-a")
    assert cached_tokens("tenant-b") == 0
    assert cached_tokens("tenant-a") > 100
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request(prompt, cache_salt="")
    with pytest.raises(ValueError, match="cache_salt"):  # refused on the caller's thread, not the engine's
        engine.add_request(prompt, cache_salt="tenant-\ud800")
    assert_no_leak(batched)


def test_seeded_sampling_does_not_depend_on_the_batch(batched):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    prompt = "Write a short poem about the sea:"
    alone_out = tokens(batched.generate([prompt], params, use_tqdm=False))[0]
    crowd = ["Tell me about " + name for name in sorted(TOPICS)[:7]]
    crowd_params = [SamplingParams(max_tokens=12, temperature=0.9, seed=i) for i in range(7)]
    together = batched.generate(crowd[:3] + [prompt] + crowd[3:], crowd_params[:3] + [params] + crowd_params[3:],
                                use_tqdm=False)
    assert together[3].outputs[0].token_ids == alone_out


def test_n_siblings_share_the_prompt_pages(batched):
    allocator = batched.engine.allocator
    hits_before = allocator.prefix_cache_hits
    prompt = TOPICS["while"][:1000] + "\nSummary:"
    out = batched.generate([prompt], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    m = out.metrics
    assert m.queue_time >= 0 and m.time_to_first_token > 0
    assert len(m.inter_token_latencies) == sum(len(o.token_ids) - 1 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds, different samples
    prompt_pages = (len(out.prompt_token_ids) - 1) // 16
    assert allocator.prefix_cache_hits - hits_before >= 2 * prompt_pages * 16
    assert_no_leak(batched)
