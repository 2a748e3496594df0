"""Serving benchmark: a seeded load generator for any OpenAI-compatible server on this machine.

    .venv/bin/python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-requests 64 --concurrency 8
    .venv/bin/python benchmarks/serve.py --request-rate 2 --burstiness 1 --num-requests 100 --price-per-hour 2.6

Each request streams `/v1/completions` with `ignore_eos` and a fixed `max_tokens`, so output lengths
are what the workload says; greedy, or sampled with `--temperature`, `--top-p` and `--top-k`. The workload is seeded: prompt lengths and output lengths are drawn
uniformly from their ranges, and a `--shared-prefix-fraction` of the requests start with one common
prefix (what prefix caching serves). Requests go out at a fixed concurrency, or at a request rate
with gamma-distributed gaps (burstiness 1 is Poisson). A `--leave-fraction` of the clients close
their stream part-way (after a seeded number of chunks, at most half their `max_tokens`), and a
`--malformed-fraction` send a body that is not JSON, which a server must refuse (with a 4xx: the
report lists the status codes it sent) and survive. Token counts come from the server's own `usage`; a client that left counts the chunks it
saw. The report: request and token throughput, TTFT / TPOT / ITL / end-to-end latency (mean,
p50, p90, p99), goodput under the SLOs, and dollars per million output tokens at `--price-per-hour`
(price / (output tokens/s x 3600) x 1e6).
"""

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np
import pydoc_data.topics
from tqdm.auto import tqdm

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TEXT = " ".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)).split()


@dataclass
class Result:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first generated text
    e2e: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str | None = None
    left: bool = False  # the client closed its stream on purpose, part-way
    refused: int = 0  # the HTTP status a malformed request got (4xx expected)


@dataclass
class Work:
    prompt: str
    max_tokens: int
    leave_after: int = 0  # close the stream after this many chunks (0: read to the end)
    malformed: bool = False


def make_workload(args) -> list[Work]:
    """One Work per request; prompt lengths in words (about 1.3 tokens each)."""
    rng = random.Random(args.seed)
    fate = random.Random(f"{args.seed}-fate")  # a second stream: prompts do not depend on the fractions
    prefix = " ".join(TEXT[:args.shared_prefix_len])
    requests = []
    for i in range(args.num_requests):
        n = rng.randint(*args.prompt_len)
        start = rng.randrange(len(TEXT) - n)
        prompt = " ".join(TEXT[start:start + n])
        if rng.random() < args.shared_prefix_fraction:
            prompt = prefix + "\n" + prompt
        work = Work(prompt, rng.randint(*args.output_len))
        draw = fate.random()
        if work.max_tokens >= 2 and draw < args.leave_fraction:
            work.leave_after = fate.randint(1, work.max_tokens // 2)
        elif args.leave_fraction <= draw < args.leave_fraction + args.malformed_fraction:
            work.malformed = True
        requests.append(work)
    return requests


def sampling_fields(args) -> dict:
    """Greedy by default; `--temperature` > 0 samples (`top_k` is vLLM's and llama-server's extension)."""
    fields = {"temperature": args.temperature, "top_p": args.top_p}
    return fields | ({"top_k": args.top_k} if args.top_k > 0 else {})


async def one_request(client, args, work: Work) -> Result:
    body = {"model": args.model, "prompt": work.prompt, "max_tokens": work.max_tokens, **sampling_fields(args),
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = Result()
    start = time.perf_counter()
    last = None
    chunks = 0
    if work.malformed:  # a body cut off mid-way: the server must answer 4xx and carry on
        try:
            response = await client.post("/v1/completions", content=json.dumps(body)[:40],
                                         headers={"Content-Type": "application/json"})
            result.refused = response.status_code  # a 4xx is right; the report lists what each server sent
        except httpx.HTTPError as e:
            result.error = f"malformed body: {e!r}"
        result.e2e = time.perf_counter() - start
        return result
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    if work.leave_after and chunks >= work.leave_after:
                        result.left = True
                        break
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        result.error = repr(e)
    if not result.output_tokens:  # a server that sends no usage: one streamed chunk per token
        result.output_tokens = chunks
    result.e2e = time.perf_counter() - start
    return result


async def run(args) -> dict:
    workload = make_workload(args)
    rng = np.random.default_rng(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency or len(workload),
                          max_keepalive_connections=0 if args.no_keepalive else None)
    results = []
    deadline = time.perf_counter() + args.max_seconds
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits,
                                 headers={"Authorization": f"Bearer {args.api_key}"}) as client:
        bar = tqdm(total=len(workload), desc="Requests", unit="req", disable=args.quiet)
        semaphore = asyncio.Semaphore(args.concurrency or len(workload))

        async def worker(work):
            async with semaphore:
                if time.perf_counter() > deadline:
                    return
                results.append(await one_request(client, args, work))
                bar.update(1)

        start = time.perf_counter()
        tasks = []
        for work in workload:
            tasks.append(asyncio.create_task(worker(work)))
            if args.request_rate:  # gamma gaps with mean 1/rate; shape 1 is a Poisson process
                shape = args.burstiness
                await asyncio.sleep(rng.gamma(shape, 1.0 / (args.request_rate * shape)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return report(args, results, duration)


def stats(values) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    v = np.asarray(values) * 1000  # milliseconds
    return {"mean": round(float(v.mean()), 2), **{f"p{q}": round(float(np.percentile(v, q)), 2)
                                                  for q in (50, 90, 99)}}


def report(args, results: list[Result], duration: float) -> dict:
    """Latencies over the requests served to the end; a client that left counts for TTFT and tokens."""
    ok = [r for r in results if r.error is None and not r.refused]
    whole = [r for r in ok if not r.left]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in whole if r.output_tokens > 1]
    good = [r for r in whole if r.ttft * 1000 <= args.slo_ttft_ms
            and (r.output_tokens <= 1 or (r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 <= args.slo_tpot_ms)]
    output_per_s = output_tokens / duration if duration else 0.0
    out = {
        "base_url": args.base_url, "model": args.model, "seed": args.seed, "sampling": sampling_fields(args),
        "concurrency": args.concurrency, "request_rate": args.request_rate, "burstiness": args.burstiness,
        "num_requests": len(results), "completed": len(whole), "left": len(ok) - len(whole),
        "refused": sum(1 for r in results if r.refused and r.error is None),
        "refused_status": sorted({r.refused for r in results if r.refused}),
        "failed": sum(1 for r in results if r.error is not None),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(whole) / duration, 3),
        "output_tokens": output_tokens, "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": round(output_per_s, 2),
        "total_tokens_per_s": round((output_tokens + prompt_tokens) / duration, 2),
        "ttft_ms": stats([r.ttft for r in ok if r.output_tokens]), "tpot_ms": stats(tpot),
        "itl_ms": stats([x for r in ok for x in r.itl]), "e2e_ms": stats([r.e2e for r in whole]),
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
        "goodput_requests_per_s": round(len(good) / duration, 3),
        "price_per_hour": args.price_per_hour,
        "dollars_per_million_output_tokens": (round(args.price_per_hour / (output_per_s * 3600) * 1e6, 4)
                                              if args.price_per_hour and output_per_s else None),
    }
    return out


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY", "unused"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (0: no limit)")
    parser.add_argument("--request-rate", type=float, default=0.0, help="requests/s with gamma gaps (0: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    parser.add_argument("--prompt-len", type=parse_range, default=(64, 256), help="words, LO:HI")
    parser.add_argument("--output-len", type=parse_range, default=(32, 128), help="tokens, LO:HI")
    parser.add_argument("--shared-prefix-fraction", type=float, default=0.0)
    parser.add_argument("--shared-prefix-len", type=int, default=200, help="words")
    parser.add_argument("--leave-fraction", type=float, default=0.0,
                        help="clients that close their stream part-way")
    parser.add_argument("--malformed-fraction", type=float, default=0.0,
                        help="requests whose body is not JSON (a 4xx expected)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="<= 0: off (not sent)")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--price-per-hour", type=float, default=0.0, help="dollars per hour of the machine")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="no request starts after this")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--results-file", help="append the report to this JSON-lines file")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="a new connection per request (llama-server closes a kept-alive connection after a few "
                             "requests, and a request sent on it as it closes fails)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if urlparse(args.base_url).hostname not in LOOPBACK:
        parser.error("--base-url must be on this machine (127.0.0.1, localhost or ::1)")
    out = asyncio.run(run(args))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if args.results_file:
        with open(args.results_file, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0 if out["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
