"""jaxinfer is a library: importing it or building an engine leaves the process's JAX config and
logging as the application set them. The persistent compilation cache and log handlers are the
entry points' to set (`jaxinfer serve` does both; tests/test_server_process.py checks its log).

Each check runs in a fresh process: this one's JAX config and logging are pytest's and conftest's."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints the JAX config values that differ from those before `action` ran, and the state of the
# "jaxinfer" logger.
PROBE = """
import json, logging
import jax

before = dict(jax.config.values)
{action}
changed = {{k: repr(v) for k, v in jax.config.values.items() if before.get(k) != v}}
logger = logging.getLogger("jaxinfer")
print("PROBE", json.dumps({{"changed": changed, "propagate": logger.propagate,
                            "handlers": [type(h).__name__ for h in logger.handlers]}}))
"""


def probe(action: str) -> dict:
    code = PROBE.format(action=textwrap.dedent(action))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("PROBE ")[1])


def test_importing_jaxinfer_changes_no_jax_config_and_adds_no_log_handler():
    result = probe("""
        import jaxinfer, jaxinfer.cli, jaxinfer.compilation, jaxinfer.runner
        from kernels_cpu import native
        """)
    assert result == {"changed": {}, "propagate": True, "handlers": []}


def test_building_an_engine_changes_no_jax_config():
    """The engine used to turn on the persistent compilation cache for every jit of the process."""
    result = probe("""
        from jaxinfer import LLM
        LLM("SmolLM2-135M-Instruct", max_model_len=64, max_num_seqs=1, max_num_batched_tokens=16,
            quantization="none", warmup=False)
        """)
    assert result == {"changed": {}, "propagate": True, "handlers": []}


def test_enable_compilation_cache_is_the_opt_in(tmp_path):
    """The one call that sets the cache, for an application that wants it."""
    result = probe(f"""
        from jaxinfer.compilation import enable_compilation_cache
        enable_compilation_cache({str(tmp_path)!r})
        """)
    assert result["changed"] == {"jax_compilation_cache_dir": repr(str(tmp_path)),
                                 "jax_persistent_cache_min_compile_time_secs": "0"}


def test_engine_log_records_propagate_to_the_applications_handlers(caplog, monkeypatch):
    """caplog's handler sits on the root logger: a record of the library's reaches it only by
    propagating. The record: `native.available()` saying the kernels are off."""
    from kernels_cpu import native

    monkeypatch.setenv("JAXINFER_NATIVE", "0")
    native.available.cache_clear()
    try:
        with caplog.at_level("INFO", logger="jaxinfer"):
            assert not native.available()
    finally:
        native.available.cache_clear()  # the next caller decides again, in the real environment
    assert [r.getMessage() for r in caplog.records if r.name == "jaxinfer"] == [
        "native CPU kernels off (JAXINFER_NATIVE=0): matmul and attention run on the XLA path (slower decode)"]
