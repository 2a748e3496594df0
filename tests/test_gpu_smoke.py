"""scripts/gpu_smoke.py, the script for the first machine with a GPU, runs here at toy sizes
(`--dry-run`: the Pallas kernels interpreted on the CPU), so a broken smoke script fails CI rather
than a scarce GPU lease."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_engine_phases_match_the_cpu_reference_in_every_format(tmp_path):
    """engine (bf16, int8, int4 g128) and engine-gguf (int5 / int8 g32 / int6 g16: a Q4_K_M file's)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_smoke.py"), str(tmp_path), "--dry-run",
                           "--phase", "engine", "--phase", "engine-gguf"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAXINFER_NATIVE="0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase, formats in (("engine", {"bf16", "int8", "int4-g128"}), ("engine-gguf", {"q4_k_m-like"})):
        result = json.loads((tmp_path / f"{phase}.json").read_text())
        assert set(result["formats"]) == formats
        for name, fmt in result["formats"].items():
            assert fmt["within_tolerance"], (name, fmt)
            # The interpreted Pallas kernels in bf16 against XLA in float32: peaked logits keep the same argmax.
            assert fmt["device_tokens"] == fmt["cpu_tokens"], (name, fmt)


def test_mosaic_phase_checks_the_mosaic_gpu_matmul_in_every_shape(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_smoke.py"), str(tmp_path), "--dry-run",
                           "--phase", "mosaic"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAXINFER_NATIVE="0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "mosaic.json").read_text())
    assert result["all_ok"], result
    assert {r.get("swap_ab", False) for r in result["results"]} == {True, False}  # decode and prefill shapes
