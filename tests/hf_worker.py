"""The HF transformers reference, run in its own Python 3.11 venv (.venv-ref: torch's CPU wheel is
for 3.11 only). `tests/hf_reference.py` starts it and sends it requests.

Protocol: length-prefixed pickles on the original stdout/stdin, one reply per request:
`(name, *args)` -> `("ok", result)` or `("error", traceback text)`. Everything the libraries
print goes to stderr, so it cannot corrupt a reply. Models are held by a handle (an int).
"""

import functools
import os
import pickle
import struct
import sys
import traceback

_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints go to stderr
_in = os.fdopen(sys.stdin.fileno(), "rb")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

torch.set_num_threads(2)
_models = {}

# transformers parses a GGUF file's metadata anew for the tokenizer, the config and the weights (three
# `GGUFReader`s a model; 11 s each for Qwen2.5's 151,936-token vocabulary, 15 s for Gemma 3's, on
# these cores). The parse of an unchanged file is kept and handed out again: the reader is only read
# (its fields and its tensors' memory map), so what transformers builds from it is the same.
_GGUFReader = gguf.GGUFReader


@functools.lru_cache(maxsize=4)
def _parsed_gguf(path, mtime_ns, size):
    return _GGUFReader(path)


def _gguf_reader(path, mode="r"):
    if mode != "r":
        return _GGUFReader(path, mode)
    stat = os.stat(path)
    return _parsed_gguf(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


gguf.GGUFReader = _gguf_reader  # transformers imports it from gguf inside each call


def load_gguf(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return _keep(model)


def load_dir(path):
    return _keep(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


def build_random(model_type, config, seed, path):
    """A model of `config` (a config.json dict) with random weights drawn from `seed`, saved to `path`
    as safetensors; its handle. Every parameter is redrawn, so a loader that drops one (a bias, a norm's
    scale) shows: biases are nonzero, norm scales are not ones, matrices have unit-variance outputs."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.save_pretrained(path, safe_serialization=True)
    return _keep(model)


def _keep(model):
    handle = len(_models)
    _models[handle] = model.eval()
    return handle


def greedy(handle, prompts, max_new_tokens):
    """Greedy continuations ([new token ids] per prompt), one prompt at a time."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            out = _models[handle].generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)
            outs.append(out[0, len(p):].tolist())
    return outs


def last_logits(handle, prompts):
    """[len(prompts), vocab] float32: each prompt's last-position logits."""
    with torch.no_grad():
        return np.stack([_models[handle](torch.tensor([p])).logits[0, -1].numpy() for p in prompts])


def prompt_logprobs(handle, prompts, k):
    """Per prompt, over its tokens but the first: (logprob [P-1], the number of tokens strictly more
    likely [P-1], of those within 1e-3 above it [P-1], top-k ids [P-1, k], top-k logprobs [P-1, k])."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            logprobs = torch.log_softmax(_models[handle](torch.tensor([p])).logits[0, :-1].double(), dim=-1)
            chosen = logprobs.gather(1, torch.tensor(p[1:])[:, None])
            top = torch.topk(logprobs, k, dim=-1)
            outs.append((chosen[:, 0].numpy(), (logprobs > chosen + 1e-3).sum(-1).numpy(),
                         (logprobs > chosen - 1e-3).sum(-1).numpy(), top.indices.numpy(), top.values.numpy()))
    return outs


def save_pretrained(handle, path, max_shard_size="200MB"):
    """Writes the model as a plain HF safetensors directory (config + weights)."""
    import copy

    model = _models[handle]
    # A GGUF-loaded model refuses save_pretrained (its config says "quantized with gguf"): copy its
    # dequantized weights into a plain model of the same config first.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    return path


_tokenizers = {}


def load_tokenizer_gguf(path):
    from transformers import AutoTokenizer

    handle = len(_tokenizers)
    _tokenizers[handle] = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return handle


def tokenizer_call(handle, method, args, kwargs):
    """A method of a transformers tokenizer: encode and apply_chat_template give text or token ids;
    save_pretrained writes files and gives nothing back; convert_ids_to_tokens gives strings."""
    result = getattr(_tokenizers[handle], method)(*args, **kwargs)
    if method == "save_pretrained" or isinstance(result, str):
        return None if method == "save_pretrained" else result
    if method == "convert_ids_to_tokens":
        return [str(t) for t in result]
    return [int(t) for t in result]


def versions():
    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__),
            "python": sys.version.split()[0]}


COMMANDS = {f.__name__: f for f in (load_gguf, load_dir, build_random, greedy, last_logits, prompt_logprobs,
                                    save_pretrained, load_tokenizer_gguf, tokenizer_call, versions)}


def main():
    while True:
        header = _in.read(8)
        if len(header) < 8:
            return
        name, *args = pickle.loads(_in.read(struct.unpack("<Q", header)[0]))
        try:
            reply = ("ok", COMMANDS[name](*args))
        except Exception:  # noqa: BLE001 - the caller raises it
            reply = ("error", traceback.format_exc())
        data = pickle.dumps(reply, protocol=5)
        _out.write(struct.pack("<Q", len(data)) + data)
        _out.flush()


if __name__ == "__main__":
    main()
