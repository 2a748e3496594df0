"""Runs the data-parallel checks in a process of its own, with 4 forced host CPU devices (the test
session has one): `python tests/dp_worker.py` prints one JSON line that tests/test_data_parallel.py
reads. One process for every check, so the random Llama is written and each engine built once.

The model is tests/tp_worker.py's random Llama (8 heads, 4 KV heads: TP 2 divides both), int8
weights with float activations: exact up to the order of float32 sums, so TP 2 keeps the tokens.
"""

import asyncio
import json
import os
import sys
import tempfile

if __name__ == "__main__":  # a script: never an importing test process's devices
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

FIELDS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
OPTIONS = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, warmup=False, weight_cache_dir=None,
               quantization="int8", cpu_integer_matmul=False, page_size=16)
NEW_TOKENS = 6
_rng = np.random.default_rng(1)


def random_prompt(length: int) -> list[int]:
    return _rng.integers(3, 300, length).tolist()


PROMPTS = [random_prompt(n) for n in (35, 4, 20, 50)]
SHARED_PREFIX = random_prompt(80)  # 5 pages of 16


def device_ids(engine) -> dict:
    """Which devices hold a replica's weights and KV cache (the arrays themselves say)."""
    leaves = __import__("jax").tree.leaves(engine.runner.state)
    return {"weights": sorted({d.id for leaf in leaves for d in leaf.devices()}),
            "kv_cache": sorted({d.id for d in engine.runner.k_cache.devices()})}


def holders(router, prompt: list[int]) -> list[int]:
    """Full pages of `prompt` (up to its last token) each replica's prefix cache holds."""
    matched = router.cached_pages(prompt, None, list(range(len(router.replicas))))
    return [matched[i] for i in range(len(router.replicas))]


async def finish(router, prompt, params) -> tuple[list, int]:
    """(final outputs' token ids, number of outputs streamed)."""
    count, last = 0, None
    async for output in router.generate(prompt, params):
        count, last = count + 1, output
    return [c.token_ids for c in last.outputs], count


async def dp2_checks(model: str) -> dict:
    from jaxinfer import EngineConfig, SamplingParams
    from jaxinfer.api.metrics import ServerMetrics
    from jaxinfer.async_engine import AsyncLLMEngine
    from jaxinfer.data_parallel import DataParallelEngine, build_replicas

    # Warmed up side by side, then strict: a step program a replica did not compile for its own
    # device at warm-up would fail its request.
    engines = build_replicas(model, EngineConfig(**OPTIONS | dict(warmup=True, strict_compile=True),
                                                 data_parallel_size=2))
    result = {"devices": [device_ids(e) for e in engines], "shared_model": engines[0].model is engines[1].model,
              "warmed_up": [e.runner.warmed_up for e in engines]}
    router = DataParallelEngine([AsyncLLMEngine(e, max_queue_wait=None) for e in engines]).start()
    metrics = ServerMetrics(router, "m")
    router.observer = metrics
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    # The same tokens as one engine, prompts in flight together.
    outs = await asyncio.gather(*(finish(router, p, greedy) for p in PROMPTS))
    result["tokens"] = [tokens[0] for tokens, _ in outs]
    result["outputs_streamed"] = [count for _, count in outs]
    n2, _ = await finish(router, PROMPTS[0], SamplingParams(n=2, max_tokens=NEW_TOKENS, temperature=0,
                                                            ignore_eos=True))
    result["n2_tokens"] = n2

    # Prefix routing. A long request keeps replica 0 busy, so the first shared-prefix request goes
    # to replica 1 by load; the next ones follow its cached prefix there, although by load and by
    # index replica 0 would be as good or better.
    filler_params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    routed_pre = [sum(c.values()) for c in router.num_routed]
    filler = router.generate(random_prompt(4), filler_params)
    await filler.__anext__()  # admitted and running
    # Which replica took it (by load: the lower index unless the other is less loaded right then).
    result["filler_replica"] = next(i for i, c in enumerate(router.num_routed) if sum(c.values()) > routed_pre[i])
    hits_before = [e.allocator.prefix_cache_hits for e in engines]
    routed_before = [dict(c) for c in router.num_routed]
    await finish(router, SHARED_PREFIX + random_prompt(5), greedy)
    result["first_holders"] = holders(router, SHARED_PREFIX + [0])
    followers = [SHARED_PREFIX + random_prompt(10) for _ in range(3)]
    await asyncio.gather(*(finish(router, p, greedy) for p in followers))
    result["follower_hits"] = [e.allocator.prefix_cache_hits - h for e, h in zip(engines, hits_before)]
    result["follower_holders"] = [holders(router, p) for p in followers]
    result["routed"] = [{k: c[k] - b[k] for k in c} for c, b in zip(router.num_routed, routed_before)]
    result["filler_running_at_abort"] = router.stats.num_requests
    await filler.aclose()  # aborts it
    for _ in range(500):
        if router.stats.num_requests == 0:
            break
        await asyncio.sleep(0.01)
    result["requests_after_abort"] = router.stats.num_requests
    result["free_pages_after_abort"] = [[e.allocator.num_free_pages, e.allocator.num_pages] for e in engines]

    # Unrelated requests in flight together spread by load.
    unrelated = [random_prompt(40) for _ in range(6)]
    await asyncio.gather(*(finish(router, p, greedy) for p in unrelated))
    result["unrelated_holders"] = [holders(router, p) for p in unrelated]

    # The server's routes over the router: a completion, /health, /metrics.
    import httpx

    from jaxinfer.api.routes.app import create_app

    app = create_app(router, served_model_name="m", metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        reply = await client.post("/v1/completions", json={"model": "m", "prompt": PROMPTS[2], "max_tokens": NEW_TOKENS,
                                                           "temperature": 0, "ignore_eos": True})
        result["http_completion"] = [reply.status_code, reply.json()]
        result["health"] = (await client.get("/health")).status_code
        result["metrics"] = [line for line in (await client.get("/metrics")).text.splitlines()
                             if line.startswith(("jaxinfer:replica", "jaxinfer:num_requests_running",
                                                 "jaxinfer:prefix_cache_hits"))]
    result["pages"] = [router.stats.num_pages, sum(e.allocator.num_pages for e in engines)]
    result["compilations_while_serving"] = [e.runner.num_compilations for e in engines]
    router.shutdown(timeout=5)
    result["healthy_after_shutdown"] = router.healthy
    return result


async def dp2_tp2_tokens(model: str) -> dict:
    from jaxinfer import EngineConfig, SamplingParams
    from jaxinfer.async_engine import AsyncLLMEngine
    from jaxinfer.data_parallel import DataParallelEngine, build_replicas

    engines = build_replicas(model, EngineConfig(**OPTIONS, data_parallel_size=2, tensor_parallel_size=2))
    router = DataParallelEngine([AsyncLLMEngine(e, max_queue_wait=None) for e in engines]).start()
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = await asyncio.gather(*(finish(router, p, greedy) for p in PROMPTS))
    # Both replicas served some: the prompts spread by load.
    served = [sum(1 for p in PROMPTS if holders(router, p)[i]) for i in range(2)]
    router.shutdown(timeout=5)
    return {"tokens": [tokens[0] for tokens, _ in outs], "devices": [device_ids(e) for e in engines],
            "served": served}


def main() -> dict:
    from test_architectures_vs_hf import VOCAB_SIZE  # noqa: F401 - the tokenizer write_random_llama uses
    from tp_worker import write_random_llama

    from jaxinfer import LLM, EngineConfig, SamplingParams
    from jaxinfer.data_parallel import build_replicas

    tmp = tempfile.TemporaryDirectory()
    model = write_random_llama(tmp.name, FIELDS)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in LLM(model, **OPTIONS).generate(PROMPTS, greedy, use_tqdm=False)]
    results = {"reference": reference, "dp2": asyncio.run(dp2_checks(model)),
               "dp2_tp2": asyncio.run(dp2_tp2_tokens(model))}
    try:
        build_replicas(model, EngineConfig(**OPTIONS, data_parallel_size=3, tensor_parallel_size=2))
    except ValueError as e:
        results["too_many"] = str(e)
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
