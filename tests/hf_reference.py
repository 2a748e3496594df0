"""HF transformers (torch, CPU, float32) as the tests' model reference, in a side process.

The engine runs on Python 3.12+ (jax 0.12); torch's CPU wheel on these machines is for Python
3.11 only, and on 3.12 pip would take a 2.7 GB CUDA build. So the reference lives in its own venv,
`.venv-ref` (Python 3.11, torch CPU, transformers; `make test` builds it), and runs
`tests/hf_worker.py` there. This is the real library on the real checkpoint: only the arrays cross
the process boundary. `JAXINFER_REF_PYTHON` points at another interpreter.
"""

import os
import pickle
import struct
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_python() -> str:
    return os.environ.get("JAXINFER_REF_PYTHON") or os.path.join(ROOT, ".venv-ref", "bin", "python")


class HFReferenceError(RuntimeError):
    """The reference process failed; the message holds its traceback."""


class HFReference:
    """One worker process; each method is a request to it."""

    def __init__(self):
        python = reference_python()
        if not os.path.exists(python):
            raise FileNotFoundError(
                f"the HF reference interpreter {python} is missing: `make test` builds .venv-ref "
                "(Python 3.11 with torch and transformers), or set JAXINFER_REF_PYTHON")
        env = dict(os.environ, OMP_NUM_THREADS="2", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
        self._proc = subprocess.Popen([python, os.path.join(ROOT, "tests", "hf_worker.py")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def call(self, name, *args):
        data = pickle.dumps((name, *args), protocol=5)
        self._proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self._proc.stdin.flush()
        header = self._proc.stdout.read(8)
        if len(header) < 8:
            raise HFReferenceError(f"the HF reference process exited (code {self._proc.poll()}); see stderr")
        status, result = pickle.loads(self._proc.stdout.read(struct.unpack("<Q", header)[0]))
        if status != "ok":
            raise HFReferenceError(result)
        return result

    def load_gguf(self, path) -> "HFModel":
        return HFModel(self, self.call("load_gguf", path))

    def load_tokenizer_gguf(self, path) -> "HFTokenizer":
        return HFTokenizer(self, self.call("load_tokenizer_gguf", path))

    def build_random(self, model_type: str, config: dict, seed: int, path) -> "HFModel":
        """A transformers model of `config` with random weights, also saved to `path` (config.json +
        safetensors) for the engine to load."""
        return HFModel(self, self.call("build_random", model_type, config, seed, str(path)))

    def load_dir(self, path) -> "HFModel":
        return HFModel(self, self.call("load_dir", path))

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class HFModel:
    """A transformers model held by the reference process."""

    def __init__(self, reference: HFReference, handle: int):
        self.reference, self.handle = reference, handle

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """transformers' `generate(do_sample=False)`: the new token ids of each prompt."""
        return self.reference.call("greedy", self.handle, prompts, max_new_tokens)

    def last_logits(self, prompts: list[list[int]]):
        """[len(prompts), vocab] float32 numpy array of each prompt's last-position logits."""
        return self.reference.call("last_logits", self.handle, prompts)

    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[tuple]:
        """Per prompt, over its tokens but the first (log-softmax of the logits before each, in
        float64): (logprob, tokens more likely by over 1e-3, tokens more likely by over -1e-3, top-k
        ids, top-k logprobs), numpy arrays."""
        return self.reference.call("prompt_logprobs", self.handle, prompts, k)

    def save_pretrained(self, path: str) -> str:
        """The model as a plain HF directory (config.json + sharded safetensors)."""
        return self.reference.call("save_pretrained", self.handle, str(path))


class HFTokenizer:
    """A transformers tokenizer held by the reference process (transformers' GGUF reader needs torch)."""

    def __init__(self, reference: HFReference, handle: int):
        self.reference, self.handle = reference, handle

    def _call(self, method, *args, **kwargs):
        return self.reference.call("tokenizer_call", self.handle, method, args, kwargs)

    def encode(self, text: str) -> list[int]:
        return self._call("encode", text)

    def apply_chat_template(self, conversation, **kwargs):
        return self._call("apply_chat_template", conversation, **kwargs)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._call("convert_ids_to_tokens", ids)

    def save_pretrained(self, path: str) -> None:
        self._call("save_pretrained", str(path))
