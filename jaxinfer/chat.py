"""`jaxinfer chat`: a terminal chat, like `ollama run`, on the offline engine in this process or on a
running server (`--url`, the OpenAI chat completions API, streamed).

The conversation is kept and sent whole each turn, rendered by the model's chat template. Ctrl-C
while an answer streams stops that answer (the engine request is aborted, so its KV pages are
freed; over HTTP the stream is closed) and drops the turn; a second Ctrl-C leaves. Ctrl-C or
Ctrl-D at the prompt leaves.
"""

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

from jaxinfer.weights import DEFAULT_MODEL

PROMPT = ">>> "
HELP = "/reset clears the conversation, /system TEXT sets the system prompt (and resets), /exit or Ctrl-D leaves"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer chat", description="Chat with a model in the terminal: on the "
                                "offline engine in this process, or on a running server with --url.")
    p.add_argument("--model", help=f"a model name (`jaxinfer list`), a GGUF file or an HF directory (default: {DEFAULT_MODEL}); "
                   "with --url the served name (default: the server's first model)")
    p.add_argument("--url", help="a running jaxinfer (or any OpenAI-compatible) server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                   help="the server's API key, with --url (default: $JAXINFER_API_KEY)")
    p.add_argument("--system", help="the system prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, help="(default: 0.9)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest answer in tokens (default: up to the context length)")
    engine = p.add_argument_group("offline engine")
    engine.add_argument("--max-model-len", type=int, default=2048, help="context length in tokens (default: 2048)")
    engine.add_argument("--quantization", help="weight format, as `jaxinfer serve --quantization` (default: auto)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV pages of the conversation so far (default: on)")
    engine.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="compile every step shape before the first prompt (default: on)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log level (default: warning)")
    return p


class EngineChat:
    """Answers on an LLMEngine stepped here: the deltas of one request at a time."""

    def __init__(self, engine):
        self.engine = engine

    def stream(self, messages: list[dict], params: dict, stopped: Callable[[], bool]) -> Iterator[str]:
        from jaxinfer.sampling import SamplingParams

        engine = self.engine
        request_id = engine.add_request(engine.tokenizer.encode_chat(messages), SamplingParams(**params))
        try:
            while not stopped():
                for out in engine.step(deltas_only=True):
                    if out.request_id == request_id:
                        yield out.outputs[0].delta
                        if out.finished:
                            return
        finally:
            engine.abort_request(request_id)  # stopped (or failed): its KV pages go back now


class ServerChat:
    """Answers from a server's /v1/chat/completions, streamed."""

    def __init__(self, url: str, api_key: str | None, model: str | None):
        try:
            import openai
        except ImportError as e:  # the client is an extra: the offline chat needs nothing more
            raise SystemExit("jaxinfer chat --url needs the openai client: pip install 'jaxinfer[client]'") from e

        base = url.rstrip("/")
        self.client = openai.OpenAI(base_url=base if base.endswith("/v1") else f"{base}/v1",
                                    api_key=api_key or "unused", max_retries=0)
        self.model = model or self.client.models.list().data[0].id

    def stream(self, messages: list[dict], params: dict, stopped: Callable[[], bool]) -> Iterator[str]:
        with self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                 **params) as chunks:  # leaving the block closes the stream
            for chunk in chunks:
                if stopped():
                    return
                if chunk.choices:
                    yield chunk.choices[0].delta.content or ""


@contextlib.contextmanager
def ctrl_c_stops():
    """While an answer streams, the first Ctrl-C only sets a flag (the stream checks it between
    tokens, so the engine is never interrupted mid-step); a second one raises KeyboardInterrupt."""
    pressed = []

    def on_sigint(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def converse(chat, params: dict, system: str | None, out=sys.stdout) -> int:
    """The read-answer loop; returns the exit status."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    start = lambda: [{"role": "system", "content": system}] if system else []  # noqa: E731
    messages = start()
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/bye"):
            return 0
        if line == "/reset":
            messages = start()
            out.write("(conversation cleared)\n")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip() or None
            messages = start()
            out.write(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(HELP + "\n")
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        with ctrl_c_stops() as stopped:
            try:
                for delta in chat.stream(messages, params, stopped):
                    answer.append(delta)
                    out.write(delta)
                    out.flush()
            except Exception as e:  # a prompt past the context, a server error: this turn only
                messages.pop()
                out.write(f"\nerror: {e}\n\n")
                continue
            if stopped():
                messages.pop()  # the turn did not happen
                out.write("\n(stopped)\n\n")
                continue
        messages.append({"role": "assistant", "content": "".join(answer)})
        out.write("\n\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxinfer.cli import configure_logging

    configure_logging(args.log_level)
    params = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    try:
        if args.url:
            import openai

            print(f"connecting to {args.url} (/help for commands)", flush=True)
            try:
                chat = ServerChat(args.url, args.api_key, args.model)
            except openai.APIError as e:
                print(f"error: {args.url}: {e}", file=sys.stderr)
                return 1
        else:
            from jaxinfer.compilation import enable_compilation_cache
            from jaxinfer.engine import LLMEngine

            model = args.model or DEFAULT_MODEL
            print(f"loading {model} on the offline engine (/help for commands)", flush=True)
            enable_compilation_cache()  # the process is ours: later starts load the step programs
            overrides = {"quantization": args.quantization} if args.quantization else {}
            # One conversation: one sequence at a time, so the KV cache holds one context.
            chat = EngineChat(LLMEngine(model, max_model_len=args.max_model_len, max_num_seqs=1,
                                        enable_prefix_caching=args.enable_prefix_caching, warmup=args.warmup,
                                        **overrides))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        return converse(chat, params, args.system)
    except KeyboardInterrupt:  # a second Ctrl-C during an answer
        print()
        return 130
