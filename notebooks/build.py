"""Writes the notebooks from the Python cells below, without outputs: `python notebooks/build.py`.

Each notebook is a list of cells; a cell that starts with "# md" is markdown (the rest of its
lines, with their leading "# " removed). Edit the cells here, not the .ipynb files.
"""

import pathlib

import nbformat

HERE = pathlib.Path(__file__).parent


def md(text: str) -> str:
    return "# md\n" + "\n".join("# " + line if line else "#" for line in text.strip().splitlines())


QUICKSTART = [
    md("""
## jaxinfer quickstart

Load the bundled SmolLM2-135M-Instruct, generate, chat, stream tokens from the engine, and try the
sampling parameters. Runs on a CPU in about a minute. `warmup=False`: each step shape compiles on
first use instead of all of them at start-up.
"""),
    """
import time

from jaxinfer import LLM, LLMEngine, SamplingParams

start = time.perf_counter()
llm = LLM("SmolLM2-135M-Instruct", max_model_len=512, max_num_seqs=8, warmup=False)
print(f"loaded in {time.perf_counter() - start:.1f} s; weights: {llm.engine.weight_bytes_by_format}")
""",
    md("### Generate (greedy: `temperature=0`)"),
    """
greedy = SamplingParams(max_tokens=24, temperature=0.0)
outputs = llm.generate(["The capital of France is", "def fibonacci(n):"], greedy, use_tqdm=False)
for out in outputs:
    print(repr(out.prompt), "->", repr(out.outputs[0].text), f"({out.outputs[0].finish_reason})")
capital_text = outputs[0].outputs[0].text
""",
    md("### Chat: the model's own chat template"),
    """
messages = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of Italy?"}]
print(llm.chat(messages, SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)[0].outputs[0].text)
""",
    md("""
### Stream from the engine

`llm.engine` is the `LLMEngine` underneath: `add_request` queues a request, each `step()` runs one
batch and returns the requests that made progress, with the text new since the previous step in
`delta`.
"""),
    """
engine: LLMEngine = llm.engine
request_id = engine.add_request("Once upon a time", SamplingParams(max_tokens=40, temperature=0.0))
while engine.has_unfinished_requests():
    for output in engine.step():
        print(output.outputs[0].delta, end="", flush=True)
m = output.metrics
print(f"\\nfinish_reason: {output.outputs[0].finish_reason} | {m.num_generation_tokens} tokens, "
      f"time to first token {m.time_to_first_token:.2f} s")
""",
    md("""
### Sampling parameters

`temperature`, `top_p` and `seed`: a seeded request draws the same tokens every time. `n` samples
several completions of one prompt (they share the prompt's KV pages). `stop` ends at a string,
`logprobs` returns the top-N alternatives of each token.
"""),
    """
prompt = "My favourite fruit is"
seeded = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234)
a, b = (llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].text for _ in range(2))
print("seed 1234, twice:", repr(a), repr(b))
assert a == b

for completion in llm.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7),
                               use_tqdm=False)[0].outputs:
    print(f"n=3 [{completion.index}]", repr(completion.text))

stopped = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=32, temperature=0.0, stop=[" 6"]),
                       use_tqdm=False)[0].outputs[0]
print("stop=[' 6']:", repr(stopped.text), stopped.finish_reason)
""",
    """
with_logprobs = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0.0, logprobs=3),
                             use_tqdm=False)[0].outputs[0]
for lp in with_logprobs.logprobs:
    alternatives = ", ".join(f"{llm.tokenizer.decode([t])!r}: {p:.2f}" for t, p in lp.top)
    print(f"{llm.tokenizer.decode([lp.token_id])!r:>12} logprob {lp.logprob:6.2f} | top 3: {alternatives}")
""",
]


PAGED_KV_CACHE = [
    md("""
## The paged KV cache, step by step

The engine keeps K/V in fixed-size pages (here 16 tokens). Each running `Sequence` has a
`block_table`: its pages, in order of position. The `PageAllocator` hands pages out, counts their
users (`ref_counts`), and keeps full pages under a hash of their prefix so that a later prompt that
starts the same way reuses them (prefix caching). When pages run out, the scheduler preempts the
most recently admitted sequence and recomputes it later.
"""),
    """
%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from jaxinfer import LLMEngine, SamplingParams

engine = LLMEngine("SmolLM2-135M-Instruct", page_size=16, num_pages=48, max_model_len=256, max_num_seqs=4,
                   warmup=False)
allocator, scheduler = engine.allocator, engine.scheduler
print(f"{allocator.num_pages} pages of {allocator.page_size} tokens, {allocator.num_free_pages} free")
""",
    """
def show(title=""):
    \"\"\"Prints each running sequence's pages and the allocator's counters.\"\"\"
    print(f"--- {title} | free pages: {allocator.num_free_pages}, prefix cache: "
          f"{allocator.prefix_cache_hits}/{allocator.prefix_cache_queries} prompt tokens hit, "
          f"{len(allocator.cached_pages)} cached pages, preemptions: {scheduler.num_preemptions}")
    for seq in scheduler.running:
        shared = [p for p in seq.block_table if allocator.ref_counts[p] > 1]
        print(f"  seq {seq.request_id:>6}: {seq.num_computed_tokens:3d}/{seq.num_tokens:3d} tokens computed, "
              f"block_table={seq.block_table}" + (f", shared pages {shared}" if shared else ""))


def owners():
    \"\"\"[num_pages] which running sequence holds each page: -1 free, -2 shared by several.\"\"\"
    owner = np.full(allocator.num_pages, -1)
    for i, seq in enumerate(scheduler.running):
        for page in seq.block_table:
            owner[page] = -2 if allocator.ref_counts[page] > 1 else int(seq.request_id.split("-")[0])
    return owner


history = []  # owners() after each step, for the picture at the end


def step(n=1):
    for _ in range(n):
        engine.step()
        history.append(owners())
""",
    md("""
### 1. Pages are allocated as sequences grow

Three prompts of different lengths. The first step prefills them (one ragged batch), each later
step decodes one token per sequence; a sequence gets a new page each time it crosses 16 tokens.
"""),
    """
params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
for prompt in ["Hello", "The history of the Roman Empire begins with",
               "A long list of things to pack for a camping trip: a tent, a sleeping bag, a stove, " * 2]:
    engine.add_request(prompt, params)
show("added 3 requests (waiting, no pages yet)")
step()
show("after 1 step (prefill)")
step(20)
show("after 21 steps")
""",
    """
while engine.has_unfinished_requests():
    step()
show("all finished: the pages are free again, full pages stay cached")
""",
    md("""
### 2. Prefix caching: prompts that share a long prefix share pages

Request A is prefilled first, which registers its full pages in the cache. B and C start with the
same 63-token prefix: its 3 full pages come from the cache (ref count 3), and B and C compute only
the rest of their prompt.
"""),
    """
prefix = ("You are a helpful assistant. Answer the question about the following document in one short "
          "sentence. The document: The Amazon is the largest rainforest on Earth, covering much of the "
          "Amazon basin of South America, and it is home to millions of species of insects, plants, "
          "birds and other forms of life. Question: ")
print(len(engine.tokenizer.encode(prefix)), "prefix tokens")
hits_before = allocator.prefix_cache_hits
engine.add_request(prefix + "Where is it?", params, request_id="10")
step()
for rid, question in (("11", "How big is it?"), ("12", "What lives there?")):
    engine.add_request(prefix + question, params, request_id=rid)
step()
show("B and C admitted")
shared = [p for seq in scheduler.running for p in seq.block_table if allocator.ref_counts[p] > 1]
print("ref_counts of the shared pages:", {p: allocator.ref_counts[p] for p in sorted(set(shared))})
prefix_hits = allocator.prefix_cache_hits - hits_before
assert prefix_hits > 0 and shared
while engine.has_unfinished_requests():
    step()
""",
    md("""
### 3. Preemption when the cache runs out

Four sequences that each grow to 13 pages need 52 pages; the cache has 48. When a running sequence
needs a page and none is free, the most recently admitted one is preempted: its pages are freed and
it is recomputed later (its prompt from the prefix cache if its pages were not reused meanwhile).
"""),
    """
long_params = SamplingParams(max_tokens=180, temperature=0.0, ignore_eos=True)
for i, topic in enumerate(["the sea", "the mountains", "a city at night", "a quiet library"]):
    engine.add_request(f"Write a long, detailed story about {topic}, with many characters and places.",
                       long_params, request_id=str(20 + i))
outputs = []
while engine.has_unfinished_requests():
    outputs += [o for o in engine.step() if o.finished]
    history.append(owners())
show("done")
print({o.request_id: o.metrics.num_preemptions for o in outputs}, "preemptions per request")
assert scheduler.num_preemptions > 0
""",
    md("""
### The picture: which sequence holds each page, step by step

One row per step, one column per page. White is free, black is shared by several sequences, each
colour is a request (its id in the legend).
"""),
    """
grid = np.array(history)  # [steps, num_pages]
ids = sorted(set(grid[grid >= 0].tolist()))
colours = plt.colormaps["tab20"](np.linspace(0, 1, max(len(ids), 2)))
image = np.ones(grid.shape + (4,))
image[grid == -2] = (0, 0, 0, 1)
for k, rid in enumerate(ids):
    image[grid == rid] = colours[k]
fig, ax = plt.subplots(figsize=(10, 8))
ax.imshow(image, aspect="auto", interpolation="nearest")
ax.set(xlabel="page", ylabel="engine step", title="KV pages by owning request (black: shared)")
ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in range(len(ids))],
          labels=[f"request {rid}" for rid in ids], loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
plt.tight_layout()
plt.show()
print(f"prefix-cache hits: {prefix_hits} tokens; preemptions: {scheduler.num_preemptions}")
""",
]


QUANTIZATION = [
    md("""
## Quantized weights: bytes, perplexity and speed

The same SmolLM2-135M in three formats (docs/QUANTIZATION.md has all of them):
`none` (full precision, float32 on a CPU), `int8` (per output channel, requantized from the file)
and `native` (the GGUF file's own Q4_1 blocks and Q8_0 LM head: the CPU default). Perplexity is over
512 tokens of Python's own documentation (`pydoc_data.topics`), by `jaxinfer.evaluate.perplexity` as
in tests/test_quant.py; speed is decode tokens/s of a short greedy generation (batch 1).

The full-precision weights are the GGUF file's Q4_1 blocks dequantized. On a CPU the native kernels
run `int8` and `native` on activations quantized to int8 in blocks of 32, with integer dot products;
`native` adds only that rounding to the file's weights, while `int8` first requantizes them. `native`
is also the smallest, and batch-1 decode, which streams every weight once per token, is fastest with it.
"""),
    """
%matplotlib inline
import matplotlib.pyplot as plt
import pydoc_data.topics

from jaxinfer import LLM, SamplingParams
from jaxinfer.evaluate import perplexity, token_windows

FORMATS = ("none", "int8", "native")
llms = {q: LLM("SmolLM2-135M-Instruct", quantization=q, max_model_len=256, max_num_seqs=4, num_pages=64,
               warmup=False, weight_cache_dir=None) for q in FORMATS}
for q, llm in llms.items():
    print(f"{q:>7}: {llm.engine.weight_bytes_by_format}")
""",
    """
WINDOW, NUM_WINDOWS = 128, 4  # 512 tokens, one ragged batch of 4 sequences
text = "\\n\\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
windows = token_windows(llms["none"].tokenizer.encode(text), WINDOW, NUM_WINDOWS)
ppl = {q: perplexity(llm.engine.model, windows, seqs_per_call=NUM_WINDOWS) for q, llm in llms.items()}
print(ppl)
""",
    """
def decode_tokens_per_s(llm, max_tokens=48):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate("The history of the Roman Empire", params, use_tqdm=False)  # compiles the step shapes
    out = llm.generate("The history of the Roman Empire", params, use_tqdm=False)[0]
    m = out.metrics  # decode time: from the first token to the last
    return (m.num_generation_tokens - 1) / (m.last_token_time - m.first_token_time)


speed = {q: decode_tokens_per_s(llm) for q, llm in llms.items()}
weight_mib = {q: sum(llm.engine.weight_bytes_by_format.values()) / 2**20 for q, llm in llms.items()}
print("| format | weights MiB | perplexity | vs none | decode tok/s |\\n|---|---|---|---|---|")
for q in FORMATS:
    print(f"| {q} | {weight_mib[q]:.0f} | {ppl[q]:.3f} | {ppl[q] / ppl['none'] - 1:+.2%} | {speed[q]:.1f} |")
# Both quantized formats run on int8 activations here. 512 tokens are few: the 4,096-token measurement of
# tests/test_quant.py (docs/QUANTIZATION.md) holds the CPU default to 1%; this one allows 2%.
assert all(abs(ppl[q] / ppl["none"] - 1) < 0.02 for q in ("int8", "native"))
assert weight_mib["native"] < weight_mib["int8"] < weight_mib["none"]
""",
    """
fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
charts = [("weights (MiB)", weight_mib, "%.0f"), ("perplexity (lower is better)", ppl, "%.3f"),
          ("decode tokens/s, batch 1 (higher is better)", speed, "%.1f")]
for ax, (title, values, fmt) in zip(axes, charts):
    bars = ax.bar(FORMATS, [values[q] for q in FORMATS], color=["tab:gray", "tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt=fmt)
    ax.set_title(title, fontsize=10)
axes[1].set_ylim(min(ppl.values()) * 0.95, max(ppl.values()) * 1.02)
plt.tight_layout()
plt.show()
""",
]


def build(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for source in cells:
        source = source.strip("\n")
        if source.startswith("# md\n"):
            lines = source.split("\n")[1:]
            nb.cells.append(nbformat.v4.new_markdown_cell("\n".join(line[2:] for line in lines)))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source))
    return nb


NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_paged_kv_cache.ipynb": PAGED_KV_CACHE,
             "03_quantization.ipynb": QUANTIZATION}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)
