"""`python server.py` as a user runs it (the `make serve` path): the real engine behind the real CLI."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerLog:
    """The server's stdout and stderr, read line by line on a thread for as long as it runs: a pipe
    nobody reads fills up (64 KiB) and blocks the server at its next log line."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.fixture(scope="module")
def server():
    """`python server.py` on a free port. Every test leaves it running; it is stopped (SIGTERM) here,
    after the module's last test, and must then exit 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "server.py", "--port", str(port), "--max-model-len", "256", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--no-warmup", "--price-per-hour", "2.6", "--quantization", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = ServerLog(proc.stdout)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        proc.wait(timeout=60)
        log.join(timeout=10)
        pytest.fail(f"server did not start:\n{log.text()}")
    yield url, log
    proc.terminate()
    returncode = proc.wait(timeout=60)
    log.join(timeout=10)
    assert returncode == 0, f"the server exited {returncode} after SIGTERM:\n{log.text()[-3000:]}"


def test_served_greedy_completion_matches_offline_generate(server, llm):
    from jaxinfer import SamplingParams

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = "The capital of France is"
    served = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=12, temperature=0)
    offline = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0]
    assert served.choices[0].text == offline.outputs[0].text
    assert served.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_serving_benchmark_smoke_run_reports_every_field(server, tmp_path):
    url, _ = server
    args = ["--base-url", url, "--num-requests", "8", "--concurrency", "2", "--prompt-len", "8:24",
            "--output-len", "3:6", "--shared-prefix-fraction", "0.5", "--shared-prefix-len", "20",
            "--leave-fraction", "0.25", "--malformed-fraction", "0.25", "--price-per-hour", "2.6", "--quiet", "--json", str(tmp_path / "report.json")]
    proc = subprocess.run([sys.executable, "benchmarks/serve.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(ROOT, "benchmarks", "serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    workload = bench.make_workload(bench.main.__globals__["argparse"].Namespace(
        seed=0, num_requests=8, prompt_len=(8, 24), output_len=(3, 6), shared_prefix_fraction=0.5,
        shared_prefix_len=20, leave_fraction=0.25, malformed_fraction=0.25))
    leaving = [w for w in workload if w.leave_after]
    malformed = [w for w in workload if w.malformed]
    whole = [w for w in workload if not (w.leave_after or w.malformed)]
    assert leaving and malformed and whole  # the seed draws every kind
    assert report["failed"] == 0, report["errors"]
    assert (report["completed"], report["left"], report["refused"]) == (len(whole), len(leaving), len(malformed))
    assert report["refused_status"] == [400]
    # ignore_eos: exact; a client that left read one chunk per token up to where it left.
    assert report["output_tokens"] == sum(w.max_tokens for w in whole) + sum(w.leave_after for w in leaving)
    assert report["prompt_tokens"] > len(whole) * 8
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(report[metric]) == {"mean", "p50", "p90", "p99"}
        assert 0 < report[metric]["p50"] <= report[metric]["p99"]
    assert report["ttft_ms"]["p99"] <= report["e2e_ms"]["p99"]
    assert report["output_tokens_per_s"] > 0 and report["goodput_requests_per_s"] >= 0
    expected_cost = 2.6 / (report["output_tokens_per_s"] * 3600) * 1e6
    assert abs(report["dollars_per_million_output_tokens"] - expected_cost) <= 0.01 * expected_cost


def test_start_up_log_says_what_the_engine_is_in_a_few_lines(server):
    """Read while the server runs: the last start-up line ("ready in ... s: serving ... at <url>") comes
    before it answers /health, so the whole start-up log is there. One line a phase; the libraries'
    own lines (orbax logs through absl, once per weight-cache read) only at --log-level debug. Cold
    caches add at most a line (the native kernels' build), so this holds on a first start too. The log
    is a pipe, not a terminal: no progress bar (tqdm's redraws, each read back as a line, more of them
    the slower the load)."""
    url, log = server
    assert log.wait_for(url), log.text()
    lines = log.text().splitlines()
    ready = next(i for i, line in enumerate(lines) if "ready in" in line and url in line)
    start_up = "\n".join(lines[:ready + 1])
    assert ready <= 12, start_up
    for expected in ("SmolLM2-135M-Instruct", "GGUF, llama, 30 layers", "weights:", "MB on", "KV cache",
                     "tokens", "compile buckets"):
        assert expected in start_up, expected
    for noise in ("absl", "orbax", "Checkpoint", "Uvicorn running", "Loading weights", "Compiling", "%|"):
        assert noise not in start_up, noise
