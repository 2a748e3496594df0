"""`jaxinfer chat`, driven through a pseudo-terminal as a person would: each streamed answer is the
greedy text `LLM.chat` gives offline for the same conversation (history included); `/reset`
forgets; Ctrl-C stops an answer and the prompt comes back; `/exit` leaves with status 0. With
`--url` the answer is the server's own greedy answer."""

import os
import pty
import select
import sys
import time

import pytest
from conftest import SMOLLM2
from helpers import CHAT, MAX_TOKENS, NAME

from jaxinfer.chat import PROMPT, EngineChat

MAX_CHAT_TOKENS = 24
# The chat's engine, and the reference's: the same shapes give the same greedy tokens.
ENGINE = dict(max_model_len=512, max_num_seqs=1, warmup=False)
CHAT_FLAGS = ("--max-model-len", "512", "--no-warmup")


# The child of pty.fork() execs at once: JAX's threads in this process cannot deadlock it.
pytestmark = pytest.mark.filterwarnings("ignore:.*fork:RuntimeWarning", "ignore:.*forkpty:DeprecationWarning")


class Terminal:
    """A process on a pseudo-terminal (its controlling terminal: b"\\x03" is Ctrl-C)."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child only execs (TERM=dumb: readline writes no escape sequences)
            os.execve(sys.executable, [sys.executable, "-m", "jaxinfer.cli", "chat", *args],
                      {**os.environ, "TERM": "dumb"})
        self.buffer = b""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """The text before `marker` (consumed with it), newlines as "\\n"."""
        marker = marker.encode()
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"no {marker!r} within {timeout} s; the terminal shows {self.buffer!r}")
            self.buffer += os.read(self.fd, 4096)
        before, self.buffer = self.buffer.split(marker, 1)
        return before.decode().replace("\r\n", "\n")

    def ask(self, line: str) -> str:
        """Sends a line; the answer printed before the next prompt (the echoed line left out)."""
        self.send(line + "\n")
        self.read_until(line + "\r\n")
        return self.read_until(PROMPT).strip()

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, 9)
        pytest.fail("the chat did not exit")


@pytest.fixture(scope="module")
def reference():
    from jaxinfer import LLM

    return LLM(SMOLLM2, **ENGINE)


def greedy_chat(llm, messages) -> str:
    """`LLM.chat`'s greedy answer (the terminal shows it without its surrounding whitespace)."""
    from jaxinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_CHAT_TOKENS)
    return llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text


def test_chat_streams_greedy_answers_with_history_reset_and_ctrl_c(reference):
    term = Terminal("--temperature", "0", "--max-tokens", str(MAX_CHAT_TOKENS), *CHAT_FLAGS)
    assert "loading SmolLM2-135M-Instruct" in term.read_until(PROMPT)

    first, second = "What is the capital of France?", "And of Germany?"
    conversation = [{"role": "user", "content": first}]
    expected = greedy_chat(reference, conversation)
    assert term.ask(first) == expected.strip()
    conversation += [{"role": "assistant", "content": expected}, {"role": "user", "content": second}]
    assert term.ask(second) == greedy_chat(reference, conversation).strip()

    assert term.ask("/reset") == "(conversation cleared)"
    conversation = [{"role": "user", "content": second}]
    expected = greedy_chat(reference, conversation)
    assert term.ask(second) == expected.strip()
    conversation.append({"role": "assistant", "content": expected})

    term.send("Write a long story about a dragon.\n")
    term.read_until("dragon.\r\n")
    term.read_until(" ")  # the answer has begun
    term.send("\x03")
    assert term.read_until(PROMPT).strip().endswith("(stopped)")
    # The stopped turn is not in the history.
    assert term.ask(first) == greedy_chat(reference, conversation + [{"role": "user", "content": first}]).strip()

    term.send("/exit\n")
    assert term.exit_status() == 0


def test_a_stopped_answer_frees_its_kv_pages(reference):
    engine = reference.engine
    chat = EngineChat(engine)
    stream = chat.stream([{"role": "user", "content": "Tell me a story."}],
                         {"temperature": 0, "max_tokens": 64}, stopped=lambda: len(deltas) >= 2)
    deltas = []
    for delta in stream:
        deltas.append(delta)
    assert len(deltas) == 2  # stopped long before 64 tokens
    assert not engine.requests and engine.allocator.num_free_pages == engine.allocator.num_pages


def test_chat_against_a_server_gives_its_greedy_answer(served):
    term = Terminal("--url", served.url, "--model", NAME, "--temperature", "0", "--max-tokens", str(MAX_TOKENS))
    assert f"connecting to {served.url}" in term.read_until(PROMPT)
    assert term.ask(CHAT[0]["content"]) == served.reference.chat.outputs[0].text.strip()
    term.send("\x04")  # Ctrl-D
    assert term.exit_status() == 0
