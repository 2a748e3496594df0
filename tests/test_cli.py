"""`jaxinfer serve` / server.py: flags map onto the engine config; SIGTERM drains then exits 0;
an engine failure makes the server exit 1 instead of hanging.

The process tests run the real CLI in a subprocess over the stand-in engine (tests/fake_engine.py):
they test the server's life cycle, not the model.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fake_engine import POISON

from jaxinfer.cli import build_parser, engine_overrides, main

# The CLI with LLMEngine replaced by the stand-in (20 ms a step).
SCRIPT = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import jaxinfer.engine
from fake_engine import FakeEngine
jaxinfer.engine.LLMEngine = lambda model, **overrides: FakeEngine(step_seconds=0.02)
from jaxinfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_flags_map_onto_the_engine_config(monkeypatch):
    monkeypatch.setenv("JAXINFER_API_KEY", "from-env")
    args = build_parser().parse_args(["--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching",
                                      "--max-model-len", "256", "--page-size", "32", "--quantization", "int4",
                                      "--quantization-group-size", "64"])
    assert engine_overrides(args) == {"kv_cache_memory_fraction": 0.5, "enable_prefix_caching": False,
                                      "max_model_len": 256, "page_size": 32, "quantization": "int4",
                                      "quantization_group_size": 64}
    assert args.api_key == "from-env" and (args.host, args.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--quantization", "int3"], "invalid choice: 'int3'"),
    (["--quantization", "int4", "--quantization-group-size", "48"], "invalid choice: 48"),
    (["--page-size", "24"], "page_size must be a power of two"),
    (["--model", "/no/such/model.gguf"], "unknown model"),
    (["--max-queue-wait", "-1"], "--max-queue-wait must be 0 (no limit) or positive"),
])
def test_bad_flags_exit_with_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "--port", str(port), "--log-level", "warning",
                             "--shutdown-timeout", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the server did not start: {proc.communicate()[0]}")


def test_sigterm_lets_running_requests_finish_then_exits_0():
    proc, url = start_server()
    result = {}

    def long_request():
        body = {"prompt": [1, 2, 3], "max_tokens": 50}  # 50 steps of 20 ms
        result["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=30)

    client = threading.Thread(target=long_request)
    client.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    client.join(30)
    assert proc.wait(30) == 0
    response = result["response"]
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 50


def test_engine_failure_makes_the_server_exit_1():
    proc, url = start_server()
    response = httpx.post(f"{url}/v1/completions", json={"prompt": POISON, "max_tokens": 5}, timeout=30)
    assert response.status_code == 503 and "engine" in response.json()["error"]["message"]
    assert proc.wait(30) == 1
    assert "the engine failed" in proc.communicate()[0]
