"""Native CPU kernels as XLA FFI custom calls, compiled on first use for the machine they run on.

`int8_matmul` is the CPU engine's int8 weight-only matmul (`int8_matmul.cc`): XLA's CPU backend
does not fuse the int8 -> f32 convert into a dot, so the XLA path writes every dequantized weight
out and reads it back, and decode runs at about a third of the memory bandwidth.
`group_matmul` (`group_matmul.cc`) runs GGUF's Q8_0/Q4_0/Q4_1 blocks as they are stored, with
integer dot products on activations quantized per block of 32, as llama.cpp does; `kquant_matmul`
(`kquant_matmul.cc`) does the same for the K-quants Q4_K/Q5_K/Q6_K (layout: `jaxinfer.kquant`).
`ragged_paged_attention` (`paged_attention.cc`) reads keys and values in place in the page pool,
where the XLA path first gathers them into a contiguous copy. Each matmul has a fused entry
(`int8_matmul_fused` and its kin) for several weights of one x: a layer's q, k and v in one call.

The shared library is built with the system C++ compiler (`CXX`, else `g++`) and `-march=native`
into `~/.cache/jaxinfer/native/` (`JAXINFER_NATIVE_DIR`), keyed by the source, the flags, the
jaxlib version and the CPU, so a rebuild happens only when one of them changes. Without a compiler,
or with `JAXINFER_NATIVE=0`, `available()` is False and callers keep the XLA path. A build that fails
where a compiler exists is logged as a WARNING (the engine then runs the XLA path), and `load()`
raises it, so the tests fail rather than skip.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

logger = logging.getLogger("jaxinfer")

HERE = Path(__file__).parent
SOURCES = (HERE / "int8_matmul.cc", HERE / "group_matmul.cc", HERE / "kquant_matmul.cc", HERE / "paged_attention.cc")
HEADERS = (HERE / "parallel.h", HERE / "group_simd.h", HERE / "half.h")
TARGETS = {"jaxinfer_int8_matmul": "JaxinferInt8Matmul", "jaxinfer_group_matmul": "JaxinferGroupMatmul",
           "jaxinfer_kquant_matmul": "JaxinferKQuantMatmul", "jaxinfer_int8_matmul_fused": "JaxinferInt8MatmulFused",
           "jaxinfer_group_matmul_fused": "JaxinferGroupMatmulFused",
           "jaxinfer_kquant_matmul_fused": "JaxinferKQuantMatmulFused",
           "jaxinfer_ragged_paged_attention": "JaxinferRaggedPagedAttention",
           "jaxinfer_ragged_paged_attention_f16": "JaxinferRaggedPagedAttentionF16"}
# The cache dtypes the native attention reads: float16 widens to float32 as it is loaded.
ATTENTION_CACHE_DTYPES = {jnp.dtype(jnp.float32): "jaxinfer_ragged_paged_attention",
                          jnp.dtype(jnp.float16): "jaxinfer_ragged_paged_attention_f16"}
# $JAXINFER_NATIVE_CFLAGS adds flags, e.g. "-mno-avx512f" to build (and test) the AVX2 paths on an AVX-512 machine.
# -fno-gnu-unique: GCC makes the static objects of inline functions (parallel.h's one `Workers`, its
# `Scratch` buffers) GNU-unique symbols, which the dynamic linker binds to one copy per process even
# across libraries loaded RTLD_LOCAL; two builds in one process (benchmarks/kernel_ab.py) then share
# the first one's objects whatever their layout.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast",
         "-fno-gnu-unique", *os.environ.get("JAXINFER_NATIVE_CFLAGS", "").split())


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
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(FLAGS).encode(), compiler.encode(), jaxlib.__version__.encode(),
                 _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    return root / f"jaxinfer_kernels-{key.hexdigest()[:16]}.so"  # every kernel of SOURCES


def _run_compiler(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def _build(compiler: str, out: Path) -> None:
    """Each source compiled on its own thread (each is seconds of -O3: on 2 cores this halves the
    build), then linked into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.debug("compiling the native CPU kernels (%s, once for this machine) ...", compiler)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        include = [f"-I{jax.ffi.include_dir()}", f"-I{HERE.parent}"]
        with ThreadPoolExecutor(max_workers=min(len(SOURCES), os.cpu_count() or 1)) as pool:
            # list(): every compile finishes, and the first failure raises here
            list(pool.map(_run_compiler, [[compiler, *FLAGS, *include, "-c", str(source), "-o", obj]
                                          for source, obj in zip(SOURCES, objects)]))
        partial = Path(tmp) / out.name
        _run_compiler([compiler, *FLAGS, *objects, "-o", str(partial), "-lpthread"])
        os.replace(partial, out)  # atomic: a concurrent build of the same key writes the same bytes
    logger.info("native CPU kernels built in %.1f s (once for this machine): %s", time.perf_counter() - start, out)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def turned_off() -> str | None:
    """Why the native kernels are not even tried (`JAXINFER_NATIVE=0`, no compiler), else None."""
    if os.environ.get("JAXINFER_NATIVE", "1") == "0":
        return "JAXINFER_NATIVE=0"
    if _compiler() is None:
        return "no C++ compiler (CXX, g++ or c++)"
    return None


def load() -> Path:
    """Builds the shared library if this machine has none yet and registers its kernels with XLA.
    Raises RuntimeError (with the compiler's message) or OSError where that fails."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (CXX, g++ or c++)")
    path = _library_path(compiler)
    if not path.exists():
        _build(compiler, path)
    library = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return path


@functools.cache
def available() -> bool:
    """Whether the native kernels are built and registered (building them if needed). False, and the
    callers keep the XLA path, when they are turned off, or with a WARNING when the build fails."""
    reason = turned_off()
    if reason is not None:  # asked for by the user, or a warning worth acting on
        logger.log(logging.INFO if reason == "JAXINFER_NATIVE=0" else logging.WARNING,
                   "native CPU kernels off (%s): matmul and attention run on the XLA path (slower decode)", reason)
        return False
    try:
        load()
    except (OSError, RuntimeError) as e:
        logger.warning("the native CPU kernels failed to build or load, so the engine falls back to the XLA "
                       "path (slower decode): %s", e)
        return False
    isa = _built_for()
    logger.info("native CPU kernels loaded: the %s path (built for %s)", _path_name(isa), " ".join(isa))
    return True


@functools.cache
def _library() -> ctypes.CDLL:
    """The loaded library, for the plain C functions that say what it was built with."""
    library = ctypes.cdll.LoadLibrary(str(_library_path(_compiler())))
    library.JaxinferInstructionSets.restype = ctypes.c_char_p
    return library


def _built_for() -> tuple[str, ...]:
    return tuple(_library().JaxinferInstructionSets().decode().split())


@functools.cache
def instruction_sets() -> tuple[str, ...]:
    """The instruction sets the loaded kernels were compiled for, of those that choose their paths
    (avx512f, avx512bw, avx512vnni, avx2, fma, f16c): `-march=native` decides, with
    `JAXINFER_NATIVE_CFLAGS`. () where the kernels are not available."""
    return _built_for() if available() else ()


def simd_path() -> str:
    """The integer matmuls' path in the loaded build: "AVX-512 VNNI" (vpdpbusd), "AVX2" (vpmaddubsw)
    or "none" (the XLA path; also when the kernels are not available)."""
    return _path_name(instruction_sets())


def _path_name(isa: tuple[str, ...]) -> str:
    if {"avx512vnni", "avx512bw"} <= set(isa):
        return "AVX-512 VNNI"
    return "AVX2" if "avx2" in isa else "none"


def cpu_description() -> str:
    """This machine for a benchmark's record: the CPU's name, family and model (one name has
    covered CPUs with and without AVX-512 on this project's VMs), its threads, and the native
    kernels' SIMD path, e.g. "AMD EPYC (family 25, model 1), 2 threads, native kernels: AVX2"."""
    name, family, model = platform.processor() or platform.machine(), "?", "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                name = value
            elif key == "cpu family":
                family = value
            elif key == "model":
                model = value
            if key == "flags":  # the first processor's fields are all before its flags
                break
    except OSError:
        pass
    return f"{name} (family {family}, model {model}), {os.cpu_count()} threads, native kernels: {simd_path()}"


def block_width(n: int) -> int:
    """Columns per block of the blocked layout: the widest of 256, 192, 128, 64 that divides N (no
    padding, which the kernel would read as weights) into at least 8 blocks (the threads' shares),
    else 64, the last block padded."""
    return next((b for b in (256, 192, 128, 64) if n % b == 0 and n // b >= 8), 64)


def to_blocked(data, block: int | None = None):
    """int8 W[..., K, N] -> [..., NB, K, B] (B = `block` or `block_width(N)`): each block of columns
    contiguous, so the kernel streams memory in order."""
    *lead, k, n = data.shape
    block = block or block_width(n)
    pad = -n % block
    data = jnp.pad(data, [(0, 0)] * len(lead) + [(0, 0), (0, pad)])
    blocks = data.reshape(*lead, k, (n + pad) // block, block)
    return jnp.moveaxis(blocks, -2, -3)


# Columns per block of the vnni layout: one tile of the kernel's single-row pass (4 vectors of 16),
# so that pass streams each block in order.
VNNI_BLOCK = 64


def to_vnni(data):
    """int8 W[..., K, N] -> [..., NB, K / 4, 64, 4]: the integer path's layout, blocks of 64 columns
    contiguous and each column's 4 consecutive k adjacent. K must be a multiple of 32 (the
    activations' quantization block), and every value in [-127, 127]: the AVX2 dot product negates
    weights (vpsignb), and -128 has no int8 negation (int8_matmul.cc). `quant.quantize_int8` clips to
    that range; a weight from elsewhere with a -128 is refused here, at load, rather than computed wrong."""
    *lead, k, n = data.shape
    if k % 32:
        raise ValueError(f"the vnni layout needs K a multiple of 32, got {k}")
    if bool(jnp.any(data == -128)):
        raise ValueError("the vnni layout needs int8 weights in [-127, 127] (the AVX2 integer path cannot "
                         "negate -128); this weight has -128: quantize it with jaxinfer.quant.quantize_int8")
    blocked = to_blocked(data, block=VNNI_BLOCK)  # [..., NB, K, B]
    *_, nb, _, block = blocked.shape
    return jnp.swapaxes(blocked.reshape(*lead, nb, k // 4, 4, block), -1, -2)


def from_vnni(vnni, n: int):
    """The inverse of `to_vnni`: [..., NB, K / 4, B, 4] -> [..., K, n]."""
    *lead, nb, quads, block, _ = vnni.shape
    return from_blocked(jnp.swapaxes(vnni, -1, -2).reshape(*lead, nb, quads * 4, block), n)


@functools.cache
def has_integer_path() -> bool:
    """Whether the native matmul was built with its integer path (AVX-512 VNNI or AVX2)."""
    return available() and bool(_library().JaxinferHasIntegerPath())


def from_blocked(blocked, n: int):
    """The inverse of `to_blocked`: [..., NB, K, B] -> [..., K, n]."""
    *lead, nb, k, block = blocked.shape
    return jnp.moveaxis(blocked, -3, -2).reshape(*lead, k, nb * block)[..., :n]


def _layer_stack(kernel: str, single: bool, layer, *arrays):
    """The kernels take a layer stack and a layer index: a single weight becomes a stack of one
    (layer 0); a stack needs its `layer`. None entries (no mins) stay None."""
    if single:
        return tuple(None if a is None else a[None] for a in arrays), 0
    if layer is None:
        raise ValueError(f"{kernel}: a stacked weight needs `layer`")
    return arrays, layer


# Weight dtypes of `int8_matmul` (float8_e4m3fn: the float path only, [K, N] or blocked).
PER_CHANNEL_DTYPES = (jnp.int8, jnp.float8_e4m3fn)


def int8_matmul(x, data, scales, layer=None, *, group_size: int = 0):
    """x[M, K] float32 @ W[K, N], W = data[(layer,) K, N] (int8 or float8_e4m3fn) * scales[(layer,) N]
    (float16); with `group_size` G, scales [(layer,) K / G, N], one per G rows and column (FP8
    checkpoints' 128 x 128 blocks), applied to each group's partial sums.

    `data` is [K, N], or blocked ([NB, K, B], `to_blocked`: the fast layout), or for per-channel
    int8 the integer path's `to_vnni` layout. `data`/`scales` may carry a leading layer axis ([L, K,
    N] or [L, NB, K, B] / [L, N]); `layer` (an int32 scalar, traced or not) picks one without copying
    it out. Returns float32 [M, N]. CPU only.
    """
    if x.dtype != jnp.float32 or data.dtype not in PER_CHANNEL_DTYPES or scales.dtype != jnp.float16:
        raise TypeError(f"int8_matmul takes float32 x, int8 or float8_e4m3fn data, float16 scales; got {x.dtype}, "
                        f"{data.dtype}, {scales.dtype}")
    if not available():
        raise RuntimeError("the native CPU kernels are not available (see the log for why)")
    (data, scales), layer = _layer_stack("int8_matmul", scales.ndim == (2 if group_size else 1), layer, data, scales)
    _check_groups("int8_matmul", x.shape[-1], scales, group_size)
    m, n = x.shape[0], scales.shape[-1]
    call = jax.ffi.ffi_call("jaxinfer_int8_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(x, data, scales, jnp.asarray(layer, jnp.int32))


def int8_matmul_fused(x, weights, layer=None):
    """[int8_matmul(x, data, scales, layer, group_size=group_size) for data, scales(, group_size) in
    weights] (group_size 0 where an entry has two items), in one kernel call: x is quantized once
    and the column blocks of all the weights are dealt out to the threads together (fused
    projections: q, k and v; gate and up). Each output is bit-for-bit the single call's. The
    weights are all stacks or all single weights."""
    _check_fused("int8_matmul_fused", x, weights)
    groups = [entry[2] if len(entry) > 2 else 0 for entry in weights]
    weights = [tuple(entry[:2]) for entry in weights]
    for (data, scales), group_size in zip(weights, groups):
        if data.dtype not in PER_CHANNEL_DTYPES or scales.dtype != jnp.float16:
            raise TypeError(f"int8_matmul_fused takes int8 or float8_e4m3fn data and float16 scales; got "
                            f"{data.dtype}, {scales.dtype}")
    if not available():
        raise RuntimeError("the native CPU kernels are not available (see the log for why)")
    stacks, layer = _fused_stacks("int8_matmul_fused", [scales.ndim == (2 if g else 1) for (_, scales), g
                                                        in zip(weights, groups)], layer, weights)
    for (_, scales), group_size in zip(stacks, groups):
        _check_groups("int8_matmul_fused", x.shape[-1], scales, group_size)
    outs = [jax.ShapeDtypeStruct((x.shape[0], scales.shape[-1]), jnp.float32) for _, scales in stacks]
    call = jax.ffi.ffi_call("jaxinfer_int8_matmul_fused", outs)
    return list(call(x, jnp.asarray(layer, jnp.int32), *(a for pair in stacks for a in pair)))


def _check_groups(kernel: str, k: int, scales, group_size: int) -> None:
    """Scales per `group_size` rows ([L, K / G, N]) must have K / G rows; per channel, none ([L, N])."""
    if group_size and (scales.ndim != 3 or k % group_size or scales.shape[1] != k // group_size):
        raise ValueError(f"{kernel}: scales {scales.shape} are not one per {group_size} of K={k} rows and column")


def _check_fused(kernel: str, x, weights) -> None:
    if x.dtype != jnp.float32 or x.ndim != 2:
        raise TypeError(f"{kernel} takes float32 x [M, K]; got {x.dtype} {x.shape}")
    if not weights:
        raise ValueError(f"{kernel}: no weights")


def _fused_stacks(kernel: str, single: list[bool], layer, weights):
    """`_layer_stack` over several weights (tuples of arrays), which must agree on being stacks."""
    if len(set(single)) != 1:
        raise ValueError(f"{kernel}: the weights must be all layer stacks or all single weights")
    stacks = []
    for arrays in weights:
        stacked, index = _layer_stack(kernel, single[0], layer, *arrays)
        stacks.append(stacked)
    return stacks, index


def ragged_paged_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables, *, sm_scale,
                           sliding_window=None, soft_cap=None):
    """The contract of `kernels_pallas.paged_attention.ragged_paged_attention_reference` on the CPU
    (`paged_attention.cc`): float32 q and output, a float32 or float16 cache (widened as it is read;
    float32 arithmetic); each row reads its keys and values in place in the page pool. Head_dim a
    multiple of the vector width (8 or 16).
    `sliding_window`: None or an int32 scalar, traced or not (<= 0: none)."""
    if not available():
        raise RuntimeError("the native CPU kernels are not available (see the log for why)")
    if q.dtype != jnp.float32 or k_cache.dtype != v_cache.dtype or k_cache.dtype not in ATTENTION_CACHE_DTYPES:
        raise TypeError(f"ragged_paged_attention takes float32 q and float32 or float16 caches of one dtype, "
                        f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    call = jax.ffi.ffi_call(ATTENTION_CACHE_DTYPES[k_cache.dtype], jax.ShapeDtypeStruct(q.shape, jnp.float32))
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    window = i32(0 if sliding_window is None else sliding_window)
    return call(q, k_cache, v_cache, i32(layer), i32(query_start_loc), i32(seq_lens), i32(block_tables), window,
                sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0))


@functools.cache
def has_group_path() -> bool:
    """Whether the native build has `group_matmul` (AVX-512 VNNI, or AVX2 with FMA and F16C)."""
    return available() and bool(_library().JaxinferHasGroupPath())


GROUP = 32  # rows per block of the grouped layout (and per scale of GGUF's block formats)
GROUP_SIZES = (32, 64, 128)  # rows per scale that `group_matmul` takes (AWQ/GPTQ int4: 64 or 128)
# How a symmetric format's codes are offset: its value is scale * (code - zero point).
ZERO_POINTS = {8: 128, 4: 8}


def to_group_codes(data, bits: int):
    """A grouped weight's values as `group_matmul` reads them.

    bits 8 (Q8_0): int8 W[..., K, N] -> uint8 codes (value + 128) [..., NB, K / 4, 64, 4], the vnni
    layout. bits 4 (Q4_0/Q4_1): packed uint8 [..., K / 2, N] (`quant.pack_int4`: low nibble = even
    row) -> [..., NB, K / 32, 4, 64, 4], byte (g, p, c, i) = code[32 g + 4 p + i] | code[... + 16] << 4.
    N must be a multiple of 16, K of 32; the last block of columns is zero-padded.
    """
    if bits == 8:
        *lead, k, n = data.shape
        codes = (data.astype(jnp.int16) + 128).astype(jnp.uint8)
    elif bits == 4:
        *lead, half, n = data.shape
        k = 2 * half
        codes = jnp.stack([data & 0xF, data >> 4], axis=-2).reshape(*lead, k, n)  # [..., K, N], rows in order
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if k % GROUP or n % 16:
        raise ValueError(f"grouped weights need K a multiple of {GROUP} and N of 16, got K={k}, N={n}")
    blocked = to_blocked(codes, block=VNNI_BLOCK)  # [..., NB, K, B]
    *_, nb, _, block = blocked.shape
    if bits == 8:
        return jnp.swapaxes(blocked.reshape(*lead, nb, k // 4, 4, block), -1, -2)
    # [..., NB, K / 32, 2 (halves of the group), 4 (quad p), 4 (i), B]
    halves = blocked.reshape(*lead, nb, k // GROUP, 2, 4, 4, block)
    packed = halves[..., 0, :, :, :] | (halves[..., 1, :, :, :] << 4)  # [..., NB, K / 32, 4, 4, B]
    return jnp.swapaxes(packed, -1, -2)  # [..., NB, K / 32, 4, B, 4]


def from_group_codes(codes, bits: int, n: int):
    """The inverse of `to_group_codes`: the weight's int8 [..., K, n] (8) or packed [..., K / 2, n] (4)."""
    if bits == 8:
        *lead, nb, quads, block, _ = codes.shape
        blocked = jnp.swapaxes(codes, -1, -2).reshape(*lead, nb, quads * 4, block)
        return (from_blocked(blocked, n).astype(jnp.int16) - 128).astype(jnp.int8)
    *lead, nb, groups, _, block, _ = codes.shape
    packed = jnp.swapaxes(codes, -1, -2)  # [..., NB, K / 32, 4, 4, B]
    halves = jnp.stack([packed & 0xF, packed >> 4], axis=-4)  # [..., NB, K / 32, 2, 4, 4, B]
    values = from_blocked(halves.reshape(*lead, nb, groups * GROUP, block), n)  # [..., K, n], 0..15
    return (values[..., 0::2, :] | (values[..., 1::2, :] << 4)).astype(jnp.uint8)


def group_matmul(x, codes, scales, mins=None, layer=None, *, bits: int):
    """x[M, K] float32 @ W, W[k, n] = scales[k // G, n] * code[k, n] + mins[k // G, n] (without
    mins: scales * (code - ZERO_POINTS[bits])), codes as `to_group_codes` lays them out. G, the rows
    per scale, is K / scales.shape[-2]: one of GROUP_SIZES (the kernel takes 32 times any power of two).

    `codes`/`scales`/`mins` may carry a leading layer axis; `layer` (an int32 scalar, traced or not)
    picks one without copying it out. Activations are quantized to int8 per block of 32 inside the
    kernel. Returns float32 [M, N]. CPU only.
    """
    if x.dtype != jnp.float32 or codes.dtype != jnp.uint8 or scales.dtype != jnp.float16:
        raise TypeError(f"group_matmul takes float32 x, uint8 codes, float16 scales; got {x.dtype}, "
                        f"{codes.dtype}, {scales.dtype}")
    if not has_group_path():
        raise RuntimeError("the native grouped matmul is not available (see the log for why)")
    (codes, scales, mins), layer = _layer_stack("group_matmul", scales.ndim == 2, layer, codes, scales, mins)
    m, n = x.shape[0], scales.shape[-1]
    call = jax.ffi.ffi_call("jaxinfer_group_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))
    no_mins = jnp.zeros((1, 1, 1), jnp.float16)
    return call(x, codes, scales, no_mins if mins is None else mins, jnp.asarray(layer, jnp.int32),
                bits=np.int64(bits), zero_point=np.float32(0.0 if mins is not None else ZERO_POINTS[bits]))


def group_matmul_fused(x, weights, layer=None):
    """[group_matmul(x, codes, scales, mins, layer, bits=bits) for codes, scales, mins, bits in
    weights], in one kernel call (`int8_matmul_fused`'s contract: x quantized once, the blocks dealt
    out together, each output bit-for-bit the single call's). `mins` may be None."""
    _check_fused("group_matmul_fused", x, weights)
    for codes, scales, _, bits in weights:
        if codes.dtype != jnp.uint8 or scales.dtype != jnp.float16 or bits not in ZERO_POINTS:
            raise TypeError(f"group_matmul_fused takes uint8 codes, float16 scales and bits 4 or 8; got "
                            f"{codes.dtype}, {scales.dtype}, {bits}")
    if not has_group_path():
        raise RuntimeError("the native grouped matmul is not available (see the log for why)")
    stacks, layer = _fused_stacks("group_matmul_fused", [scales.ndim == 2 for _, scales, _, _ in weights], layer,
                                  [(codes, scales, mins) for codes, scales, mins, _ in weights])
    no_mins = jnp.zeros((1, 1, 1), jnp.float16)
    operands = [a for codes, scales, mins in stacks for a in (codes, scales, no_mins if mins is None else mins)]
    outs = [jax.ShapeDtypeStruct((x.shape[0], scales.shape[-1]), jnp.float32) for _, scales, _ in stacks]
    call = jax.ffi.ffi_call("jaxinfer_group_matmul_fused", outs)
    return list(call(x, jnp.asarray(layer, jnp.int32), *operands,
                     bits=np.array([bits for *_, bits in weights], np.int64),
                     zero_points=np.array([0.0 if mins is not None else ZERO_POINTS[bits]
                                           for _, _, mins, bits in weights], np.float32)))


def kquant_matmul(x, data, index, layer, *, n: int):
    """x[M, K] float32 @ W[K, n], W layer `layer` of a K-quant stack: `data` uint8 holds every
    layer's bytes and `index` [L, 2] int32 each layer's type id and byte offset / 64 (the layout of
    `jaxinfer.kquant`, which builds both). The layer is read in place. Activations are quantized to
    int8 per block of 32 inside the kernel. Returns float32 [M, n]. CPU only; needs `has_group_path`.
    """
    if x.dtype != jnp.float32 or data.dtype != jnp.uint8 or index.dtype != jnp.int32:
        raise TypeError(f"kquant_matmul takes float32 x, uint8 data, int32 index; got {x.dtype}, {data.dtype}, "
                        f"{index.dtype}")
    if not has_group_path():
        raise RuntimeError("the native grouped matmul is not available (see the log for why)")
    call = jax.ffi.ffi_call("jaxinfer_kquant_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, data, index, jnp.asarray(layer, jnp.int32), n=np.int64(n))


def kquant_matmul_fused(x, weights, layer):
    """[kquant_matmul(x, data, index, layer, n=n) for data, index, n in weights], in one kernel call
    (`int8_matmul_fused`'s contract: x quantized once, the blocks dealt out together, each output
    bit-for-bit the single call's). The weights may be of different types, layer by layer."""
    _check_fused("kquant_matmul_fused", x, weights)
    for data, index, _ in weights:
        if data.dtype != jnp.uint8 or index.dtype != jnp.int32:
            raise TypeError(f"kquant_matmul_fused takes uint8 data and int32 index; got {data.dtype}, {index.dtype}")
    if not has_group_path():
        raise RuntimeError("the native grouped matmul is not available (see the log for why)")
    call = jax.ffi.ffi_call("jaxinfer_kquant_matmul_fused",
                            [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32) for *_, n in weights])
    return list(call(x, jnp.asarray(layer, jnp.int32), *(a for data, index, _ in weights for a in (data, index)),
                     n=np.array([n for *_, n in weights], np.int64)))
