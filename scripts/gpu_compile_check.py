"""Compiles the engine's whole step for H100 (sm_90a) and A100 (sm_80) without a GPU, and says
whether each shipped configuration fits the card.

The program is `jaxinfer.runner.jit_step`, the one the engine runs: model, Pallas attention and
K/V page write, Pallas quantized matmuls, sampling, bf16, KV cache donated. Its devices are
compile-only GPUs from `jax.experimental.topologies` (XLA's real GPU compiler, Triton and ptxas
included, runs; nothing executes). Weights are abstract: no checkpoint is needed to compile.

For each configuration and card, the largest step bucket (max_num_batched_tokens tokens, the
step with the most temporaries) is compiled with a one-sequence KV cache. Its `memory_analysis()`
gives the weights and batch inputs (arguments less that cache), the temporaries and the outputs.
The KV cache gets what is left of `util` x device memory, as vLLM's --gpu-memory-utilization sizes
it; being donated and aliased, a bigger cache adds exactly its own bytes. A configuration that
cannot hold one sequence of max_model_len does not fit. Our kernels' PTX (dumped by XLA) goes
through ptxas for registers and spills. XLA's cost analysis of a
compile-only GPU executable is unavailable in jax 0.12 (it returns None), so the bytes and flops
of a decode step are computed from the shapes: every weight read once, each sequence's KV
context read once per layer, 2 flops per weight per token plus attention. That gives the memory
roofline tokens/s at batch 1 and 64 on the card's bandwidth and its $ per 1M tokens.

Exits 1 on a compile error, a spill in one of our kernels, or a configuration that does not fit.
Run it through scripts/gpu_compile_check.sh (it builds .venv-cuda). `--quick` compiles one
configuration on H100 only; `--markdown FILE` writes the table.
"""

import argparse
import dataclasses
import glob
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_dumps import dump_dir  # noqa: E402

DUMP_DIR = dump_dir("jaxinfer-gpu-compile-")
MOSAIC_DUMP_DIR = os.path.join(DUMP_DIR, "mosaic")  # Mosaic GPU kernels: their PTX and ptxas reports
os.makedirs(MOSAIC_DUMP_DIR, exist_ok=True)
os.environ.setdefault("MOSAIC_GPU_DUMP_TO", MOSAIC_DUMP_DIR)
os.environ.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR}"
                           " --xla_dump_emitter_re=.*").strip()
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LLVM_DISABLE_SYMBOLIZATION", "1")  # see scripts/gpu_compile_check.sh
os.environ.setdefault("JAXINFER_NATIVE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jaxinfer import quant, tensor_parallel  # noqa: E402
from jaxinfer.kv_cache import kv_cache_bytes_per_page  # noqa: E402
from jaxinfer.compilation import step_buckets  # noqa: E402
from jaxinfer.config import EngineConfig, ModelConfig  # noqa: E402
from jaxinfer.models.llama import Llama  # noqa: E402
from jaxinfer.models.params import head_tensor_name, projection_formats  # noqa: E402
from jaxinfer.runner import empty_batch, jit_step  # noqa: E402
from jaxinfer.weights import quantized  # noqa: E402

GIB = 1024 ** 3
SEED_PRICE_PER_HOUR = 2.60  # H100 80GB, $/hour: the seed article's cost table
CONTEXT = 1024  # KV tokens per sequence for the decode roofline


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    arch: str  # ptxas target
    memory: int  # bytes
    bandwidth: float  # bytes/s, the data sheet's
    bf16_flops: float  # dense, per second
    target_config: str  # XLA's GpuTargetConfigProto, text form, from the data sheet


def _target_config(description, cc, sms, fpus, smem_optin, smem_core, bandwidth, l2, clock, memory):
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_block_optin: {smem_optin} shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory} registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {cc[0]} minor: {cc[1]} }}
}}
platform_name: "CUDA"
runtime_version {{ major: 12 minor: 9 patch: 0 }}
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{description}"
"""


H100_MEMORY, A100_MEMORY = 85520809984, 85899345920  # 80 GB cards, as their drivers report them
CARDS = {
    "H100": Card("H100 SXM 80GB", "sm_90a", H100_MEMORY, 3.35e12, 989e12, _target_config(
        "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 232448, 233472, 3.35e12, 52428800, 1.98, H100_MEMORY)),
    "A100": Card("A100 SXM 80GB", "sm_80", A100_MEMORY, 2.039e12, 312e12, _target_config(
        "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 166912, 167936, 2.039e12, 41943040, 1.41, A100_MEMORY)),
}

LLAMA3_ROPE = ("llama3", 8.0, 1.0, 4.0, 8192)


def llama3(hidden, intermediate, layers, heads, name):
    return ModelConfig(architecture="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                       rope_scaling=LLAMA3_ROPE, name=name)


LLAMA3_8B = llama3(4096, 14336, 32, 32, "Llama-3-8B")
LLAMA3_70B = llama3(8192, 28672, 80, 64, "Llama-3-70B")


@dataclasses.dataclass(frozen=True)
class Shipped:
    """One shipped configuration: a model, its weight format, and the engine limits."""

    name: str
    model: ModelConfig
    formats: dict  # projection -> WeightFormat (empty: bf16)
    head_format: object  # WeightFormat of the LM head, or None
    engine: EngineConfig
    cards: tuple[str, ...]
    tp: int = 1  # devices the model is split over (`jaxinfer.tensor_parallel`), one card each
    backend: str = "pallas"  # `--attention-backend` and `--matmul-backend`: "pallas" (Triton) or "mosaic_gpu"


def uniform(fmt):
    return {p: fmt for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def shipped_configurations() -> list[Shipped]:
    # server.py's GPU defaults (EngineConfig: 512 batched tokens, page size 16), 64 sequences per step
    # for the batch-64 row, and a context that fits each model's use.
    engine = EngineConfig(max_num_seqs=64, dtype="bfloat16")
    out = []
    try:  # SmolLM2 as bundled: its GGUF's own Q4_1/Q8_0 blocks ("native", the GPU default for a GGUF)
        from jaxinfer.weights import open_checkpoint

        checkpoint = open_checkpoint("SmolLM2-135M-Instruct")
        formats = {p: f for p, (f, _) in projection_formats(checkpoint.config, checkpoint, "native").items()}
        head = quant.resolve_lm_head_quantization("auto", "native", checkpoint.tensor_type(
            head_tensor_name(checkpoint.config)))
        out.append(Shipped("SmolLM2-135M native (Q4_1 GGUF)", checkpoint.config, formats,
                           quant.weight_format(head) if head == "int8" else None, engine, ("H100", "A100")))
    except Exception as e:  # noqa: BLE001 - the bundled package is missing: say so, check the rest
        print(f"SmolLM2 skipped: {type(e).__name__}: {e}")
    long = engine.replace(max_model_len=8192)
    int4 = quant.weight_format("int4", 128)
    q4_k_m_like = {**uniform(quant.WeightFormat("int5", 32)), "v_proj": quant.WeightFormat("int8", 32),
                   "down_proj": quant.WeightFormat("int6", 16, symmetric=False)}
    out += [
        Shipped("Llama-3-8B bf16", LLAMA3_8B, {}, None, long, ("H100", "A100")),
        Shipped("Llama-3-8B int8", LLAMA3_8B, uniform(quant.weight_format("int8")), None, long, ("H100", "A100")),
        Shipped("Llama-3-8B int4 g128", LLAMA3_8B, uniform(int4), None, long, ("H100", "A100")),
        # A Q4_K_M file's formats on a GPU (`weights.gguf.group_format`, Qwen2.5-Coder-0.5B's pattern):
        # Q5_0 projections int5, attn_v (Q8_0 and Q5_0 layers) int8 g32, ffn_down (Q4_K, Q6_K) int6 g16.
        Shipped("Llama-3-8B Q4_K_M-like (int5 / int8 g32 / int6 g16)", LLAMA3_8B, q4_k_m_like, None, long,
                ("H100", "A100")),
        # `--attention-backend mosaic_gpu --matmul-backend mosaic_gpu` (opt-in): the Mosaic GPU kernels
        # inside the whole step, sm_90a only.
        Shipped("Llama-3-8B int4 g128, Mosaic GPU", LLAMA3_8B, uniform(int4), None, long, ("H100",),
                backend="mosaic_gpu"),
        Shipped("Llama-3-8B int8, Mosaic GPU", LLAMA3_8B, uniform(quant.weight_format("int8")), None, long,
                ("H100",), backend="mosaic_gpu"),
        Shipped("Llama-3-70B int4 g128", LLAMA3_70B, uniform(int4), None, long, ("H100",)),
        Shipped("Llama-3-70B AWQ g128", LLAMA3_70B, checkpoint_formats(LLAMA3_70B, AWQ_GEMM_G128), None, long,
                ("H100",)),
        # Split over several H100s (`--tensor-parallel-size`): the SPMD program, memory per device.
        Shipped("Llama-3-70B bf16 TP 8", LLAMA3_70B, {}, None, long, ("H100",), tp=8),
        Shipped("Llama-3-70B int4 g128 TP 2", LLAMA3_70B, uniform(int4), None, long, ("H100",), tp=2),
        # int5/int6 row-parallel pieces packed again per device (`tensor_parallel._split_high_bits`)
        Shipped("Llama-3-8B Q4_K_M-like TP 2", LLAMA3_8B, q4_k_m_like, None, long, ("H100",), tp=2),
    ]
    return out


# The quantization_config of an AWQ GEMM checkpoint (AutoAWQ's and gptqmodel's, e.g. the seed's
# Llama 3 70B AWQ): read by the loader's own detection, so the check compiles the format it loads.
AWQ_GEMM_G128 = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def checkpoint_formats(model: ModelConfig, quantization_config: dict) -> dict:
    """projection -> WeightFormat as `jaxinfer.weights.quantized` loads a checkpoint with this config."""
    q = quantized.detect(quantization_config)
    k_of = {"o_proj": model.num_heads * model.head_dim, "down_proj": model.intermediate_size}
    return {p: q.weight_format(k_of.get(p, model.hidden_size)) for p in uniform(None)}


def topology_mesh(card: Card, size: int = 1) -> Mesh:
    """`size` compile-only cards of one host (topology 1x1xN: one process, N devices)."""
    topology = topologies.get_topology_desc(card.name, "cuda", target_config=card.target_config,
                                            topology=f"1x1x{size}")
    return Mesh(topology.devices, (tensor_parallel.AXIS,))


def abstract_step_args(shipped: Shipped, num_pages: int, num_tokens: int, num_seqs: int, sharding):
    """(jitted step, its abstract arguments) for one bucket, every array on `sharding`."""
    model = nnx.eval_shape(lambda: Llama(shipped.model, dtype=jnp.bfloat16, attention_backend=shipped.backend,
                                         formats=shipped.formats, quant_backend=shipped.backend,
                                         head_format=shipped.head_format))
    graphdef, state = nnx.split(model)
    c, e = shipped.model, shipped.engine
    cache = jax.ShapeDtypeStruct((c.num_layers, c.num_kv_heads, num_pages, e.page_size, c.head_dim), jnp.bfloat16,
                                 sharding=sharding)
    batch = empty_batch(num_tokens, num_seqs, -(-e.max_model_len // e.page_size), e.max_model_len, c.vocab_size)
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    return jit_step(graphdef), (jax.tree.map(place, state), cache, cache, *jax.tree.map(place, batch))


def abstract_tp_step_args(shipped: Shipped, mesh: Mesh, num_pages: int, num_tokens: int, num_seqs: int):
    """As `abstract_step_args`, for the model split over `mesh` the way the engine splits it:
    `tensor_parallel.shard_model` run abstractly (no weight exists), its state and the KV cache
    sharded by its specs, the batch replicated."""
    built = {}

    def shard():
        model = Llama(shipped.model, dtype=jnp.bfloat16, attention_backend=shipped.backend, formats=shipped.formats,
                      quant_backend=shipped.backend, head_format=shipped.head_format)
        graphdef, state, specs, vocab_parallel = tensor_parallel.shard_model(model, mesh, native_layouts=False,
                                                                             integer=False)
        built.update(graphdef=graphdef, specs=specs, vocab_parallel=vocab_parallel)
        return state

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        state = jax.eval_shape(shard)
    state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state,
                         tensor_parallel.shardings(mesh, built["specs"]))
    c, e = shipped.model, shipped.engine
    kv_heads = tensor_parallel.cache_kv_heads(c, shipped.tp) * shipped.tp  # replicated when fewer than cards
    cache = jax.ShapeDtypeStruct((c.num_layers, kv_heads, num_pages, e.page_size, c.head_dim), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, tensor_parallel.CACHE_SPEC))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = empty_batch(num_tokens, num_seqs, -(-e.max_model_len // e.page_size), e.max_model_len, c.vocab_size)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), batch)
    step = tensor_parallel.jit_step(built["graphdef"], mesh, built["specs"], built["vocab_parallel"])
    return step, (state, cache, cache, *batch)


def compile_bucket(shipped, mesh, num_pages, num_tokens, num_seqs):
    if shipped.tp > 1:
        step, args = abstract_tp_step_args(shipped, mesh, num_pages, num_tokens, num_seqs)
    else:
        step, args = abstract_step_args(shipped, num_pages, num_tokens, num_seqs, NamedSharding(mesh, PartitionSpec()))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # Pallas reads the GPU kind from it
        return step.lower(*args).compile()


KERNEL_RE = re.compile(r"\.entry\s+(ragged_paged_attention|write_kv|quant_matmul_\w+)\s*\(")


def ptxas_path() -> str:
    """ptxas from the CUDA wheels: nvidia-cuda-nvcc-cu12 installs it in nvidia/cuda_nvcc/bin, CUDA 13's
    nvidia-cuda-nvcc in nvidia/cu13/bin (scripts/gpu_compile_check_jax011.sh)."""
    import importlib

    for package in ("nvidia.cuda_nvcc", "nvidia.cu13"):
        try:
            paths = list(importlib.import_module(package).__path__)
        except ImportError:
            continue
        for path in paths:
            if os.path.exists(os.path.join(path, "bin", "ptxas")):
                return os.path.join(path, "bin", "ptxas")
    raise RuntimeError("ptxas not found: install nvidia-cuda-nvcc-cu12 (or CUDA 13's nvidia-cuda-nvcc)")


def kernel_reports(ptx_files, arch) -> dict[str, tuple[int, int, int]]:
    """{kernel name: (registers, static smem bytes, spill bytes)} of our Pallas kernels, from ptxas -v."""
    ptxas = ptxas_path()
    reports = {}
    for path in ptx_files:
        with open(path) as f:
            text = f.read()
        names = KERNEL_RE.findall(text)
        if not names:
            continue
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptxas failed on {names}: {proc.stderr[-2000:]}")
        for block in proc.stderr.split("Compiling entry function")[1:]:
            name = re.match(r"\s*'(\w+)'", block).group(1)
            if name not in names:
                continue
            regs = int(re.search(r"Used (\d+) registers", block).group(1))
            smem = re.search(r"(\d+) bytes smem", block)
            spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", block))
            old = reports.get(name, (0, 0, 0))
            reports[name] = tuple(max(a, b) for a, b in zip(old, (regs, int(smem.group(1)) if smem else 0, spills)))
    return reports


def mosaic_reports(paths) -> dict[str, tuple[int, int, int]]:
    """{kernel: (registers, smem bytes, spill bytes)} from the ptxas reports Mosaic GPU dumped."""
    reports = {}
    for path in paths:
        if not path.endswith(".ptxas"):
            continue
        text = open(path).read()
        regs = re.search(r"Used (\d+) registers", text)
        if regs is None:
            continue
        spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
        resources = path[:-len(".ptxas")] + ".resources.txt"
        smem = re.search(r"smem_scratch_bytes=(\d+)", open(resources).read()) if os.path.exists(resources) else None
        name = "mosaic:" + os.path.basename(path)[:-len(".ptxas")].split(".")[0]
        old = reports.get(name, (0, 0, 0))
        reports[name] = tuple(max(a, b) for a, b in zip(old, (int(regs.group(1)), int(smem.group(1)) if smem else 0,
                                                               spills)))
    return reports


def new_ptx_files(seen: set) -> list[str]:
    files = set(glob.glob(os.path.join(DUMP_DIR, "*.ptx"))) | set(glob.glob(os.path.join(MOSAIC_DUMP_DIR, "*")))
    new = sorted(files - seen)
    seen.update(files)
    return new


def decode_cost(shipped: Shipped, weight_bytes: int, batch: int):
    """(bytes, flops) of one decode step of `batch` sequences with CONTEXT tokens each."""
    c, e = shipped.model, shipped.engine
    kv_per_token = kv_cache_bytes_per_page(c, e.page_size, jnp.bfloat16) // e.page_size
    num_bytes = weight_bytes + batch * CONTEXT * kv_per_token
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * c.hidden_size * c.intermediate_size
    matmul_weights = c.num_layers * per_layer + c.vocab_size * c.hidden_size  # the LM head included
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * CONTEXT  # QK^T and PV, per token
    return num_bytes, batch * (2 * matmul_weights + attention)


@dataclasses.dataclass
class Result:
    config: str
    card: str
    weights_gib: float = 0.0
    temp_gib: float = 0.0
    kv_tokens: int = 0
    total_gib: float = 0.0
    fits: bool = False
    tok_s: tuple = ()
    usd_per_m: tuple = ()
    kernels: dict = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0
    error: str = ""


def check(shipped: Shipped, card_key: str, util: float, seen_ptx: set) -> Result:
    card = CARDS[card_key]
    result = Result(shipped.name, card_key if shipped.tp == 1 else f"{card_key} x{shipped.tp}")
    start = time.perf_counter()
    try:
        mesh = topology_mesh(card, shipped.tp)
        e = shipped.engine
        pages_per_seq = -(-e.max_model_len // e.page_size)
        largest = step_buckets(e.max_num_batched_tokens, e.max_num_seqs)[-1]
        # Under TP the memory analysis is one device's, and so is everything below (its KV heads).
        peak = compile_bucket(shipped, mesh, pages_per_seq, *largest).memory_analysis()
        if shipped.backend != "pallas":  # the decode bucket takes the other variants (M <= 16, the split)
            compile_bucket(shipped, mesh, pages_per_seq, *step_buckets(e.max_num_batched_tokens, e.max_num_seqs)[0])
        device_model = dataclasses.replace(shipped.model, num_kv_heads=tensor_parallel.cache_kv_heads(
            shipped.model, shipped.tp))
        page_bytes = kv_cache_bytes_per_page(device_model, e.page_size, jnp.bfloat16)
        cache_bytes = 2 * (page_bytes // 2) * pages_per_seq
        inputs = peak.argument_size_in_bytes - cache_bytes  # weights + the batch's arrays
        budget = int(util * card.memory) - inputs - peak.temp_size_in_bytes - peak.output_size_in_bytes
        num_pages = max(budget // page_bytes, 0)
        result.weights_gib, result.temp_gib = inputs / GIB, peak.temp_size_in_bytes / GIB
        result.kv_tokens = num_pages * e.page_size
        total = inputs + num_pages * page_bytes + peak.temp_size_in_bytes + peak.output_size_in_bytes
        result.total_gib = total / GIB
        result.fits = num_pages >= pages_per_seq and total <= util * card.memory
        if not result.fits:
            result.error = f"does not fit: {budget / GIB:.1f} GiB left for the KV cache"
        files = new_ptx_files(seen_ptx)
        result.kernels = {**kernel_reports([f for f in files if f.endswith(".ptx") and MOSAIC_DUMP_DIR not in f],
                                           card.arch), **mosaic_reports(files)}
        weights = inputs  # the batch's arrays are a few KB next to the weights
        rates = []
        for batch in (1, 64):  # under TP each card reads its share at once (all-reduces not counted)
            num_bytes, flops = decode_cost(shipped, weights * shipped.tp, batch)
            rates.append(batch / max(num_bytes / shipped.tp / card.bandwidth, flops / shipped.tp / card.bf16_flops))
        result.tok_s = tuple(rates)
        result.usd_per_m = tuple(shipped.tp * SEED_PRICE_PER_HOUR / (r * 3600) * 1e6 for r in rates)
    except Exception as err:  # noqa: BLE001 - report every configuration, then fail
        result.error = f"compile FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    finally:
        result.compile_s = time.perf_counter() - start
    return result


def table(results: list[Result], util: float) -> str:
    lines = [
        f"| configuration | card | weights GiB | step temporaries GiB | KV tokens at util {util} | total GiB | fits "
        "| decode tok/s roofline b=1 / b=64 | $ per 1M tokens b=1 / b=64 | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error and not r.weights_gib:
            lines.append(f"| {r.config} | {r.card} | {r.error} | | | | no | | | {r.compile_s:.0f} |")
            continue
        rates = " / ".join(f"{x:,.0f}" for x in r.tok_s) or "-"
        usd = " / ".join(f"{x:.3f}" for x in r.usd_per_m) or "-"
        lines.append(f"| {r.config} | {r.card} | {r.weights_gib:.2f} | {r.temp_gib:.2f} | {r.kv_tokens:,} | "
                     f"{r.total_gib:.1f} | {'yes' if r.fits else 'NO: ' + r.error} | {rates} | {usd} | "
                     f"{r.compile_s:.0f} |")
    lines += ["", "| configuration | card | kernel | registers | static smem B | spill B |", "|---|---|---|---|---|---|"]
    for r in results:
        for name, (regs, smem, spills) in sorted(r.kernels.items()):
            lines.append(f"| {r.config} | {r.card} | {name} | {regs} | {smem} | {spills} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--util", type=float, default=0.9, help="--gpu-memory-utilization (default 0.9)")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 (or the first configuration) on H100 only")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these configurations (by name)")
    parser.add_argument("--cards", nargs="+", choices=["H100", "A100"],
                        help="only these cards (default: each configuration's own)")
    args = parser.parse_args()
    print(f"jax {jax.__version__}; compile-only devices from jax.experimental.topologies; "
          f"decode roofline at {CONTEXT} tokens of context per sequence", flush=True)
    configurations = shipped_configurations()
    if args.quick:
        configurations = [dataclasses.replace(configurations[0], cards=("H100",))]
    if args.only:
        configurations = [c for c in configurations if c.name in args.only]
        if not configurations:
            parser.error(f"--only: no configuration named {args.only}")
    if args.cards:
        configurations = [dataclasses.replace(c, cards=tuple(card for card in c.cards if card in args.cards))
                          for c in configurations]
    results, seen_ptx, programs = [], set(), {}
    for shipped in configurations:
        for card in shipped.cards:
            # Two configurations of the same model, formats, limits and backend (a checkpoint format the
            # loader reads as one already listed) are one program: compiled once, listed under both.
            key = repr((shipped.model, sorted(shipped.formats.items()), shipped.head_format, shipped.engine,
                        shipped.tp, shipped.backend, card))
            same = programs.get(key)
            r = (dataclasses.replace(same, config=shipped.name, compile_s=0.0) if same
                 else check(shipped, card, args.util, seen_ptx))
            programs.setdefault(key, r)
            status = r.error or f"fits ({r.total_gib:.1f} GiB, {r.kv_tokens:,} KV tokens)"
            compiled = f"the program of {same.config}" if same else f"{r.compile_s:.0f} s"
            print(f"{shipped.name} on {card}: {status}; kernels {r.kernels}; {compiled}", flush=True)
            results.append(r)
    text = table(results, args.util)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    failures = [r for r in results if not r.fits or any(s for _, _, s in r.kernels.values())]
    for r in failures:
        print(f"FAIL: {r.config} on {r.card}: {r.error or 'spills in ' + str(r.kernels)}")
    print(f"\n{len(failures)} failure(s)" if failures else f"\nall {len(results)} configurations compiled and fit")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
