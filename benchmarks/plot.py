"""Draw the benchmark PNGs from the CSVs in benchmarks/results (no GPU needed).

    python benchmarks/plot.py            # writes benchmarks/results/*.png
"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def read(name: str, statuses=("ok",)):
    path = os.path.join(RESULTS, f"{name}.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] in statuses]
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


ANCHOR_NAMES = ("eager_fp32", "bf16_autocast", "torch_checkpoint_blocks", "checkpoint_sequential_sqrt",
                "compile_default", "compile_budget_0.5", "compile_budget_0.1")


def frontier(points):
    """The lower-left staircase of (step ms, peak bytes) points: for each time, the least memory."""
    best, out = None, []
    for t, m in sorted(points):
        if best is None or m < best:
            best = m
            out.append((t, m))
    return out


def plot_optimize_pareto(anchor_rows, plan_rows, plt):
    """One PNG per zoo model: the anchors and convmem's plans, peak memory against step time."""
    written = []
    for model in sorted({r["model"] for r in plan_rows}):
        anchors = [r for r in anchor_rows if r["model"] == model and r["strategy"] in ANCHOR_NAMES]
        plans = [r for r in plan_rows if r["model"] == model and r["strategy"].startswith("convmem_plan")]
        if not plans:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for r in anchors:
            x, y = float(r["step_ms"]), int(r["peak_bytes"]) / 2**30
            ax.scatter(x, y, color="#4C72B0", s=40, zorder=3)
            ax.annotate(r["strategy"].replace("_", " "), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        for compiled, color, marker in ((False, "#C44E52", "*"), (True, "#DD8452", "D")):
            rows = [r for r in plans if r["strategy"].endswith("_compiled") == compiled]
            if rows:
                ax.scatter([float(r["step_ms"]) for r in rows], [int(r["peak_bytes"]) / 2**30 for r in rows], color=color,
                           marker=marker, s=90 if marker == "*" else 45, zorder=4,
                           label="convmem plan" + (" + torch.compile" if compiled else ""))
                for r in rows:
                    ax.annotate(r["strategy"].replace("convmem_plan_", "").replace("_compiled", ""),
                                (float(r["step_ms"]), int(r["peak_bytes"]) / 2**30), fontsize=6, xytext=(3, -9),
                                textcoords="offset points", color=color)
        front = frontier([(float(r["step_ms"]), int(r["peak_bytes"])) for r in plans])
        if front:
            xs = [t for t, _ in front] + [max(float(r["step_ms"]) for r in plans + anchors) * 1.05]
            ys = [m / 2**30 for _, m in front] + [front[-1][1] / 2**30]
            ax.step(xs, ys, where="post", color="#C44E52", alpha=0.6, label="convmem frontier")
        ax.set_xlabel("step time, ms (median)")
        ax.set_ylabel("peak memory, GiB (max_memory_allocated)")
        ax.set_title(f"{model}: peak memory vs step time ({plans[0]['device']})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(RESULTS, f"pareto_{model}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


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
    plans = read("optimize", statuses=("ok", "over"))  # "over": measured, above its budget (compiled)
    if plans:
        written += plot_optimize_pareto(anchors + read("compile"), plans, plt)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
