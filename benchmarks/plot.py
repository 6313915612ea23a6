"""Draw the benchmark PNGs from the CSVs in benchmarks/results (no GPU needed).

    python benchmarks/plot.py            # writes benchmarks/results/*.png
"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def read(name: str):
    path = os.path.join(RESULTS, f"{name}.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    # The newest row of each (model, strategy) wins: re-runs replace older measurements.
    latest = {}
    for r in rows:
        latest[(r["model"], r["strategy"])] = r
    return list(latest.values())


def plot_estimate(rows, plt) -> str:
    rows = [r for r in rows if r.get("estimate_bytes")]
    labels = [f"{r['model']}\n{'bf16' if 'bf16' in r['strategy'] else 'fp32'}" for r in rows]
    measured = [int(r["peak_bytes"]) / 2**30 for r in rows]
    estimate = [int(r["estimate_bytes"]) / 2**30 for r in rows]
    fig, ax = plt.subplots(figsize=(14, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label=f"measured ({rows[0]['device']})")
    ax.bar([x + 0.2 for x in xs], estimate, 0.4, label="convmem estimate (no GPU)")
    for x, r in zip(xs, rows):
        ax.text(x, max(measured[x], estimate[x]) * 1.02, f"{float(r['estimate_error_pct']):+.1f}%", ha="center", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("peak GiB")
    ax.set_title("Training-step peak: CUDA allocator vs convmem's no-GPU estimate")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(RESULTS, "estimate_accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(rows, plt) -> str:
    by_model = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    models = sorted(by_model)
    cols = 4
    fig, axes = plt.subplots((len(models) + cols - 1) // cols, cols, figsize=(18, 4.2 * ((len(models) + cols - 1) // cols)))
    for ax, model in zip(axes.flat, models):
        for r in by_model[model]:
            convmem = r["strategy"].startswith("convmem")
            ax.scatter(float(r["step_ms"]), int(r["peak_bytes"]) / 2**30, marker="*" if convmem else "o",
                       s=90 if convmem else 40, color="#C44E52" if convmem else "#4C72B0")
            ax.annotate(r["strategy"], (float(r["step_ms"]), int(r["peak_bytes"]) / 2**30), fontsize=6)
        ax.set_title(model)
        ax.set_xlabel("step ms (median)")
        ax.set_ylabel("peak GiB")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle(f"Peak memory vs step time ({rows[0]['device']})")
    fig.tight_layout()
    path = os.path.join(RESULTS, "pareto.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anchors = read("anchors")
    written = []
    if anchors:
        written.append(plot_estimate(anchors, plt))
    all_rows = anchors + read("compile") + read("strategies")
    if all_rows:
        written.append(plot_pareto(all_rows, plt))
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
