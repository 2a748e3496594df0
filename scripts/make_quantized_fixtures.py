"""Writes tests/data/quantized/: a tiny random Llama saved in the production checkpoint formats, by
the libraries that define them, with each library's own dequantization of the projections beside it.

Run with the side venv (Python 3.11, torch CPU, compressed-tensors, gptqmodel):
    .venv-quant/bin/python scripts/make_quantized_fixtures.py [--only NAME ...]
The venv, as made for the committed fixtures (tests/data/quantized/VERSIONS.txt has the versions):
    python3.11 -m venv .venv-quant
    .venv-quant/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl compressed-tensors transformers
    # gptqmodel 7.7 asks for torch>=2.14.1 (a CUDA build here): install it without its dependencies
    # (no CUDA code is built: BUILD_CUDA_EXT=0), then those, with torch pinned; it runs on torch 2.13 CPU.
    BUILD_CUDA_EXT=0 .venv-quant/bin/pip install gptqmodel --no-deps --no-build-isolation
    .venv-quant/bin/pip install -c <(echo torch==2.13.0+cpu) accelerate datasets defuser device-smi dill \
        logbar pypcre threadpoolctl tokenicer pillow protobuf pyarrow requests torchao
    # last, for the llmc-* fixture: llmcompressor 0.14.0.1 pins compressed-tensors 0.19.0 and
    # transformers 5.17.0 (the other fixtures were made before, with 0.20.1 and 5.24.0: VERSIONS.txt)
    .venv-quant/bin/pip install -c <(echo torch==2.13.0+cpu) llmcompressor
    # the ct018-* fixture (act-order groups, weight_g_idx, gone from compressed-tensors 0.19): its own venv
    python3.11 -m venv .venv-ct18
    .venv-ct18/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl compressed-tensors==0.18.0 transformers
    .venv-ct18/bin/python scripts/make_quantized_fixtures.py --only ct018-w4a16-g32-asym-actorder

Each fixture directory holds the checkpoint as the library saved it (config.json with its
`quantization_config`, safetensors) plus tokenizer.json, and `reference/dequantized.safetensors`: every
quantized projection's weight [out, in] as the library dequantizes it, in the dtype it does so. The
tests load the checkpoint with jaxinfer and compare with that, and run HF transformers on the
reference weights.

Formats, and which code writes them:
- compressed-tensors (`ModelCompressor.compress_model`, the path llm-compressor saves through):
  pack-quantized W4A16 group 32, symmetric and asymmetric (and, with compressed-tensors 0.18, with
  act-order groups: `weight_g_idx` of a random column order); pack-quantized W8A16 per channel;
  float-quantized FP8 per channel, per tensor, and 128x128 blocks. The scales come from
  compressed-tensors' own `calculate_qparams` on each weight's min/max (what llm-compressor's
  min-max observer computes for weights; no calibration data is needed for round-to-nearest).
- fp8 (quant_method "fp8", DeepSeek/Qwen FP8): `weight` float8_e4m3fn and `weight_scale_inv`
  per 128x128 block, written here with torch ops the way transformers' FineGrainedFP8 quantizer
  computes them (no library on PyPI writes this format on a CPU).
- gptq / awq: gptqmodel's GPTQ (act-order included, 4 and 8 bits) and AWQ GEMM quantizers on random
  token data.
- llm-compressor's `oneshot` with its GPTQModifier (W4A16 asymmetric group 32, actorder "weight";
  "group", which stored weight_g_idx, is gone from compressed-tensors 0.19), saved compressed.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default on a 2-core machine is 1, below its loader pool

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "quantized")
DTYPE = torch.bfloat16
CONFIG = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def base_model(seed=0):
    """The tiny Llama, weights drawn like a trained model's scale (std 0.02, norms near 1)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(config).to(DTYPE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:  # a few outliers per row, as real weights have, so groups differ in range
                w = 0.02 * torch.randn_like(p, dtype=torch.float32)
                w = torch.where(torch.rand_like(w) < 0.01, 4 * w, w)
                p.copy_(w)
    return model


def write_tokenizer(path):
    """A byte-level BPE over the 256 byte symbols and 64 merges (the engine needs one to start)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [(a, b) for a in "etaoinsh" for b in "etaoinsh"]
    vocab = {t: i for i, t in enumerate(symbols + [a + b for a, b in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(os.path.join(path, "tokenizer.json"))


def pad_blocks(w, block):
    """[n, k] -> [ceil(n / bn), bn, ceil(k / bk), bk], zero-padded (a zero changes no block's max |w|)."""
    bn, bk = block
    n, k = w.shape
    w = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
    return w.reshape(w.shape[0] // bn, bn, w.shape[1] // bk, bk)


def projection_names(num_layers):
    return [f"model.layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS]


# --- compressed-tensors --------------------------------------------------------------------------

def compressed_tensors_fixture(path, weights_args, fmt, input_args=None):
    """Quantizes the projections' weights (round to nearest, min-max scales) and saves the model
    through compressed-tensors' compressor; the reference is its `decompress_model`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = base_model()
    scheme = QuantizationScheme(targets=["Linear"], weights=weights_args, input_activations=input_args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=fmt,
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    args = weights_args
    with torch.no_grad():
        for name in projection_names(CONFIG["num_hidden_layers"]):
            module = model.get_submodule(name)
            w = module.weight.float()  # [out, in]
            n, k = w.shape
            if args.strategy == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            elif args.strategy == "group" and args.actorder == "group":
                # act-order groups (compressed-tensors < 0.19): GPTQ's g_idx of a random column order,
                # g_idx[order[i]] = i // group_size; each group's range over its own columns
                order = torch.randperm(k, generator=torch.Generator().manual_seed(len(name)))
                g_idx = torch.empty(k, dtype=torch.int32)
                g_idx[order] = torch.arange(k, dtype=torch.int32) // args.group_size
                module.weight_g_idx.copy_(g_idx)
                g = w[:, order].reshape(n, k // args.group_size, args.group_size)
                lo, hi = g.amin(-1), g.amax(-1)
            elif args.strategy == "group":
                g = w.reshape(n, k // args.group_size, args.group_size)
                lo, hi = g.amin(-1), g.amax(-1)
            elif args.strategy == "tensor":
                lo, hi = w.amin().reshape(1), w.amax().reshape(1)
            else:  # block
                b = pad_blocks(w, args.block_structure)  # a partial last block of rows: k_proj's 64
                lo, hi = b.amin((1, 3)), b.amax((1, 3))
            scale, zero_point = calculate_qparams(lo, hi, args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    compressor.decompress_model(model)
    return {f"{name}.weight": model.get_submodule(name).weight.detach().contiguous()  # the scales' dtype
            for name in projection_names(CONFIG["num_hidden_layers"])}


def ct_args(**kwargs):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(**kwargs)


# --- llm-compressor (GPTQ with act-order groups, saved as compressed-tensors) -------------------------

def llmcompressor_fixture(path, weights):
    """llm-compressor's `oneshot` GPTQ on random calibration tokens, saved compressed (the path the
    issue's user took); the reference is transformers loading it decompressed (run_compressed=False)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    base = tempfile.mkdtemp()
    base_model().save_pretrained(base)  # oneshot reads the config back from the model's directory
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=DTYPE)
    torch.manual_seed(1)
    tokens = torch.randint(0, CONFIG["vocab_size"], (16, 64))
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    tokenizer_dir = tempfile.mkdtemp()
    write_tokenizer(tokenizer_dir)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
                                                     pad_token="!")  # oneshot wants a processor
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=64,
            num_calibration_samples=16)
    model.save_pretrained(path, save_compressed=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPE, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False))
    return {f"{name}.weight": loaded.get_submodule(name).weight.detach().contiguous()
            for name in projection_names(CONFIG["num_hidden_layers"])}


# --- fp8 (DeepSeek / Qwen FP8 block-wise) ----------------------------------------------------------

def fp8_block_fixture(path, block=(128, 128)):
    """weight float8_e4m3fn [out, in], weight_scale_inv float32 [out / 128, in / 128]: w = q * s per
    block, s = the block's max |w| / 448 (transformers' FP8Linear quantizer). The reference is
    transformers' own dequantization when it runs on this CPU, else the same product in torch."""
    model = base_model()
    state = {k: v for k, v in model.state_dict().items()}
    reference = {}
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for name in projection_names(CONFIG["num_hidden_layers"]):
        w = state.pop(f"{name}.weight").float()
        n, k = w.shape
        blocks = pad_blocks(w, block)  # [ceil(n / 128), 128, ceil(k / 128), 128]
        scale = blocks.abs().amax((1, 3)) / fp8_max
        q = (blocks / scale[:, None, :, None]).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        deq = q.float() * scale[:, None, :, None]
        q, deq = (x.reshape(blocks.shape[0] * block[0], -1)[:n, :k] for x in (q, deq))
        state[f"{name}.weight"] = q.contiguous()
        state[f"{name}.weight_scale_inv"] = scale.float()
        reference[f"{name}.weight"] = deq.to(DTYPE)
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    try:  # transformers' own dequantization (its FP8 quantizer with dequantize=True)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPE, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
        hf = {f"{name}.weight": loaded.get_submodule(name).weight.detach().to(DTYPE)
              for name in projection_names(CONFIG["num_hidden_layers"])}
        print(f"  fp8 reference: transformers' FineGrainedFP8 dequantization "
              f"(max diff to torch product {max((hf[k].float() - reference[k].float()).abs().max().item() for k in hf)})")
        reference = hf
    except Exception as e:  # noqa: BLE001
        print(f"  fp8 reference: transformers could not dequantize here ({type(e).__name__}: {e}); torch product used")
    return reference


# --- GPTQ / AWQ (gptqmodel) -------------------------------------------------------------------------

def gptqmodel_fixture(path, method, **quant_kwargs):
    """Quantizes the saved base model with gptqmodel on random calibration tokens; the reference is
    the dequantized weight of each of gptqmodel's quantized linear modules (`dequantize_weight`)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    os.chdir(tempfile.mkdtemp())  # gptqmodel writes logs/ into the working directory

    base = path + "-base"
    model = base_model()
    model.save_pretrained(base)
    write_tokenizer(base)
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:  # gptqmodel's loader wants a pad token
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "!", "eos_token": "!"}, f)
    torch.manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, CONFIG["vocab_size"], (1, 64)),
                    "attention_mask": torch.ones(1, 64, dtype=torch.long)} for _ in range(16)]
    qconfig = QuantizeConfig(quant_method=method, **quant_kwargs)
    gmodel = GPTQModel.load(base, qconfig, device="cpu")
    gmodel.quantize(calibration, batch_size=1)
    gmodel.save(path)
    shutil.rmtree(base)
    # GPTQ stores float16 scales: dequantize in float16 (else gptqmodel casts them to the model's bf16 first)
    loaded = GPTQModel.load(path, device="cpu", **({"dtype": torch.float16} if method == "gptq" else {}))
    reference = {}
    for name in projection_names(CONFIG["num_hidden_layers"]):
        module = loaded.model.get_submodule(name)
        w = module.dequantize_weight().T  # gptqmodel's is [in, out]
        reference[f"{name}.weight"] = w.detach().contiguous()  # its own dtype (float16 scales): no second rounding
    return reference


def fixtures():
    return {
        "ct-w4a16-g32-sym": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=4, type="int", strategy="group", group_size=32, symmetric=True), "pack-quantized"),
        "ct-w4a16-g32-asym": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=4, type="int", strategy="group", group_size=32, symmetric=False), "pack-quantized"),
        # needs compressed-tensors < 0.19 (.venv-ct18: 0.18.0), which still writes weight_g_idx
        "ct018-w4a16-g32-asym-actorder": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=4, type="int", strategy="group", group_size=32, symmetric=False, actorder="group"),
            "pack-quantized"),
        "ct-w8a16-channel": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=8, type="int", strategy="channel", symmetric=True), "pack-quantized"),
        "ct-w4a16-channel-asym": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=4, type="int", strategy="channel", symmetric=False), "pack-quantized"),
        # INT8_W8A8's scheme (dynamic per-token int8 activations): the weights are what the engine uses
        "ct-w8a8-int-quantized": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=8, type="int", strategy="channel", symmetric=True), "int-quantized", ct_args(
            num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)),
        "ct-fp8-channel": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=8, type="float", strategy="channel", symmetric=True), "float-quantized"),
        "ct-fp8-tensor": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=8, type="float", strategy="tensor", symmetric=True), "float-quantized"),
        "ct-fp8-block": lambda p: compressed_tensors_fixture(p, ct_args(
            num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True),
            "float-quantized"),
        "fp8-block": fp8_block_fixture,
        "gptq-g32-sym": lambda p: gptqmodel_fixture(p, "gptq", bits=4, group_size=32, sym=True, desc_act=False),
        "gptq-g32-actorder": lambda p: gptqmodel_fixture(p, "gptq", bits=4, group_size=32, sym=False,
                                                         desc_act=True),
        "gptq-8bit-g32": lambda p: gptqmodel_fixture(p, "gptq", bits=8, group_size=32, sym=True, desc_act=False),
        "llmc-gptq-w4a16-g32-asym": lambda p: llmcompressor_fixture(p, dict(
            num_bits=4, type="int", strategy="group", group_size=32, symmetric=False, actorder="weight")),
        "awq-gemm-g32": lambda p: gptqmodel_fixture(p, "awq", bits=4, group_size=32, sym=False,
                                                    format="gemm"),
    }


def versions():
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("compressed_tensors", "llmcompressor", "gptqmodel", "safetensors"):
        try:
            out[package] = __import__(package).__version__
        except Exception as e:  # noqa: BLE001
            out[package] = f"not available ({type(e).__name__})"
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    found = versions()
    print("library versions:", json.dumps(found))
    made, failed = [], {}
    for name, make in fixtures().items():
        if args.only and name not in args.only:
            continue
        path = os.path.join(OUT, name)
        shutil.rmtree(path, ignore_errors=True)
        print(f"{name} ...", flush=True)
        try:
            reference = make(path)
        except Exception as e:  # noqa: BLE001 - report and go on: one library's failure is not the others'
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            shutil.rmtree(path, ignore_errors=True)
            continue
        os.makedirs(os.path.join(path, "reference"))  # not beside model.safetensors: a loader would list it
        save_file(reference, os.path.join(path, "reference", "dequantized.safetensors"))
        write_tokenizer(path)
        made.append(name)
    with open(os.path.join(OUT, "VERSIONS.txt"), "a" if args.only else "w") as f:
        f.write(f"# written by scripts/make_quantized_fixtures.py {' '.join(sys.argv[1:])}\n")
        for key, value in found.items():
            f.write(f"{key}=={value}\n")
        f.write(f"made: {', '.join(made)}\n")
        for name, error in failed.items():
            f.write(f"failed: {name}: {error}\n")
    print("made:", made)
    print("failed:", json.dumps(failed, indent=1))


if __name__ == "__main__":
    main()
