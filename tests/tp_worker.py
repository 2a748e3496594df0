"""Runs engines at several tensor-parallel sizes in a process of its own, with 4 forced host CPU
devices (the test session has one): `python tests/tp_worker.py '<json>'` prints one JSON line.

Input: a list of jobs (one process for all: each process start imports JAX again), each
{"model": a name or "random:<config json fields>", "prompts": [str or [token ids]], "max_tokens": n,
"runs": [{"tp": n, ...LLM keyword arguments}]}. Output: per job, per run either {"tokens": [[ids] per
prompt], "logprobs": [[floats] per prompt], "top": [[{id: logprob} of the 3 best per step] per prompt],
"formats": [the weights' format names]} or {"error": "Type: message"}.
"""

import json
import os
import sys
import tempfile

if __name__ == "__main__":  # not when a test module imports write_random_llama: its process keeps one device
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402


def write_random_llama(path: str, fields: dict, seed: int = 0) -> str:
    """An HF Llama directory (config.json, safetensors, tokenizer.json) with random weights drawn
    for unit-variance outputs, norms near one and, with attention_bias, nonzero q/k/v biases; with
    `"model_type": "qwen3"` in `fields` a Qwen3 (its q/k norms too; `head_dim` may be given)."""
    from safetensors.numpy import save_file
    from test_architectures_vs_hf import BASE, write_tokenizer_json

    cfg = dict(BASE, model_type="llama") | fields
    cfg["architectures"] = ["Qwen3ForCausalLM" if cfg["model_type"] == "qwen3" else "LlamaForCausalLM"]
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, inter, vocab = cfg.get("head_dim", hidden // heads), cfg["intermediate_size"], cfg["vocab_size"]
    rng = np.random.default_rng(seed)

    def matrix(out_features, in_features):  # HF's [out, in]
        return (rng.standard_normal((out_features, in_features)) * in_features ** -0.5).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
               "model.norm.weight": (1 + 0.2 * rng.standard_normal(hidden)).astype(np.float32),
               "lm_head.weight": matrix(vocab, hidden)}
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
              "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for name, shape in shapes.items():
            tensors[prefix + name + ".weight"] = matrix(*shape)
            if cfg.get("attention_bias") and name[-6:] in ("q_proj", "k_proj", "v_proj"):
                tensors[prefix + name + ".bias"] = (0.5 * rng.standard_normal(shape[0])).astype(np.float32)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[prefix + norm + ".weight"] = (1 + 0.2 * rng.standard_normal(hidden)).astype(np.float32)
        if cfg["model_type"] == "qwen3":
            for norm in ("self_attn.q_norm", "self_attn.k_norm"):
                tensors[prefix + norm + ".weight"] = (1 + 0.2 * rng.standard_normal(head_dim)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_tokenizer_json(__import__("pathlib").Path(path))
    return path


def main(spec: dict) -> list[dict]:
    from jaxinfer import LLM, SamplingParams

    model = spec["model"]
    tmp = tempfile.TemporaryDirectory()
    if model.startswith("random:"):
        model = write_random_llama(tmp.name, json.loads(model[len("random:"):]))
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, logprobs=3, ignore_eos=True)
    results = []
    for run in spec["runs"]:
        options = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, warmup=False,
                       weight_cache_dir=None) | {k: v for k, v in run.items() if k != "tp"}
        try:
            llm = LLM(model, tensor_parallel_size=run["tp"], **options)
        except Exception as e:  # noqa: BLE001 - the test checks which error a start-up gives
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        outs = llm.generate(spec["prompts"], params, use_tqdm=False)
        results.append({"tokens": [o.outputs[0].token_ids for o in outs],
                        "logprobs": [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs],
                        "top": [[dict(step.top) for step in o.outputs[0].logprobs] for o in outs],
                        "vocab_parallel": llm.engine.runner.vocab_parallel,
                        "formats": sorted(llm.engine.weight_bytes_by_format)})
        del llm
    return results


if __name__ == "__main__":
    print(json.dumps([main(job) for job in json.loads(sys.argv[1])]))
