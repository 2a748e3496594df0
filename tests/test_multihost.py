"""Several processes serving one model (`jaxinfer/distributed.py`): `python server.py --nnodes N
--node-rank R --dist-init-addr 127.0.0.1:PORT` started N times on this machine, jax.distributed with
gloo CPU collectives, tensor parallelism across the processes' devices. Process 0 serves HTTP.

The reference is one process at tensor_parallel_size=1, in this test session (as
tests/test_tensor_parallel.py, but the split now crosses processes). Every server runs under
`timeout` in a session of its own, killed as a group in `finally`.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from helpers import assert_same_greedy_tokens_up_to_a_near_tie, free_port
from jaxinfer.cli import build_parser, distributed_flags_problem
from test_tensor_parallel import DIVIDING, PROMPTS, RANDOM_PROMPTS, SMOLLM2
from tp_worker import write_random_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 170  # `timeout` of each server process
NEW_TOKENS = 6
LOGPROB_ATOL = 1e-4  # float activations: only the order of float32 sums changes (test_tensor_parallel.py)
SMALL = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--weight-cache-dir", ""]
TP2_FLOAT = ["-tp", "2", "--quantization", "none", "--no-warmup", *SMALL]  # 2 processes x 1 device


class Group:
    """N server processes on 127.0.0.1, `devices` forced host CPU devices each; logs in `logdir`."""

    def __init__(self, logdir, nnodes: int, devices: int, flags: list[str], extra: dict[int, list[str]] | None = None):
        self.port, coordinator = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logdir = str(logdir)
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
        self.procs = []
        for rank in range(nnodes):
            log = open(os.path.join(self.logdir, f"{rank}.log"), "w")
            command = ["timeout", "-s", "KILL", str(LIMIT_S), sys.executable, "server.py", "--nnodes", str(nnodes),
                       "--node-rank", str(rank), "--dist-init-addr", f"127.0.0.1:{coordinator}",
                       "--port", str(self.port), "--served-model-name", "m", *flags, *(extra or {}).get(rank, [])]
            self.procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def log(self, rank: int) -> str:
        with open(os.path.join(self.logdir, f"{rank}.log")) as f:
            return f.read()

    def wait_healthy(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        logs = "\n".join(f"--- process {r}\n{self.log(r)[-2000:]}" for r in range(len(self.procs)))
        pytest.fail(f"the group did not start:\n{logs}")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def complete(self, prompt, max_tokens: int = NEW_TOKENS) -> dict:
        body = dict(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=3, ignore_eos=True)
        response = httpx.post(self.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"],
                "top": choice["logprobs"]["top_logprobs"]}  # per step {token text: logprob}, best first

    def wait_exit(self, rank: int, timeout: float) -> int | None:
        try:
            return self.procs[rank].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, rank: int) -> None:
        try:
            os.killpg(self.procs[rank].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[rank].wait(30)

    def close(self) -> None:
        for rank in range(len(self.procs)):
            self.kill(rank)


def reference(model: str, prompts, **options) -> list[dict]:
    """One process, tensor_parallel_size=1: each prompt's greedy text and logprobs, and per step its 3
    best tokens as the server writes them ({token text: logprob})."""
    from jaxinfer import LLM, SamplingParams

    llm = LLM(model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, warmup=False,
              weight_cache_dir=None, **options)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    text = lambda t: llm.engine.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    return [{"text": o.outputs[0].text, "logprobs": [lp.logprob for lp in o.outputs[0].logprobs],
             "top": [{text(t): lp for t, lp in step.top} for step in o.outputs[0].logprobs]} for o in outs]


@pytest.fixture(scope="module")
def random_llama():
    with tempfile.TemporaryDirectory() as tmp:
        yield write_random_llama(tmp, DIVIDING)  # 8 heads, 4 KV heads: TP 2 and 4 divide them


def test_random_llama_tp4_over_two_processes_serves_what_one_process_does(random_llama, tmp_path):
    """2 processes x 2 devices, float weights and activations; warm-up runs on both (process 0's
    warm-up steps, followed by process 1)."""
    expected = reference(random_llama, RANDOM_PROMPTS, quantization="none")
    group = Group(tmp_path, 2, 2, ["--model", random_llama, "-tp", "4", "--quantization", "none", *SMALL])
    try:
        group.wait_healthy()
        served = [group.complete(p) for p in RANDOM_PROMPTS]
        for got, want in zip(served, expected):
            assert got["text"] == want["text"]
            assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < LOGPROB_ATOL
        log = group.log(0)  # a line where warm-up starts and one where it ends; no bar in a pipe
        assert log.index("warm-up: compiling 7 step programs") < log.index("compiled 7 step programs")
        assert "Compiling" not in log
        assert "process 1: following process 0's steps" in group.log(1)
        os.killpg(group.procs[0].pid, signal.SIGTERM)  # SIGTERM to process 0: both exit 0
        assert group.wait_exit(0, 60) == 0, group.log(0)[-3000:]
        assert group.wait_exit(1, 30) == 0, group.log(1)[-3000:]
        assert "process 1: process 0 shut down; exiting" in group.log(1)
    finally:
        group.close()


def test_smollm2_tp3_over_three_processes_gives_the_greedy_tokens_of_one_process(tmp_path):
    """3 processes x 1 device (SmolLM2's 9 heads and 3 KV heads divide by 3), the default
    configuration (int8 activations: greedy tokens are the specification up to a near tie,
    test_tensor_parallel.py)."""
    expected = reference(SMOLLM2, PROMPTS)
    group = Group(tmp_path, 3, 1, ["--model", SMOLLM2, "-tp", "3", "--no-warmup", *SMALL])
    try:
        group.wait_healthy()
        for prompt, want in zip(PROMPTS, expected):
            assert_same_greedy_tokens_up_to_a_near_tie(group.complete(prompt)["top"], want["top"])
    finally:
        group.close()


def test_a_follower_killed_mid_request_makes_the_server_unhealthy_and_exit(random_llama, tmp_path):
    """Its peer gone, process 0's next collective fails (gloo: connection closed); the watchdog names
    the lost process; /health stops answering 200 and process 0 exits 1, all within seconds."""
    group = Group(tmp_path, 2, 1, ["--model", random_llama, *TP2_FLOAT])
    try:
        group.wait_healthy()
        group.complete(RANDOM_PROMPTS[1])  # compiled: the long request below is in its decode steps
        body = dict(model="m", prompt=RANDOM_PROMPTS[0], max_tokens=200, temperature=0, ignore_eos=True, stream=True)
        with httpx.stream("POST", group.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
            killed = time.monotonic()
            group.kill(1)
            rest = "\n".join(lines)
        assert "[DONE]" not in rest or "error" in rest  # the stream ends with an error, not as finished
        assert not group.healthy()
        assert group.wait_exit(0, 30) == 1
        assert time.monotonic() - killed < 30
        assert "process(es) 1 of 2 are no longer alive (seen from process 0)" in group.log(0)
        assert "exiting: the engine failed" in group.log(0) and "Traceback (most recent call last)" not in \
            group.log(0).partition("shutting the server down")[2]
    finally:
        group.close()


def test_a_hung_follower_makes_the_server_unhealthy_then_exit(random_llama, tmp_path):
    """SIGSTOP, as a host that hangs: no connection closes, so the step waits in its collective; the
    heartbeat timeout (10 s) marks the process dead, /health says so and process 0 exits 1 soon after."""
    group = Group(tmp_path, 2, 1, ["--model", random_llama, *TP2_FLOAT])
    try:
        group.wait_healthy()
        group.complete(RANDOM_PROMPTS[1])
        body = dict(model="m", prompt=RANDOM_PROMPTS[0], max_tokens=200, temperature=0, ignore_eos=True, stream=True)
        with httpx.stream("POST", group.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
            stopped = time.monotonic()
            os.killpg(group.procs[1].pid, signal.SIGSTOP)
            while group.healthy() and time.monotonic() - stopped < 30:
                time.sleep(0.5)
            health = httpx.get(group.url + "/health", timeout=2)
            assert health.status_code == 503 and "process(es) 1 of 2 are no longer alive" in health.text
            assert group.wait_exit(0, 30) == 1
            assert time.monotonic() - stopped < 40
        assert "the engine loop is stuck in a step waiting for the lost process: exiting now" in group.log(0)
    finally:
        group.close()


def test_process_0_killed_while_idle_ends_the_follower(random_llama, tmp_path):
    """No request in flight: the follower exits at once, by whichever sees the loss first: its step
    channel (exit 1, "process 1: exiting: ... the coordination service (process 0) is unreachable")
    or jax.distributed's own client (an abort: the service lived in process 0)."""
    group = Group(tmp_path, 2, 1, ["--model", random_llama, *TP2_FLOAT])
    try:
        group.wait_healthy()
        killed = time.monotonic()
        group.kill(0)
        assert group.wait_exit(1, 30) not in (0, None)
        assert time.monotonic() - killed < 20
        log = group.log(1)
        assert ("process 1: exiting:" in log and "is unreachable" in log
                or "the JAX distributed service detected fatal errors" in log)
    finally:
        group.close()


def test_a_follower_lost_while_idle_is_found_by_the_watchdog(random_llama, tmp_path):
    group = Group(tmp_path, 2, 1, ["--model", random_llama, *TP2_FLOAT])
    try:
        group.wait_healthy()
        killed = time.monotonic()
        group.kill(1)
        assert group.wait_exit(0, 30) == 1
        assert time.monotonic() - killed < 20
        assert "process(es) 1 of 2 are no longer alive (seen from process 0)" in group.log(0)
    finally:
        group.close()


def test_a_follower_with_other_flags_is_refused_with_both_configurations(random_llama, tmp_path):
    group = Group(tmp_path, 2, 1, ["--model", random_llama, *TP2_FLOAT],
                  extra={1: ["--max-num-seqs", "8"]})
    try:
        assert group.wait_exit(1, 120) not in (0, None)
        assert "process 1: its model and engine config differs from process 0's" in group.log(1)
        assert group.wait_exit(0, 30) == 1  # and process 0, its follower gone, stops
    finally:
        group.close()


@pytest.mark.parametrize("flags, problem", [
    (["--nnodes", "2"], "--nnodes 2 needs --dist-init-addr HOST:PORT"),
    (["--nnodes", "2", "--dist-init-addr", "127.0.0.1"], "--nnodes 2 needs --dist-init-addr HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "--node-rank must be in [0, 1]"),
    (["--nnodes", "2", "--dist-init-addr", "h:1", "-tp", "3"],
     "--tensor-parallel-size 3 is not a multiple of --nnodes 2"),
    (["--nnodes", "2", "--dist-init-addr", "h:1"], "--tensor-parallel-size 1 is not a multiple of --nnodes 2"),
    (["--dist-init-addr", "h:1"], "--dist-init-addr is for --nnodes > 1"),
    (["--nnodes", "0"], "--nnodes must be at least 1"),
])
def test_a_wrong_flag_combination_is_a_clear_error(flags, problem):
    assert distributed_flags_problem(build_parser().parse_args(flags)).startswith(problem)


def test_the_default_is_one_process():
    assert distributed_flags_problem(build_parser().parse_args([])) is None
