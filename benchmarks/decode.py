"""Batch-1 decode speed beside its memory roofline and beside llama.cpp on the same file.

    .venv/bin/python benchmarks/decode.py --model qwen2.5-coder-0.5b-instruct \
        [--quantization auto native int8 none] [--llama-bench DIR] [--llama-cpp-python /path/to/python]

Decode at batch 1 reads every weight once per token, so its ceiling is (bytes read per token) /
(memory read bandwidth). Bytes per token: each projection's and the LM head's bytes as the engine
holds them, plus one embedding row (measured from the loaded model's arrays, not the file). The
bandwidth is measured here, now: a NumPy reduction over 1 GiB split over as many threads as the
engine uses, the best of 5. llama.cpp runs the same GGUF as `llama-bench -p 0 -n TOKENS` (its own
decode loop: the fair peer; DIR holds its build, as for benchmarks/compare.py) and/or through
llama-cpp-python's token loop (`n_threads` = our thread count), each in a subprocess; the order of
the configurations alternates round by round (ABBA) so drift in the machine's speed hits all alike.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfer import LLM, SamplingParams  # noqa: E402
from jaxinfer.weights import resolve_model_path  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import cpu_name, git_commit, llama_version  # noqa: E402  (benchmarks/compare.py: the same llama.cpp build)

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LLAMA_CPP_DECODE = r"""
import json, sys, time
import llama_cpp
path, n_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
prompt = llm.tokenize(sys.argv[4].encode())
for _ in range(2):  # the first run warms up
    llm.reset()
    start = time.perf_counter()
    first = None
    count = 0
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == n_tokens:
            break
    end = time.perf_counter()
print(json.dumps({"version": llama_cpp.__version__, "tokens_per_s": (count - 1) / (end - first)}))
"""


def read_bandwidth(threads: int, size: int = 1 << 30) -> float:
    """Bytes/s of a streaming read by `threads` threads at once (as the kernels read), the best of 5.
    NumPy's sum releases the GIL; a sum over int64 keeps the CPU's work per byte small."""
    parts = np.array_split(np.ones(size // 8, dtype=np.int64), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return size / best


def bytes_per_token(llm) -> int:
    """Weight bytes one decode step reads: every projection and the LM head whole, one embedding row."""
    model = llm.engine.model
    total = 0
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        linear = getattr(model.layers, proj)
        for name in ("w", "scales", "mins", "b"):
            param = getattr(linear, name, None)
            if param is not None:
                total += param[...].nbytes
    head = model.lm_head
    if head is not None:
        if hasattr(head, "w"):
            total += sum(getattr(head, n)[...].nbytes for n in ("w", "scales", "mins") if getattr(head, n, None) is not None)
        else:
            total += head[...].nbytes
    if model.embed is not None:  # a tied head is read whole above; else the row gathered
        total += model.embed[...].nbytes // model.embed[...].shape[0]
    if head is None:  # full-precision tied embedding: the head is the embedding, read whole
        total += model.embed[...].nbytes
    return total


def gguf_bytes_per_token(path: str) -> int:
    """Bytes of the GGUF's tensors one decode step reads: all of them, but one row of the embedding
    table when the file has its own output matrix (a tied head reads the table whole)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embed = tensors.get("token_embd.weight")
    if embed is not None and "output.weight" in tensors:
        total -= int(embed.n_bytes) - int(embed.n_bytes) // int(embed.shape[-1])
    return total


def ours(llm, n_tokens: int) -> float:
    """Decode tokens/s at batch 1, after the first token (prefill excluded)."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm
    engine = llm.engine
    request_id = engine.add_request(PROMPT, params)
    first = None
    count = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                count = len(out.outputs[0].token_ids)
                if first is None and count:
                    first, first_count = time.perf_counter(), count
    return (count - first_count) / (time.perf_counter() - first)


def llama_cpp(python: str, path: str, n_tokens: int, threads: int) -> dict:
    done = subprocess.run([python, "-c", LLAMA_CPP_DECODE, path, str(n_tokens), str(threads), PROMPT],
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_bench(directory: str, path: str, n_tokens: int, threads: int) -> dict:
    binary = os.path.join(directory, "llama-bench")
    command = [binary, "-m", path, "-t", str(threads), "-p", "0", "-n", str(n_tokens), "-r", "1", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-3:]}
    return {"version": llama_version(binary), "command": " ".join(command),
            "tokens_per_s": json.loads(done.stdout)[0]["avg_ts"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--quantization", nargs="+", default=["auto", "int8"])
    parser.add_argument("--quantization-group-size", type=int, choices=[32, 64, 128],
                        help="rows per scale of int4 (AWQ's and GPTQ's are 128)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-bench", metavar="DIR", help="folder with llama.cpp's llama-bench")
    parser.add_argument("--llama-cpp-python", help="a Python with llama_cpp installed (llama-cpp-python)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    threads = len(os.sched_getaffinity(0))
    bandwidth = read_bandwidth(threads)
    engines = {q: LLM(args.model, quantization=q, quantization_group_size=args.quantization_group_size,
                      max_model_len=512, max_num_seqs=1, max_num_batched_tokens=64)
               for q in args.quantization}
    peers = {}  # label -> runs one measurement: {"version", "tokens_per_s"} or {"error"}
    if args.llama_bench:
        peers["llama-bench"] = lambda: llama_bench(args.llama_bench, path, args.tokens, threads)
    if args.llama_cpp_python:
        peers["llama-cpp-python"] = lambda: llama_cpp(args.llama_cpp_python, path, args.tokens, threads)
    runs = {q: (lambda llm=llm: {"tokens_per_s": ours(llm, args.tokens)}) for q, llm in engines.items()} | peers
    speeds, versions, commands = {name: [] for name in runs}, {}, {}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            result = runs[name]()
            if "error" in result:
                raise SystemExit(f"{name} failed: {result['error']}")
            versions[name] = result.get("version")
            commands[name] = result.get("command")
            speeds[name].append(result["tokens_per_s"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in speeds.items()),
              flush=True)
    print(f"# {args.model} ({os.path.getsize(path) / 1e6:.0f} MB file), batch-1 decode of {args.tokens} tokens, "
          f"{threads} threads, {cpu_name()}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| configuration | weight bytes per token | roofline tok/s | measured tok/s (median) | of roofline |")
    print("|---|---|---|---|---|")
    rows = []
    for name, values in speeds.items():
        measured = float(np.median(values))
        if name in engines:
            nbytes = bytes_per_token(engines[name])
            group = f" g{args.quantization_group_size}" if args.quantization_group_size and name.startswith("int4") else ""
            label = f"jaxinfer {name}{group} (weights {engines[name].engine.quantization})"
        else:
            nbytes = gguf_bytes_per_token(path)
            how = "its own decode loop" if name == "llama-bench" else f"{name}'s token loop"
            label = f"llama.cpp {versions[name]}, {how} (the file's blocks as stored)"
        roofline = bandwidth / nbytes
        rows.append({"configuration": label, "bytes_per_token": nbytes, "roofline": roofline, "measured": measured,
                     "all": values, "command": commands.get(name)})
        print(f"| {label} | {nbytes / 1e6:.0f} MB | {roofline:.0f} | {measured:.1f} | {measured / roofline:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "file": os.path.basename(path), "threads": threads, "cpu": cpu_name(),
                       "commit": git_commit(), "tokens": args.tokens, "rounds": args.rounds, "bandwidth": bandwidth,
                       "rows": rows,
                       "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main()
