"""Helpers shared by the tests."""

import contextlib
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxinfer.kv_cache import allocate_kv_cache
from jaxinfer.models.llama import AttentionMetadata

TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for_cuda(fn, *args, device_kind="NVIDIA H100"):
    """`jax.export` of `jax.jit(fn)` for CUDA on this GPU-less machine: the Pallas lowering runs as
    it would on a GPU. Since jax 0.12 that needs an abstract GPU device to lower for."""
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None,
                                                                      platform="gpu"))
    with use_abstract_mesh(mesh):
        return jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)


def tiny_llama_gguf(path, hidden: int, ffn: int, tensors: dict):
    """A 1-layer llama GGUF at `path` (4 heads, 2 KV heads, vocabulary 32 with a byte-level BPE tokenizer
    of letters and one merge, a float32 embedding): `tensors` maps each `blk.0.*` name to (its bytes as
    GGUF stores them, its GGMLQuantizationType)."""
    import gguf

    from jaxinfer.weights.gguf import GGUFCheckpoint

    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, hidden),
                       (writer.add_feed_forward_length, ffn), (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                       (writer.add_context_length, 128), (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_vocab_size, 32)):
        add(value)
    tokens = [chr(ord("a") + i) for i in range(26)] + ["A", "B", "C", "D", "Ġ", "ab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges(["a b"])
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((32, hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFCheckpoint(str(path))


# Two computations of the CPU default that differ only in float rounding (a tensor-parallel split's
# all-reduce order): its int8 activations turn a 1-ulp difference into a changed rounding step, and 30
# layers into logprob differences of ~0.1 (0.15 measured), so greedy text may part at a near tie.
NEAR_TIE = 0.3


def assert_same_greedy_tokens_up_to_a_near_tie(ours: list[dict], theirs: list[dict], tolerance: float = NEAR_TIE):
    """`ours`, `theirs`: one prompt's greedy steps, each {token: logprob} of its top tokens, best (the
    chosen one) first. The chosen tokens are equal until the first step where they differ; there
    each side's choice is among the other's top tokens, within `tolerance` of the other's best."""
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        chosen_a, chosen_b = next(iter(a)), next(iter(b))
        if chosen_a != chosen_b:
            assert chosen_b in a and a[chosen_a] - a[chosen_b] <= tolerance, (step, a, b)
            assert chosen_a in b and b[chosen_b] - b[chosen_a] <= tolerance, (step, a, b)
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@contextlib.contextmanager
def live_server(app):
    """`app` on uvicorn at http://127.0.0.1:<free port>, in a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 30)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# The server the API tests share (conftest.py's `served`): its model's served name, and the requests
# whose offline greedy output it keeps as the reference.
NAME = "smol"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


def idle(served) -> bool:
    """No request in flight and every KV page free again (waits up to 10 s for it)."""
    engine = served.engine
    return wait_until(lambda: served.async_engine.stats.num_requests == 0 and not engine.requests
                      and engine.allocator.num_free_pages == engine.allocator.num_pages)


def prefill_logits(model, token_ids, page_size=16):
    """Last-position logits of one prompt, straight through `model` (an engine's, or one sharing its
    weights) on a fresh paged cache whose block table is not the identity (pages in reverse order)."""
    n = len(token_ids)
    num_pages = -(-n // page_size)
    k_cache, v_cache = allocate_kv_cache(model.config, num_pages, page_size, jnp.float32)
    table = np.arange(num_pages, dtype=np.int32)[::-1].copy()
    pos = np.arange(n, dtype=np.int32)
    meta = AttentionMetadata(*map(jnp.asarray, AttentionMetadata(
        slot_mapping=table[pos // page_size] * page_size + pos % page_size,
        query_start_loc=np.array([0, n], np.int32), seq_lens=np.array([n], np.int32),
        block_tables=table[None, :], logits_indices=np.array([n - 1], np.int32))))
    logits, _, _ = model(jnp.asarray(token_ids, jnp.int32), jnp.asarray(pos), k_cache, v_cache, meta)
    return np.asarray(logits[0])
