"""How close greedy text stays to full precision: our configurations, and llama.cpp on the same file.

    .venv/bin/python benchmarks/fidelity.py --llama-cpp-python /path/to/python-with-llama_cpp

The prompts are tests/test_fidelity.py's 18 (10 plain, 8 chat), tokenized by HF transformers; the
reference is HF transformers (torch, float32) on the same GGUF file, dequantized (tests/hf_reference.py,
the `.venv-ref` that `make test` builds). For each configuration: how many prompts give the same 32
greedy tokens, and where each first departs (a coarse count: one flipped near tie ends a prompt's run);
and, for ours, the steadier teacher-forced agreement tests/test_fidelity.py bounds: at how many of
HF's greedy tokens, given HF's own context, the configuration's best token is HF's. llama.cpp runs through llama-cpp-python (its default
CPU path: the file's blocks, activations quantized for the integer dot products, f16 KV cache)
given the same token ids, in the interpreter named by --llama-cpp-python (it is not a dependency).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "default": {},
    "int8 per channel, int8 activations (the default before)": dict(quantization="int8", lm_head_quantization="int8"),
    "int8 per channel, float activations": dict(quantization="int8", cpu_integer_matmul=False),
    "none (full precision)": dict(quantization="none"),
}

LLAMA_CPP_GREEDY = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts_file, n, eos = sys.argv[1], sys.argv[2], int(sys.argv[3]), set(json.loads(sys.argv[4]))
outs = []
for prompt in json.load(open(prompts_file)):
    # A fresh context per prompt: reset() alone left earlier prompts' KV entries visible here.
    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False)
    llm.eval(prompt)
    tokens = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        if token in eos:
            break
        llm.eval([token])
    outs.append(tokens)
    llm.close()
import llama_cpp
print(json.dumps({"version": llama_cpp.__version__, "outputs": outs}))
"""


def first_divergence(ours, ref, n):
    """Where `ours` first departs from `ref`; n where they are identical (both may end early, at EOS)."""
    if list(ours) == list(ref):
        return n
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))


def teacher_forced_agreement(llm, prompts, reference) -> int:
    """At how many of the reference's tokens, given the prompt and the reference's tokens before it,
    `llm`'s model (with its own KV cache dtype) ranks the reference's token first."""
    from jaxinfer.evaluate import top_tokens

    seqs = [p + r for p, r in zip(prompts, reference)]
    n = max(map(len, seqs))
    top = top_tokens(llm.engine.model, [s + [0] * (n - len(s)) for s in seqs], 1,  # padded at the end
                     cache_dtype=llm.engine.kv_cache_dtype)
    return sum(int((top[i, len(p) - 1:len(p) - 1 + len(r), 0] == np.asarray(r)).sum())
               for i, (p, r) in enumerate(zip(prompts, reference)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llama-cpp-python", help="a Python interpreter with llama-cpp-python installed")
    args = parser.parse_args()

    from jaxinfer import LLM, SamplingParams
    from jaxinfer.weights import resolve_model_path
    from tests.hf_reference import HFReference
    from tests.test_fidelity import CHATS, PLAIN

    path = resolve_model_path(args.model)
    reference = HFReference()
    tokenizer = reference.load_tokenizer_gguf(path)
    prompts = [tokenizer.encode(p) for p in PLAIN]
    prompts += [list(map(int, tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))) for c in CHATS]
    hf = reference.load_gguf(path).greedy(prompts, args.new_tokens)
    reference.close()

    results, agreement = {}, {}
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    for name, overrides in CONFIGS.items():
        llm = LLM(args.model, max_model_len=1024, max_num_seqs=18, max_num_batched_tokens=512, warmup=False,
                  **overrides)
        label = f"{name} [{llm.engine.quantization}, head {llm.engine.lm_head_quantization}]"
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        eos_ids = list(llm.engine.model_config.eos_token_ids)
        results[label] = [first_divergence(o, r, args.new_tokens) for o, r in zip(outs, hf)]
        agreement[label] = teacher_forced_agreement(llm, prompts, hf)
        del llm
    if args.llama_cpp_python:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompts, f)
        eos = json.dumps(eos_ids)
        done = subprocess.run([args.llama_cpp_python, "-c", LLAMA_CPP_GREEDY, path, f.name, str(args.new_tokens), eos],
                              capture_output=True, text=True, check=True)
        os.unlink(f.name)
        llama = json.loads(done.stdout.strip().splitlines()[-1])
        results[f"llama.cpp (llama-cpp-python {llama['version']}, the file's blocks)"] = [
            first_divergence(o, r, args.new_tokens) for o, r in zip(llama["outputs"], hf)]
    n = args.new_tokens
    print(f"{len(prompts)} prompts, {n} greedy tokens, against HF transformers float32 on {os.path.basename(path)}")
    for label, divergences in results.items():
        identical = sum(d == n for d in divergences)
        forced = f"; teacher-forced {agreement[label]}/{sum(map(len, hf))}" if label in agreement else ""
        print(f"{identical:2d}/{len(prompts)} identical{forced}; first departures {divergences}  {label}")


if __name__ == "__main__":
    main()
