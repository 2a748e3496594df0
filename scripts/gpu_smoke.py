"""The GPU smoke run: kernels against their references, the engine's step on the GPU against the
same model on this machine's CPU, and prefill/decode speed beside the card's memory roofline.

No checkpoint travels to a lent GPU machine (even SmolLM2's file is 98 MB), so the models are
random-weight Llama-3-8B-width models with a few layers, in bf16, int8 and int4 (group 128),
initialised so that the logits are peaked (the LM head scaled so logits have a spread of about 8):
the greedy tokens are then a meaningful comparison. Every phase writes its own JSON file to OUTDIR.
`scripts/gpu_smoke.sh OUTDIR` runs each phase under a time cap. `--dry-run` runs the same code on
the CPU at toy sizes, the Pallas kernels interpreted (the CI test of this script).

Phases (`--phase`): env, kernels, mosaic, engine, speed, then engine-gguf and speed-gguf (the same
two on a model in a Q4_K_M file's formats: a phase of its own, so that its time cap cannot cost the
others their results).
"""

import argparse
import importlib.metadata
import dataclasses
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxinfer import quant  # noqa: E402
from jaxinfer.kv_cache import kv_cache_bytes_per_page  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.models.llama import PROJECTIONS, AttentionMetadata, Llama  # noqa: E402
from jaxinfer.runner import empty_batch, jit_step  # noqa: E402
from kernels_pallas import paged_attention as pa  # noqa: E402
from kernels_pallas import quant_matmul as qmm  # noqa: E402
from kernels_pallas import quant_matmul_mgpu as qmm_mgpu  # noqa: E402

# Data-sheet memory bandwidth by device kind, bytes/s (H200: 4.8 TB/s; measured copies reach ~4.3).
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.039e12}
LOGIT_SPREAD = 8.0  # standard deviation of the random model's logits


def model_config(dry_run: bool) -> ModelConfig:
    if dry_run:
        return ModelConfig(architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
                           rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False)
    # Llama-3-8B's width and heads, 4 layers, a 32k vocabulary.
    return ModelConfig(architecture="llama", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_layers=4, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)


FORMATS = {"bf16": None, "int8": quant.weight_format("int8"), "int4-g128": quant.weight_format("int4", 128)}
GGUF_FORMATS = {  # a Q4_K_M file's formats on a GPU (`weights.gguf.group_format`, Qwen2.5-Coder-0.5B's pattern):
           # Q5_0 projections int5, attn_v (Q8_0 and Q5_0 layers) int8 g32, ffn_down (Q4_K and Q6_K) int6 g16
    "q4_k_m-like": {**dict.fromkeys(PROJECTIONS, quant.WeightFormat("int5", 32)), "v_proj": quant.WeightFormat("int8", 32),
                    "down_proj": quant.WeightFormat("int6", 16, symmetric=False)}}


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Full-precision float32 weights (numpy) in the model's parameter layout."""
    rng = np.random.default_rng(seed)
    c = config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q_dim), "k_proj": (c.hidden_size, kv_dim), "v_proj": (c.hidden_size, kv_dim),
              "o_proj": (q_dim, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    normal = lambda shape, scale: (rng.standard_normal(shape, np.float32) * scale).astype(np.float32)  # noqa: E731
    layers = {name: {"w": normal((c.num_layers, *shape), shape[0] ** -0.5)} for name, shape in shapes.items()}
    layers["input_norm"] = np.ones((c.num_layers, c.hidden_size), np.float32)
    layers["post_attention_norm"] = np.ones((c.num_layers, c.hidden_size), np.float32)
    return {"embed": normal((c.vocab_size, c.hidden_size), 1.0), "norm": np.ones(c.hidden_size, np.float32),
            "lm_head": normal((c.vocab_size, c.hidden_size), LOGIT_SPREAD * c.hidden_size ** -0.5), "layers": layers}


def build_model(config, params, fmt, *, dtype, backend, device):
    """The model with `params`, its projections in `fmt` (None: full precision; a dict: by projection),
    on `device`."""
    formats = fmt if isinstance(fmt, dict) else {p: fmt for p in PROJECTIONS} if fmt is not None else {}
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, attention_backend=backend, formats=formats,
                                         quant_backend=backend))
    graphdef, state = nnx.split(model)
    values = {"embed": params["embed"], "norm": params["norm"], "lm_head": params["lm_head"], "layers": {}}
    for name, value in params["layers"].items():
        if name in formats:
            qw = jax.vmap(lambda w: quant.quantize(w, formats[name]))(jnp.asarray(value["w"]))
            values["layers"][name] = {"w": qw.data, "scales": qw.scales}
            if qw.mins is not None:
                values["layers"][name]["mins"] = qw.mins
        else:
            values["layers"][name] = value
    pure = nnx.to_pure_dict(state)
    cast = jax.tree.map(lambda target, v: jax.device_put(jnp.asarray(v, target.dtype), device), pure,
                        _like(pure, values))
    nnx.replace_by_pure_dict(state, cast)
    return graphdef, state


def _like(template, values):
    """`values` restricted to the keys of `template` (a nested dict)."""
    if isinstance(template, dict):
        return {k: _like(v, values[k]) for k, v in template.items()}
    return values


def paged_batch(prompt_lens, config, page_size, decode=False):
    """Numpy step inputs for sequences laid out in consecutive pages: either whole prompts
    (prefill) or one decode token per sequence at position prompt_len."""
    num_seqs = len(prompt_lens)
    pages_per_seq = -(-(max(prompt_lens) + 1) // page_size)
    q_lens = [1] * num_seqs if decode else list(prompt_lens)
    num_tokens = sum(q_lens)
    positions, slots, starts = [], [], [0]
    for s, (n, q) in enumerate(zip(prompt_lens, q_lens)):
        pos = np.arange(n, n + 1) if decode else np.arange(n)
        positions.append(pos)
        slots.append(s * pages_per_seq * page_size + pos)
        starts.append(starts[-1] + q)
    tables = np.arange(num_seqs * pages_per_seq, dtype=np.int32).reshape(num_seqs, pages_per_seq)
    seq_lens = np.array([n + 1 if decode else n for n in prompt_lens], np.int32)
    meta = AttentionMetadata(np.concatenate(slots).astype(np.int32), np.array(starts, np.int32), seq_lens, tables,
                             np.array(starts[1:], np.int32) - 1)
    return np.concatenate(positions).astype(np.int32), meta, num_tokens, num_seqs * pages_per_seq


def phase_env(args):
    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
            "python": platform.python_version(), "devices": [str(d) for d in devices],
            "device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "memory_stats": {k: v for k, v in (devices[0].memory_stats() or {}).items() if "bytes" in k}}


def phase_kernels(args):
    """Each Pallas kernel on the device against its jax.numpy reference on random inputs."""
    interpret = args.dry_run
    rng = np.random.default_rng(0)
    results = []
    for num_heads, num_kv, head_dim, page_size, window in ((32, 8, 128, 16, None), (8, 8, 64, 32, None),
                                                           (4, 1, 256, 16, 64)):
        pages, layers = 128, 2
        k_cache = jnp.asarray(rng.standard_normal((layers, num_kv, pages, page_size, head_dim)), jnp.bfloat16)
        v_cache = jnp.asarray(rng.standard_normal((layers, num_kv, pages, page_size, head_dim)), jnp.bfloat16)
        q_lens, kv_lens = [1, 1, 37, 5], [300, 17, 100, 5]
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        tables = rng.permutation(pages)[:4 * 32].reshape(4, 32).astype(np.int32)  # 32 pages: 512+ keys
        q = jnp.asarray(rng.standard_normal((int(qsl[-1]), num_heads, head_dim)), jnp.bfloat16)
        call = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
        a = (q, k_cache, v_cache, jnp.int32(1), jnp.asarray(qsl), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(tables))
        ref = pa.ragged_paged_attention_reference(*a, **call)
        out = pa.ragged_paged_attention(*a, **call, interpret=interpret)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        results.append({"kernel": "ragged_paged_attention", "heads": [num_heads, num_kv, head_dim],
                        "page_size": page_size, "sliding_window": window, "max_abs_err": err, "ok": err < 5e-2})
    for fmt, m in (("int8", 1), ("int8", 64), ("int4-g128", 1), ("int4-g128", 64), ("fp8", 16), ("int5-g32", 1),
                   ("int6-g16-min", 16)):
        k, n = (256, 128) if args.dry_run else (4096, 4096)
        w = jnp.asarray(rng.standard_normal((k, n)) * k ** -0.5, jnp.float32)
        if fmt.startswith(("int5", "int6")):
            qw = high_bit_weight(rng, fmt[:4], int(fmt[6:8]), not fmt.endswith("min"), k, n)
        else:
            qw = quant.quantize(w, quant.weight_format(*(("int4", 128) if fmt.startswith("int4") else (fmt,))))
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        operands = (x, qw.data, qw.scales, qw.mins)
        formats = dict(fmt=qw.format, group_size=qw.group_size)
        ref = qmm.quant_matmul_reference(x.astype(jnp.float32), *operands[1:], **formats)
        out = qmm.quant_matmul(*operands, **formats, interpret=interpret).astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        results.append({"kernel": "quant_matmul", "format": fmt, "m": m, "k": k, "n": n, "rel_err": rel,
                        "ok": rel < 1e-2})
    return {"results": results, "all_ok": all(r["ok"] for r in results)}


def high_bit_weight(rng, fmt, group_size, symmetric, k, n):
    """int5/int6 (GGUF Q5_0/Q6_K codes as stored, `weights.gguf.group_format`): random codes and factors."""
    codes = rng.integers(0, 2 ** int(fmt[-1]), (k, n))
    scales = jnp.asarray(rng.uniform(0.5, 1.5, (k // group_size, n)) * k ** -0.5 / 16, jnp.float16)
    mins = None if symmetric else jnp.asarray(-rng.uniform(0.5, 1.5, (k // group_size, n)) * k ** -0.5, jnp.float16)
    return quant.QuantizedWeight(jnp.asarray(qmm.pack_high_bits(codes, fmt)), scales, mins, fmt, group_size)


def _time_us(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def phase_mosaic(args):
    """The Mosaic GPU matmul (Hopper only: `--matmul-backend mosaic_gpu`) against the reference, and its
    time beside the Triton kernel's and the memory roofline (bytes: W as stored, x, y)."""
    interpret = args.dry_run
    device = jax.devices()[0]
    bandwidth = next((bw for name, bw in BANDWIDTH.items() if name in device.device_kind), None)
    rng = np.random.default_rng(1)
    results = []
    cases = [("int8", 0, None, m) for m in (1, 16, 64, 512)]
    cases += [("int4", g, False, m) for g in (32, 128) for m in (1, 16, 512)] + [("int4", 128, True, 16)]
    cases += [("fp8", 0, None, m) for m in (16, 512)]
    cases += [("int5", 32, True, m) for m in (1, 512)] + [("int6", 16, False, m) for m in (16, 512)]
    for fmt, group_size, symmetric, m in cases:
        k, n = (256, 128) if args.dry_run else (4096, 4096)
        w = jnp.asarray(rng.standard_normal((k, n)) * k ** -0.5, jnp.float32)
        qw = {"int8": lambda: quant.quantize_int8(w), "fp8": lambda: quant.quantize_fp8(w),
              "int4": lambda: quant.quantize_int4(w, group_size=group_size, symmetric=symmetric),
              "int5": lambda: high_bit_weight(rng, "int5", group_size, symmetric, k, n),
              "int6": lambda: high_bit_weight(rng, "int6", group_size, symmetric, k, n)}[fmt]()
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        operands = (x, qw.data, qw.scales, qw.mins)
        formats = dict(fmt=qw.format, group_size=qw.group_size)
        blocks = qmm_mgpu.default_blocks(qw.format, qw.group_size, m, k, n, x.dtype)
        row = {"format": fmt, "group_size": group_size, "symmetric": symmetric, "m": m, "k": k, "n": n, **blocks}
        try:
            ref = qmm.quant_matmul_reference(*operands, **formats).astype(jnp.float32)
            mosaic = jax.jit(lambda *o: qmm_mgpu.quant_matmul(*o, **formats, **blocks, interpret=interpret))
            out = mosaic(*operands).astype(jnp.float32)
            row["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            row["ok"] = row["rel_err"] < 1e-2
            if not args.dry_run:
                triton = jax.jit(lambda *o: qmm.quant_matmul(*o, **formats))
                row["mosaic_us"] = _time_us(mosaic, *operands, repeats=20)
                row["triton_us"] = _time_us(triton, *operands, repeats=20)
                nbytes = sum(a.nbytes for a in jax.tree.leaves(operands)) + m * n * 2
                row["roofline_us"] = nbytes / bandwidth * 1e6 if bandwidth else None
        except Exception as e:  # noqa: BLE001 - record it, go on to the next case
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        results.append(row)
    return {"device_kind": device.device_kind, "results": results, "all_ok": all(r["ok"] for r in results)}


def phase_engine(args, formats=FORMATS):
    """The step program on the device (Pallas, bf16) against the same model on the CPU (XLA, float32):
    last-position logits of a prefill, then greedy decoding through the paged cache."""
    config = model_config(args.dry_run)
    params = random_params(config)
    cpu, device = jax.devices("cpu")[0], jax.devices()[0]
    backend = "pallas_interpret" if args.dry_run else "pallas"
    page_size, prompt_len, new_tokens = 16, (24 if args.dry_run else 128), (4 if args.dry_run else 16)
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, prompt_len).astype(np.int32)
    out = {"model": dataclasses.asdict(config), "prompt_len": prompt_len, "new_tokens": new_tokens, "formats": {}}
    for name, fmt in formats.items():
        runs = {}
        for where, dtype, kernels, dev in (("cpu", jnp.float32, "xla", cpu), ("device", jnp.bfloat16, backend, device)):
            graphdef, state = build_model(config, params, fmt, dtype=dtype, backend=kernels, device=dev)
            runs[where] = greedy_run(graphdef, state, config, prompt, new_tokens, page_size, dtype, dev)
        ref, got = runs["cpu"], runs["device"]
        spread = float(np.std(ref["logits"]))
        diff = float(np.max(np.abs(ref["logits"] - got["logits"])))
        same = sum(a == b for a, b in zip(ref["tokens"], got["tokens"]))
        out["formats"][name] = {"logits_max_abs_diff": diff, "logits_std": spread,
                                "within_tolerance": diff <= 0.2 * spread, "cpu_tokens": ref["tokens"],
                                "device_tokens": got["tokens"], "tokens_equal": same}
    out["tolerance"] = "max |logit difference| <= 0.2 x the logits' standard deviation (bf16 against float32)"
    return out


def greedy_run(graphdef, state, config, prompt, new_tokens, page_size, dtype, device):
    """Prefill, then `new_tokens` greedy decode steps, each through the paged cache."""
    step = jax.jit(lambda state, k, v, ids, pos, meta: nnx.merge(graphdef, state)(ids, pos, k, v, meta))
    pages = -(-(len(prompt) + new_tokens + 1) // page_size)
    shape = (config.num_layers, config.num_kv_heads, pages, page_size, config.head_dim)
    k_cache, v_cache = (jax.device_put(jnp.zeros(shape, dtype), device) for _ in range(2))
    positions, meta, _, _ = paged_batch([len(prompt)], config, page_size)
    logits, k_cache, v_cache = step(state, k_cache, v_cache, prompt, positions, meta)
    first = np.asarray(logits[0], np.float32)
    tokens = [int(np.argmax(first))]
    for i in range(new_tokens - 1):
        positions, meta, _, _ = paged_batch([len(prompt) + i], config, page_size, decode=True)
        logits, k_cache, v_cache = step(state, k_cache, v_cache, np.array(tokens[-1:], np.int32), positions, meta)
        tokens.append(int(np.argmax(np.asarray(logits[0]))))
    return {"logits": first, "tokens": tokens}


def phase_speed(args, formats=FORMATS):
    """The engine's step program (jit_step: model + sampling, cache donated) timed at prefill and
    decode shapes, beside the memory roofline of the bytes each step must read."""
    config = model_config(args.dry_run)
    params = random_params(config)
    device = jax.devices()[0]
    backend = "pallas_interpret" if args.dry_run else "pallas"
    kind = device.device_kind
    bandwidth = next((bw for name, bw in BANDWIDTH.items() if name in kind), None)
    page_size, context = 16, (32 if args.dry_run else 1024)
    rows = []
    for name, fmt in formats.items():
        graphdef, state = build_model(config, params, fmt, dtype=jnp.bfloat16, backend=backend, device=device)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        step = jit_step(graphdef)
        kv_token = kv_cache_bytes_per_page(config, page_size, jnp.bfloat16) // page_size
        for label, lens, decode in (("prefill 512", [8 if args.dry_run else 512], False),
                                    ("decode b=1", [context], True), ("decode b=64", [context] * 64, True)):
            if args.dry_run and label == "decode b=64":
                lens = [context] * 4
            positions, meta, num_tokens, num_pages = paged_batch(lens, config, page_size, decode=decode)
            shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
            k_cache, v_cache = (jax.device_put(jnp.zeros(shape, jnp.bfloat16), device) for _ in range(2))
            base = empty_batch(num_tokens, len(lens), meta.block_tables.shape[1], context + 1, config.vocab_size)
            batch = (np.zeros(num_tokens, np.int32), positions, meta, *base[3:])
            times = []
            for _ in range(2 if args.dry_run else 6):
                start = time.perf_counter()
                out, k_cache, v_cache = step(state, k_cache, v_cache, *batch)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - start)
            best = min(times[1:])
            tokens = num_tokens
            read = weight_bytes + sum(lens) * kv_token
            roofline = (read / bandwidth) if bandwidth else None
            rows.append({"format": name, "case": label, "tokens": tokens, "step_ms": best * 1e3,
                         "tok_s": tokens / best, "bytes_read": read,
                         "roofline_ms": None if roofline is None else roofline * 1e3,
                         "fraction_of_roofline": None if roofline is None else roofline / best})
    return {"device_kind": kind, "bandwidth": bandwidth, "context": context, "rows": rows,
            "model": dataclasses.asdict(config)}


PHASES = {"env": phase_env, "kernels": phase_kernels, "mosaic": phase_mosaic, "engine": phase_engine,
          "speed": phase_speed, "engine-gguf": functools.partial(phase_engine, formats=GGUF_FORMATS),
          "speed-gguf": functools.partial(phase_speed, formats=GGUF_FORMATS)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--phase", choices=list(PHASES), action="append",
                        help="run only these phases (default: all, in order)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, Pallas interpreted")
    args = parser.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    failed = False
    for name in args.phase or list(PHASES):
        start = time.perf_counter()
        try:
            result = PHASES[name](args)
        except Exception as e:  # noqa: BLE001 - record the failure, go on to the next phase
            result, failed = {"error": f"{type(e).__name__}: {e}"}, True
        result["seconds"] = time.perf_counter() - start
        with open(os.path.join(args.outdir, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
        print(f"{name}: {json.dumps(result, default=float)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
