"""Plots for docs/BENCHMARKS.md from a `benchmarks/compare.py --json` file.

    .venv/bin/python benchmarks/plots.py docs/data/compare-llamacpp-q8_0-cpu.json --price-per-hour 0.10 --out docs/img

Draws output throughput vs concurrency, TTFT and TPOT percentiles, and dollars per million output
tokens vs concurrency (price / (tokens/s x 3600) x 1e6), for both engines of the comparison.
"""

import argparse
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_runs(path: str) -> tuple[dict, dict]:
    """{side: {concurrency: [round results]}} and the engines' names, from either layout of the
    file: today's (`serving` -> "c<streams>" -> side -> rounds, with `meta`) or the first
    comparison's (`runs` -> side -> streams -> rounds, against the file's Q4_1 blocks)."""
    with open(path) as f:
        data = json.load(f)
    if "runs" in data:
        return data["runs"], {"ours": "jaxinfer", "theirs": "llama-server (Q4_1 file: the weaker baseline)"}
    runs = {}
    for key, sides in data["serving"].items():
        if key.startswith("c") and key[1:].isdigit():
            for side, rounds in sides.items():
                runs.setdefault(side, {})[key[1:]] = rounds
    peer = os.path.basename(data["meta"]["peer_model"])
    return runs, {"ours": f"jaxinfer {data['meta']['commit']}", "theirs": f"llama-server, {peer}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--price-per-hour", type=float, default=0.10)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    runs, names = load_runs(args.results)
    os.makedirs(args.out, exist_ok=True)
    levels = sorted(runs["ours"], key=int)
    x = [int(c) for c in levels]

    def med(name, key, sub=None):
        return [statistics.median(r[key][sub] if sub else r[key] for r in runs[name][c]) for c in levels]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in runs:
        ax.plot(x, med(name, "output_tokens_per_s"), marker="o", label=names[name])
    ax.set(xscale="log", xticks=x, xticklabels=levels, xlabel="concurrent streams", ylabel="output tokens/s",
           title="Throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "throughput_vs_concurrency.png"), dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, label in ((axes[0], "ttft_ms", "TTFT ms"), (axes[1], "tpot_ms", "TPOT ms")):
        width = 0.4
        for i, name in enumerate(runs):
            for j, q in enumerate(("p99", "p90", "p50")):  # tallest first, so every level stays visible
                ax.bar([k + (i - 0.5) * width for k in range(len(levels))], med(name, metric, q), width,
                       alpha=0.3 + 0.35 * j, color=f"C{i}", label=f"{names[name]} {q}")
        ax.set(xticks=range(len(levels)), xticklabels=levels, xlabel="concurrent streams", ylabel=label,
               yscale="log", title=f"{label}: p50 (dark), p90, p99 (light)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latency_percentiles.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in runs:
        cost = [args.price_per_hour / (t * 3600) * 1e6 for t in med(name, "output_tokens_per_s")]
        ax.plot(x, cost, marker="o", label=names[name])
    ax.set(xscale="log", xticks=x, xticklabels=levels, xlabel="concurrent streams",
           ylabel="$ per 1M output tokens", title=f"Cost at ${args.price_per_hour}/hour")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "cost_vs_concurrency.png"), dpi=120)
    print("wrote", ", ".join(sorted(os.listdir(args.out))))


if __name__ == "__main__":
    main()
