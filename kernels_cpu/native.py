"""Native CPU kernels as XLA FFI custom calls, compiled on first use for the machine they run on.

`int8_matmul` is the CPU engine's int8 weight-only matmul (`int8_matmul.cc`): XLA's CPU backend
does not fuse the int8 -> f32 convert into a dot, so the XLA path writes every dequantized weight
out and reads it back, and decode runs at about a third of the memory bandwidth.

The shared library is built with the system C++ compiler (`CXX`, else `g++`) and `-march=native`
into `~/.cache/jaxinfer/native/` (`JAXINFER_NATIVE_DIR`), keyed by the source, the flags, the
jaxlib version and the CPU, so a rebuild happens only when one of them changes. Without a compiler,
or with `JAXINFER_NATIVE=0`, `available()` is False and callers keep the XLA path.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

logger = logging.getLogger("jaxinfer")

SOURCE = Path(__file__).with_name("int8_matmul.cc")
TARGET = "jaxinfer_int8_matmul"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    for line in info.splitlines():
        if line.startswith("flags"):
            return line  # the instruction sets -march=native picks from
    return platform.processor()


def _library_path(compiler: str) -> Path:
    root = Path(os.environ.get("JAXINFER_NATIVE_DIR", Path.home() / ".cache" / "jaxinfer" / "native"))
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), jaxlib.__version__.encode(),
                 _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    return root / f"int8_matmul-{key.hexdigest()[:16]}.so"


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("Compiling the native CPU int8 matmul (%s, once for this machine) ...", compiler)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
        os.replace(partial, out)  # atomic: a concurrent build of the same key writes the same bytes
    logger.info("Native CPU int8 matmul built in %.1f s: %s", time.perf_counter() - start, out)


@functools.cache
def available() -> bool:
    """Whether the native kernels are built and registered (building them if needed)."""
    if os.environ.get("JAXINFER_NATIVE", "1") == "0":
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("No C++ compiler found: the CPU int8 matmul stays on the XLA path (slower decode)")
        return False
    path = _library_path(compiler)
    try:
        if not path.exists():
            _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxinferInt8Matmul), platform="cpu")
    except (OSError, RuntimeError) as e:
        logger.warning("Native CPU int8 matmul unavailable, using the XLA path: %s", e)
        return False
    return True


def int8_matmul(x, data, scales, layer=None):
    """x[M, K] float32 @ W[K, N], W = data[(layer,) K, N] (int8) * scales[(layer,) N] (float16).

    `data`/`scales` may carry a leading layer axis [L, K, N] / [L, N]; `layer` (an int32 scalar,
    traced or not) picks one without copying it out. Returns float32 [M, N]. CPU only; check
    `available()` first.
    """
    if x.dtype != jnp.float32 or data.dtype != jnp.int8 or scales.dtype != jnp.float16:
        raise TypeError(f"int8_matmul takes float32 x, int8 data, float16 scales; got {x.dtype}, "
                        f"{data.dtype}, {scales.dtype}")
    if not available():
        raise RuntimeError("the native CPU kernels are not available (see the log for why)")
    if data.ndim == 2:
        data, scales, layer = data[None], scales[None], 0
    if layer is None:
        raise ValueError("int8_matmul: a stacked weight [L, K, N] needs `layer`")
    m, n = x.shape[0], data.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(x, data, scales, jnp.asarray(layer, jnp.int32))
