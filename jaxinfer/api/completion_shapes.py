"""OpenAI's response shapes: completions and chat completions, whole and as streaming chunks, their
choices, logprobs and usage, and the model card of /v1/models (requests: jaxinfer/api/protocol.py)."""


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries, token_text, text_offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists over tokens. An echoed prompt's first token has
    no logprob (an entry whose logprob and top are None: null in both lists)."""
    tokens, offsets = [], []
    for entry in entries:
        tokens.append(token_text(entry.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {token_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def prompt_logprobs(entries, token_text) -> list:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, then {token id (a string): {logprob,
    rank, decoded_token}} for the prompt token and its most likely alternatives (ranks 1, 2, ...)."""
    def item(logprob, rank, token_id):
        return {"logprob": logprob, "rank": rank, "decoded_token": token_text(token_id)}

    shaped = []
    for entry in entries:
        if entry is None:
            shaped.append(None)
            continue
        own = str(entry.token_id)
        shaped.append({own: item(entry.logprob, entry.rank, entry.token_id),
                       **{str(t): item(lp, rank, t) for rank, (t, lp) in enumerate(entry.top, 1) if str(t) != own}})
    return shaped


def chat_logprobs(entries, token_text) -> dict:
    def item(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_response(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_choice(index: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_choice(index: int, message: dict, finish_reason, logprobs=None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def assistant_message(content: str | None, reasoning: str | None = None, tool_calls: list[dict] | None = None,
                      thinks: bool = False) -> dict:
    """An answer: `reasoning_content` (vLLM's) from a model that thinks, `tool_calls` when it made some."""
    message = {"role": "assistant", "content": content}
    if thinks:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def assistant_delta(content: str = "", reasoning: str = "", tool_calls: list[dict] | None = None) -> dict:
    delta = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return delta


def completion_chunk(request_id: str, created: int, model: str, choices: list[dict], usage_=None) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict], usage_=None) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk_choice(index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "jaxinfer", "root": name,
            "max_model_len": max_model_len}

