"""`python server.py` as a user runs it (the `make serve` path): the real engine behind the real CLI."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "server.py", "--port", str(port), "--max-model-len", "256", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--no-warmup", "--price-per-hour", "2.6"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        pytest.fail(f"server did not start:\n{proc.stdout.read()}")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=60)


def test_served_greedy_completion_matches_offline_generate(server, llm):
    from jaxinfer import SamplingParams

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = "The capital of France is"
    served = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=12, temperature=0)
    offline = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0]
    assert served.choices[0].text == offline.outputs[0].text
    assert served.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_start_up_log_says_what_the_engine_is(server):
    url, proc = server
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    for expected in ("SmolLM2-135M-Instruct", "float32 weights", "KV cache", "compile buckets", url):
        assert expected in out, expected
