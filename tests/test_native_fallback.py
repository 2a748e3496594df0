"""The engine without the native CPU kernels: a failed build is a WARNING the user sees, and the
XLA path it falls back to (also `JAXINFER_NATIVE=0`, or a machine without a compiler) generates the
same greedy tokens as the session engine, which runs the native kernels where they build.

Both run in a fresh process: `native.available()` decides once per process, and the environment it
reads (`CXX`, `JAXINFER_NATIVE`, `JAXINFER_NATIVE_CFLAGS`) is fixed by then."""

import json
import os
import subprocess
import sys
import textwrap

from jaxinfer import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def run_python(code: str, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def test_a_failing_build_is_a_warning_and_load_raises_the_compilers_message(tmp_path):
    """A compiler that exists but fails (here: an option it does not know). No logging configured,
    as in a user's script: the WARNING still reaches stderr (the library adds no handler that
    would swallow it)."""
    proc = run_python("""
        import jaxinfer
        from kernels_cpu import native
        print("available:", native.available())
        try:
            native.load()
        except RuntimeError as e:
            print("load raised:", e)
        """, timeout=120, JAXINFER_NATIVE_DIR=str(tmp_path), JAXINFER_NATIVE_CFLAGS="-fno-such-option",
                      JAXINFER_NATIVE="1")
    assert proc.returncode == 0, proc.stderr
    assert "available: False" in proc.stdout
    assert "load raised:" in proc.stdout and "-fno-such-option" in proc.stdout.split("load raised:")[1]
    warning = [line for line in proc.stderr.splitlines() if "falls back to the XLA path" in line]
    assert warning and "failed to build" in warning[0], proc.stderr


def test_the_xla_fallback_generates_the_session_engines_greedy_tokens(llm):
    """JAXINFER_NATIVE=0, float32 weights: matmuls and attention all on the XLA path (no native
    custom call in the step program), the same greedy tokens as the session engine (native
    attention where the kernels build)."""
    proc = run_python(f"""
        import json
        from jaxinfer import LLM, SamplingParams
        from kernels_cpu import native

        assert not native.available()
        llm = LLM("SmolLM2-135M-Instruct", max_model_len=128, max_num_seqs=2, max_num_batched_tokens=32,
                  quantization="none", warmup=False)
        runner = llm.engine.runner
        for tokens in (1, 16):
            batch = runner._empty_batch(*runner.padded_shape(tokens, 1))
            text = runner._step.lower(runner.state, runner.k_cache, runner.v_cache, *batch).as_text()
            assert "jaxinfer_" not in text, "a native kernel in the XLA fallback's step"
        outputs = llm.generate({PROMPTS!r}, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
        print("TOKENS", json.dumps([out.outputs[0].token_ids for out in outputs]))
        """, timeout=300, JAXINFER_NATIVE="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fallback = json.loads(proc.stdout.split("TOKENS ")[1])
    session = [out.outputs[0].token_ids for out in
               llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)]
    assert fallback == session
    assert all(len(tokens) == 8 for tokens in session)
