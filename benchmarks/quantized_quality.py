"""Perplexity of the checkpoints scripts/make_quality_checkpoints.py writes (AWQ, GPTQ, llm-compressor
and compressed-tensors 4-bit SmolLM2-135M at groups of 64), each loaded by jaxinfer in its own format,
beside jaxinfer's round-to-nearest int4 of the same full-precision weights at the same group size:
what calibration buys. The table of docs/QUANTIZATION.md.

    .venv/bin/python benchmarks/quantized_quality.py ~/.cache/jaxinfer/quality [--json F]

Every row: float32 activations and a full-precision LM head (only the projections' weights differ),
`jaxinfer.evaluate.perplexity` over the first 4,096 tokens of pydoc_data.topics (16 windows of 256,
as tests/test_quant.py); the calibration text of the quantized checkpoints is disjoint from it.
"""

import argparse
import gc
import json
import os
import sys
import time

import pydoc_data.topics

from jaxinfer import LLM
from jaxinfer.evaluate import perplexity, token_windows

WINDOW, NUM_WINDOWS, GROUP = 256, 16, 64
ROWS = [  # (label, directory under the root, LLM options)
    ("full precision (the Q4_1 file dequantized)", "float", {"quantization": "none"}),
    ("jaxinfer round-to-nearest int4 g64, with a min", "float", {"quantization": "int4", "quantization_group_size": GROUP}),
    ("jaxinfer round-to-nearest int4 g64, symmetric", "float",
     {"quantization": "int4_sym", "quantization_group_size": GROUP}),
    ("compressed-tensors round-to-nearest W4A16 g64 (no calibration)", "ct-rtn-w4a16-g64", {"quantization": "auto"}),
    ("llm-compressor GPTQ W4A16 g64, asymmetric (compressed-tensors)", "llmc-gptq-w4a16-g64", {"quantization": "auto"}),
    ("gptqmodel GPTQ 4-bit g64, symmetric, act-order", "gptq-g64-actorder", {"quantization": "auto"}),
    ("gptqmodel AWQ GEMM 4-bit g64", "awq-gemm-g64", {"quantization": "auto"}),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="scripts/make_quality_checkpoints.py's output directory")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    windows, rows, baseline = None, [], None
    for label, name, options in ROWS:
        path = os.path.join(args.root, name)
        if not os.path.exists(os.path.join(path, "config.json")):
            print(f"{label}: {path} missing (the quantizer failed or was not run): skipped", flush=True)
            continue
        start = time.perf_counter()
        llm = LLM(path, max_model_len=WINDOW, max_num_seqs=4, num_pages=64, warmup=False, weight_cache_dir=None,
                  lm_head_quantization="none", cpu_integer_matmul=False, **options)
        if windows is None:
            windows = token_windows(llm.tokenizer.encode(text), WINDOW, NUM_WINDOWS)
        ppl = perplexity(llm.engine.model, windows, cache_dtype=llm.engine.kv_cache_dtype)
        formats = ", ".join(sorted(f"{k} {v / 1e6:.1f} MB" for k, v in llm.engine.weight_bytes_by_format.items()))
        baseline = baseline or ppl
        rows.append({"label": label, "checkpoint": name, "options": options, "perplexity": ppl,
                     "vs_full_precision": ppl / baseline - 1, "weights": formats})
        print(f"{label}: perplexity {ppl:.4f} ({ppl / baseline - 1:+.2%}); weights {formats}; "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        del llm
        gc.collect()
    print(f"\nperplexity over {windows.size} tokens of pydoc_data.topics ({NUM_WINDOWS} windows of {WINDOW})")
    print("| weights | perplexity | vs full precision | jaxinfer's formats |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['perplexity']:.4f} | {r['vs_full_precision']:+.2%} | {r['weights']} |")
    if args.json:
        versions = os.path.join(args.root, "versions.json")
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "quantizers": json.load(open(versions)) if os.path.exists(versions) else None},
                      f, indent=2)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
