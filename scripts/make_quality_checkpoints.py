"""Writes SmolLM2-135M as full-precision and 4-bit Hugging Face checkpoints, quantized by the
libraries that define the formats with calibration on real text, for the quality table of
docs/QUANTIZATION.md (benchmarks/quantized_quality.py measures them with jaxinfer).

    .venv-quant/bin/python scripts/make_quality_checkpoints.py GGUF OUT [--only NAME ...]

GGUF is the bundled SmolLM2 file (`python -c "from jaxinfer.weights import resolve_model_path;
print(resolve_model_path('SmolLM2-135M-Instruct'))"`); .venv-quant is the side venv of
scripts/make_quantized_fixtures.py, plus `pip install gguf` (transformers reads the GGUF through it).

The only SmolLM2 here is that Q4_1 file, so "full precision" is the file dequantized (float32).
At groups of 32 the file's own grid is what round-to-nearest int4 finds again (its blocks are 32
wide), so calibration has nothing to recover there; at groups of 64 a group spans two of the
file's blocks and round-to-nearest loses about a third of the perplexity: the table is at g64.
Calibration: 64 sequences of 256 tokens of Python's pydoc_data.topics, taken after its first
100,000 characters (the perplexity text is the first 4,096 tokens: disjoint).

Checkpoints (OUT/NAME):
- float: the dequantized file, float32 (the baseline; also our round-to-nearest's input);
- ct-rtn-w4a16-g64: compressed-tensors, min-max scales, no calibration (the library's round to nearest);
- llmc-gptq-w4a16-g64: llm-compressor's oneshot GPTQModifier, asymmetric, saved compressed;
- gptq-g64-actorder: gptqmodel GPTQ v1, symmetric, desc_act;
- awq-gemm-g64: gptqmodel AWQ, GEMM layout with zero points.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import pydoc_data.topics
import torch
import transformers

GROUP = 64
NUM_SAMPLES, SEQ_LEN, SKIP_CHARS = 64, 256, 100_000


def calibration_ids(tokenizer) -> torch.Tensor:
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[SKIP_CHARS:]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < NUM_SAMPLES * SEQ_LEN:
        raise SystemExit(f"calibration text too short: {len(ids)} tokens")
    return torch.tensor(ids[:NUM_SAMPLES * SEQ_LEN]).reshape(NUM_SAMPLES, SEQ_LEN)


def save_float(gguf: str, path: str):
    directory, name = os.path.split(gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config  # transformers marks a GGUF-loaded model unserializable: a plain copy of it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if tokenizer.pad_token is None:  # the quantizers' loaders want one
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def compressed_tensors_rtn(base: str, path: str):
    """compressed-tensors' own quantizer on each projection: min-max scales and zero points
    (`calculate_qparams`, what llm-compressor's observer computes for weights), packed; as
    scripts/make_quantized_fixtures.py makes its compressed-tensors fixtures."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=GROUP, symmetric=False)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], format="pack-quantized",
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
                w = module.weight.float()
                groups = w.reshape(w.shape[0], -1, GROUP)
                scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)


def llmcompressor_gptq(base: str, path: str, tokenizer, ids):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": GROUP, "symmetric": False}
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=SEQ_LEN,
            num_calibration_samples=NUM_SAMPLES)
    model.save_pretrained(path, save_compressed=True)


def gptqmodel_quantize(base: str, path: str, ids, method: str, **quant_kwargs):
    from gptqmodel import GPTQModel, QuantizeConfig

    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp())  # gptqmodel writes logs/ into the working directory
    try:
        calibration = [{"input_ids": row[None], "attention_mask": torch.ones(1, SEQ_LEN, dtype=torch.long)}
                       for row in ids]
        model = GPTQModel.load(base, QuantizeConfig(quant_method=method, bits=4, group_size=GROUP, **quant_kwargs),
                               device="cpu")
        model.quantize(calibration, batch_size=1)
        model.save(path)
    finally:
        os.chdir(cwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("out")
    parser.add_argument("--only", nargs="+")
    args = parser.parse_args()
    base = os.path.join(args.out, "float")
    if not os.path.exists(os.path.join(base, "config.json")):
        print("float: dequantizing the GGUF file", flush=True)
        save_float(args.gguf, base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    ids = calibration_ids(tokenizer)
    makers = {
        "ct-rtn-w4a16-g64": lambda p: compressed_tensors_rtn(base, p),
        "llmc-gptq-w4a16-g64": lambda p: llmcompressor_gptq(base, p, tokenizer, ids),
        "gptq-g64-actorder": lambda p: gptqmodel_quantize(base, p, ids, "gptq", sym=True, desc_act=True),
        "awq-gemm-g64": lambda p: gptqmodel_quantize(base, p, ids, "awq", sym=False, format="gemm"),
    }
    failed = []
    for name, make in makers.items():
        if args.only and name not in args.only:
            continue
        path = os.path.join(args.out, name)
        shutil.rmtree(path, ignore_errors=True)
        print(f"{name}: quantizing", flush=True)
        try:
            make(path)
            tokenizer.save_pretrained(path)
        except Exception:  # noqa: BLE001 - say which library failed and go on with the others
            traceback.print_exc()
            failed.append(name)
            shutil.rmtree(path, ignore_errors=True)
    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "compressed_tensors", "llmcompressor", "gptqmodel"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as e:  # noqa: BLE001
            versions[package] = f"not available ({type(e).__name__})"
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump({"versions": versions, "failed": failed, "group_size": GROUP,
                   "calibration": f"{NUM_SAMPLES} x {SEQ_LEN} tokens of pydoc_data.topics after {SKIP_CHARS} chars"},
                  f, indent=2)
    print(f"versions {versions}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
