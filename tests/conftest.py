"""Shared fixtures: the bundled model, its HF transformers reference, and engines and the API server
built once per session. Under pytest-xdist (`make test` runs two workers, `--dist loadfile`): the
slowest modules first, and the tests marked `alone` with no other worker's test running meanwhile."""

import fcntl
import os
import shutil
import tempfile

import pytest

from jaxinfer.weights import resolve_model_path

SMOLLM2 = "SmolLM2-135M-Instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
LOCK_DIR = "JAXINFER_TEST_LOCK_DIR"  # set by the xdist controller: where the workers' locks live


def pytest_configure(config):
    """The test run is an application, so it chooses JAX's persistent compilation cache (the library
    never turns it on): a second run loads the step programs the first compiled."""
    from jaxinfer.compilation import enable_compilation_cache

    enable_compilation_cache()
    config.addinivalue_line("markers", "alone: timed against the wall clock; under pytest-xdist no other worker "
                                       "runs a test while it runs")
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # The xdist controller: a directory for the workers' lock files (they inherit the variable),
        # removed when the run ends.
        os.environ[LOCK_DIR] = tempfile.mkdtemp(prefix="jaxinfer-pytest-")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(LOCK_DIR):
        shutil.rmtree(os.environ.pop(LOCK_DIR), ignore_errors=True)


# The modules that take longest (one fresh-clone run's durations, fixtures included), slowest first:
# each worker takes whole modules in collection order (`--dist loadfile`), so these start first and
# the short ones fill in at the end instead of one long module finishing alone.
SLOWEST_FIRST = ("gemma3", "engine", "tensor_parallel", "qwen2", "multihost", "quant", "notebooks", "speculative",
                 "fidelity", "admission", "gpu_smoke", "paged_cache", "messages_api", "architectures_vs_hf",
                 "server_fuzz", "evaluate", "data_parallel", "chat")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files in their usual order
    rank = {f"test_{name}.py": i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order kept


# Modules sharing a session fixture that is costly to build, scheduled as one unit so that one worker
# builds it: the server on Qwen2.5-Coder-0.5B (`served_qwen`, about a minute to load and warm up).
SCHEDULED_TOGETHER = {"test_messages_api.py": "served_qwen", "test_responses_api.py": "served_qwen",
                      "test_tool_calls.py": "served_qwen", "test_fim.py": "served_qwen"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the modules of SCHEDULED_TOGETHER as one unit each."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndGroups(LoadFileScheduling):
        def _split_scope(self, nodeid):
            module = super()._split_scope(nodeid)
            return SCHEDULED_TOGETHER.get(os.path.basename(module), module)

    return FilesAndGroups(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Under pytest-xdist, a test holds the run's lock shared while it runs, a test marked `alone`
    exclusively. A gate in front gives the exclusive one its turn: the worker waiting for it holds
    the gate, so the other worker's next test waits behind it rather than taking the lock first."""
    lock_dir = os.environ.get(LOCK_DIR) if os.environ.get("PYTEST_XDIST_WORKER") else None
    if not lock_dir:
        return (yield)
    gate = os.open(os.path.join(lock_dir, "gate"), os.O_RDWR | os.O_CREAT, 0o600)
    lock = os.open(os.path.join(lock_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if item.get_closest_marker("alone"):
            fcntl.flock(lock, fcntl.LOCK_EX)  # the gate stays held until the test ends
        else:
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        return (yield)
    finally:
        os.close(lock)  # closing releases the locks
        os.close(gate)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return resolve_model_path(SMOLLM2)


@pytest.fixture(scope="session")
def hf_reference():
    """HF transformers in its own Python 3.11 process (tests/hf_reference.py)."""
    from tests.hf_reference import HFReference

    reference = HFReference()
    yield reference
    reference.close()


@pytest.fixture(scope="session")
def hf_tokenizer(hf_reference, smollm2_path):
    """transformers' tokenizer of the same GGUF file (in the reference process)."""
    return hf_reference.load_tokenizer_gguf(smollm2_path)


@pytest.fixture(scope="session")
def hf_model(hf_reference, smollm2_path):
    """The reference: HF transformers (torch, CPU, float32) loading the same GGUF file."""
    return hf_reference.load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_model, hf_tokenizer):
    """The bundled model as a Hugging Face directory (safetensors + config + tokenizer), made by transformers."""
    path = tmp_path_factory.mktemp("smollm2-hf")
    hf_model.save_pretrained(path)  # sharded: 3 files + index
    hf_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llm():
    """The engine most tests share: float32 weights and activations (quantization "none": the HF
    reference runs the same dequantized weights), page_size 16."""
    from jaxinfer import LLM

    return LLM(SMOLLM2, max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512, quantization="none")


@pytest.fixture(scope="session")
def served():
    """The OpenAI-compatible server on the bundled model in the default configuration, live on
    127.0.0.1 (tests/test_server*.py, test_openapi.py). `reference` holds the engine's own greedy
    output for helpers.PROMPT and CHAT, taken offline before the server owns the engine."""
    from types import SimpleNamespace

    import openai
    from helpers import CHAT, MAX_TOKENS, NAME, PROMPT, live_server

    from jaxinfer import LLMEngine, SamplingParams
    from jaxinfer.api import create_app
    from jaxinfer.async_engine import AsyncLLMEngine

    def offline(prompt, **params):
        request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **params))
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    final = out
        return final

    engine = LLMEngine(SMOLLM2, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128)
    # scored: with the prompt's logprobs (prompt_logprobs, and completions' echo with logprobs)
    reference = SimpleNamespace(completion=offline(PROMPT), chat=offline(engine.tokenizer.encode_chat(CHAT)),
                                scored=offline(PROMPT, prompt_logprobs=5, logprobs=5))
    async_engine = AsyncLLMEngine(engine).start()
    app = create_app(async_engine, served_model_name=NAME)
    with live_server(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=engine, async_engine=async_engine, reference=reference,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
    async_engine.shutdown(timeout=1)


@pytest.fixture(scope="session")
def qwen_hf_tokenizer(hf_reference):
    """transformers' tokenizer of the Qwen2.5-Coder-0.5B GGUF (in the reference process)."""
    return hf_reference.load_tokenizer_gguf(resolve_model_path(QWEN))


@pytest.fixture(scope="session")
def served_qwen():
    """The server on Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, the default configuration), whose chat
    template writes Hermes tool calls: the tool-calling tests of every API share it."""
    from types import SimpleNamespace

    import openai
    from helpers import live_server

    from jaxinfer import LLMEngine
    from jaxinfer.api import create_app
    from jaxinfer.async_engine import AsyncLLMEngine

    engine = LLMEngine(QWEN, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=512)
    async_engine = AsyncLLMEngine(engine).start()
    app = create_app(async_engine, served_model_name="qwen")
    with live_server(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=engine, async_engine=async_engine,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
    async_engine.shutdown(timeout=1)
