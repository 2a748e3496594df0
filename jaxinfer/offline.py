"""The offline API, vLLM's `LLM`: generate and chat over an LLMEngine, prompts in vLLM's forms."""

import jax
from tqdm.auto import tqdm

from jaxinfer.engine import LLMEngine, RequestOutput
from jaxinfer.sampling import SamplingParams
from jaxinfer.weights import DEFAULT_MODEL


def normalize_prompts(prompts) -> list[str | list[int]]:
    """vLLM's prompt forms as a list of texts and token-id lists; a wrong form is a ValueError that
    names it."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a str, a list of token ids, a prompt dict, or a list of these; "
                         f"got {type(prompts).__name__}")
    return [_one_prompt(p, i) for i, p in enumerate(prompts)]


def _one_prompt(prompt, index: int) -> str | list[int]:
    where = f"prompt {index}"
    if isinstance(prompt, dict):
        keys = set(prompt)
        if keys == {"prompt"}:
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: 'prompt' must be a str, got {type(prompt).__name__}")
            return prompt
        if keys == {"prompt_token_ids"}:
            prompt = prompt["prompt_token_ids"]
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
                raise ValueError(f"{where}: 'prompt_token_ids' must be a list of ints")
            return list(prompt)
        raise ValueError(f"{where}: a prompt dict takes exactly one of 'prompt' or 'prompt_token_ids' "
                         f"(vLLM's TextPrompt / TokensPrompt), got keys {sorted(keys)}")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError(f"{where}: a prompt is a str, a list of token ids, or a dict with 'prompt' or "
                     f"'prompt_token_ids'; got {type(prompt).__name__}")


class LLM:
    """Offline generation: `LLM("SmolLM2-135M-Instruct").generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_args):
        if jax.process_count() > 1:  # no process would follow this one's steps
            raise ValueError("LLM runs in one process; several hosts serve together with `jaxinfer serve --nnodes "
                             "N --node-rank R --dist-init-addr HOST:PORT` (docs/DEPLOY.md)")
        self.engine = LLMEngine(model, **engine_args)
        self.tokenizer = self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what `generate` and `chat` use without sampling_params, the model's own defaults
        (`generation_config`, `jaxinfer.generation_config`) over `SamplingParams`' own."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts, in vLLM's forms: a string, a list of token ids, {"prompt": str},
        {"prompt_token_ids": [...]}, or a list of any of these."""
        prompts = normalize_prompts(prompts)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        ids, results = [], {}
        try:
            for prompt, params in zip(prompts, sampling_params):
                ids.append(self.engine.add_request(prompt, params))
            with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, leave=False) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        finally:
            for request_id in ids:
                self.engine.abort_request(request_id)
        return [results[i] for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             **template_kwargs) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=True, **template_kwargs)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
