"""Data parallelism (`jaxinfer.data_parallel`): N engine replicas, each on its own devices, behind a
router that sends a request to the replica whose prefix cache holds the longest prefix of its
prompt, then to the least loaded, then to the lowest index.

The references: one engine (`LLM`, data_parallel_size 1) for the tokens, every replica running the
same per-device program; the page allocators themselves (which replica's prefix cache holds a
prompt's pages, whose prefix-cache hit counter moved) for where a request went; the arrays'
`.devices()` for where a replica runs. The engines run in one subprocess (tests/dp_worker.py) with
4 forced host CPU devices; the router's rules are also checked here on real page allocators with
stated loads.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import pytest

from jaxinfer.allocator import PageAllocator
from jaxinfer.cli import build_parser, engine_overrides
from jaxinfer.config import EngineConfig
from jaxinfer.data_parallel import DataParallelEngine, replica_devices

WORKER = os.path.join(os.path.dirname(__file__), "dp_worker.py")
PAGE = 16


@pytest.fixture(scope="module")
def worker() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- engines on forced host devices ---------------------------------------------------------------

def test_each_replica_holds_its_weights_and_kv_cache_on_its_own_device(worker):
    assert worker["dp2"]["devices"] == [{"weights": [0], "kv_cache": [0]}, {"weights": [1], "kv_cache": [1]}]


def test_each_replica_warms_up_the_programs_of_its_own_devices(worker):
    """Strict compilation: any program built while serving would have failed a request."""
    assert worker["dp2"]["warmed_up"] == [True, True]
    assert worker["dp2"]["compilations_while_serving"] == [0, 0]


def test_the_replicas_share_one_read_of_the_checkpoint(worker):
    assert worker["dp2"]["shared_model"]


def test_dp2_greedy_tokens_equal_one_engine(worker):
    assert worker["dp2"]["tokens"] == worker["reference"]


def test_dp2_streams_every_token_and_serves_n2_on_one_replica(worker):
    assert worker["dp2"]["outputs_streamed"] == [6, 6, 6, 6]
    assert worker["dp2"]["n2_tokens"] == [worker["reference"][0]] * 2


def test_shared_prefix_requests_land_on_the_replica_that_served_the_first(worker):
    """One replica was busy with a long request, so the first went to the other by load; its 5
    prefix pages are cached there only, and the three followers hit them there (3 x 80 tokens)
    although the busy replica was as idle or idler by the time they came."""
    dp2 = worker["dp2"]
    busy = dp2["filler_replica"]
    other = 1 - busy
    assert dp2["first_holders"][other] == 5 and dp2["first_holders"][busy] == 0
    assert dp2["follower_hits"][other] == 3 * 80 and dp2["follower_hits"][busy] == 0
    assert all(h[other] >= 5 and h[busy] == 0 for h in dp2["follower_holders"])
    assert dp2["routed"][other] == {"prefix": 3, "load": 1}
    assert dp2["routed"][busy] == {"prefix": 0, "load": 0}


def test_an_abort_reaches_the_replica_running_the_request(worker):
    """The long request on the busy replica, aborted by closing its stream: nothing in flight, every page free."""
    dp2 = worker["dp2"]
    assert dp2["requests_after_abort"] == 0
    assert all(free == total for free, total in dp2["free_pages_after_abort"])


def test_unrelated_concurrent_requests_spread_over_both_replicas(worker):
    """Six 40-token prompts submitted together alternate by load: each cached on one replica only."""
    held = [[pages > 0 for pages in h] for h in worker["dp2"]["unrelated_holders"]]
    assert all(sum(h) == 1 for h in held)
    assert [sum(h[i] for h in held) for i in (0, 1)] == [3, 3]


def test_the_server_routes_health_and_metrics_work_over_the_router(worker):
    dp2 = worker["dp2"]
    status, body = dp2["http_completion"]
    assert status == 200 and body["usage"]["completion_tokens"] == 6
    assert dp2["health"] == 200
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in dp2["metrics"]
              if line.startswith("jaxinfer:replica_")}
    holder = 1 - dp2["filler_replica"]  # the replica the shared-prefix requests followed
    # Totals over the worker's whole run: at least the three followers' routes and hits.
    assert values[f'jaxinfer:replica_routed_requests_total{{model_name="m",reason="prefix",replica="{holder}"}}'] >= 3
    assert values[f'jaxinfer:replica_prefix_cache_hits_total{{model_name="m",replica="{holder}"}}'] >= 240
    assert dp2["pages"][0] == dp2["pages"][1]  # the aggregate is the sum of the replicas'
    assert dp2["healthy_after_shutdown"] is False


def test_dp2_tp2_on_four_devices_gives_one_engines_tokens(worker):
    dp2_tp2 = worker["dp2_tp2"]
    assert dp2_tp2["tokens"] == worker["reference"]
    assert dp2_tp2["devices"] == [{"weights": [0, 1], "kv_cache": [0, 1]}, {"weights": [2, 3], "kv_cache": [2, 3]}]
    assert all(n >= 1 for n in dp2_tp2["served"])


def test_more_devices_than_visible_is_an_error_naming_both_numbers(worker):
    assert worker["too_many"].startswith("data_parallel_size 3 x tensor_parallel_size 2 needs 6 devices, "
                                         "but only 4 cpu device(s) are visible")


# -- in this process (one device) -----------------------------------------------------------------

def test_more_replicas_than_devices_is_an_error_before_any_weight_is_read():
    # The test process's own devices (one, unless XLA_FLAGS forces more).
    n = len(jax.local_devices())
    with pytest.raises(ValueError, match=f"data_parallel_size {n + 1} x tensor_parallel_size 1 needs {n + 1} devices, "
                                         f"but only {n} "):
        replica_devices(EngineConfig(data_parallel_size=n + 1))


def test_an_llmengine_is_one_replica():
    from jaxinfer import LLMEngine

    with pytest.raises(ValueError, match="an LLMEngine is one replica"):
        LLMEngine("no-such-model", data_parallel_size=2)


def test_the_flag_sets_the_engine_config():
    for flag in ("--data-parallel-size", "-dp"):
        assert engine_overrides(build_parser().parse_args([flag, "2", "-tp", "2"])) == {
            "tensor_parallel_size": 2, "data_parallel_size": 2}
    with pytest.raises(ValueError, match="data_parallel_size must be a positive integer"):
        EngineConfig(data_parallel_size=0)


# -- the routing rules, on real page allocators ---------------------------------------------------

def router(loads: list[int], max_num_seqs: int = 8) -> DataParallelEngine:
    config = EngineConfig(page_size=PAGE, max_num_seqs=max_num_seqs)
    replicas = [SimpleNamespace(load=load, engine=SimpleNamespace(config=config, allocator=PageAllocator(32, PAGE),
                                                                  tokenizer=None)) for load in loads]
    return DataParallelEngine(replicas)


def cache(dp: DataParallelEngine, replica: int, token_ids: list[int], salt: str | None = None) -> None:
    """Computes `token_ids` on `replica` as its engine would: pages allocated, full ones registered, freed."""
    allocator = dp.replicas[replica].engine.allocator
    pages = allocator.allocate(-(-len(token_ids) // PAGE))
    allocator.register_full_pages(pages, [], token_ids, len(token_ids), salt)
    allocator.free(pages)


PROMPT = list(range(100, 100 + 4 * PAGE + 3))  # 4 full pages and 3 tokens


def test_the_longest_cached_prefix_wins_over_load_and_index():
    dp = router([0, 3, 1])
    cache(dp, 0, PROMPT[:2 * PAGE])
    cache(dp, 1, PROMPT[:4 * PAGE])
    assert dp.route(PROMPT) == 1
    assert dp.num_routed[1] == {"prefix": 1, "load": 0}


def test_no_match_goes_to_the_least_loaded_then_the_lowest_index():
    assert router([2, 1, 1]).route(PROMPT) == 1
    dp = router([0, 0])
    assert dp.route(PROMPT) == 0 and dp.num_routed[0] == {"prefix": 0, "load": 1}


def test_equal_matches_go_to_the_least_loaded():
    dp = router([2, 1])
    cache(dp, 0, PROMPT)
    cache(dp, 1, PROMPT)
    assert dp.route(PROMPT) == 1


def test_the_cache_salt_is_part_of_the_match():
    dp = router([1, 0])
    cache(dp, 0, PROMPT, salt="tenant-a")
    assert dp.route(PROMPT, cache_salt="tenant-a") == 0
    assert dp.route(PROMPT, cache_salt="tenant-b") == 1
    assert dp.route(PROMPT) == 1


def test_a_prefix_under_half_the_prompt_does_not_draw_it():
    """One page of four (a chat template's first page is in every cache): balanced by load instead."""
    dp = router([1, 0])
    cache(dp, 0, PROMPT[:PAGE])
    assert dp.route(PROMPT) == 1
    cache(dp, 0, PROMPT[:2 * PAGE])
    assert dp.route(PROMPT) == 0


def test_a_replica_max_num_seqs_busier_than_the_idlest_loses_its_prefix():
    dp = router([7, 0], max_num_seqs=8)
    cache(dp, 0, PROMPT)
    assert dp.route(PROMPT) == 0
    dp.replicas[0].load = 8
    assert dp.route(PROMPT) == 1
