"""Draw the benchmark PNGs from the CSVs in benchmarks/results (no GPU needed).

    python benchmarks/plot.py            # writes benchmarks/results/*.png
"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def rows_of_every_run(name: str, statuses=("ok",)):
    """Every row of results/<name>.csv whose status is in `statuses` (None: any), of every run."""
    path = os.path.join(RESULTS, f"{name}.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if statuses is None or r["status"] in statuses]


def read(name: str, statuses=("ok",)):
    """`rows_of_every_run`, the newest row of each (model, strategy) only: re-runs replace older ones."""
    latest = {}
    for r in rows_of_every_run(name, statuses):
        latest[(r["model"], r["strategy"])] = r
    return list(latest.values())


def _save(fig, plt, name: str, dpi: int) -> str:
    """Lay out `fig`, write it to results/`name` and close it; the path written."""
    fig.tight_layout()
    path = os.path.join(RESULTS, name)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
    return _save(fig, plt, "estimate_accuracy.png", dpi=110)


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
    return _save(fig, plt, "pareto.png", dpi=100)


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


# Every bench that measures anchors the harness's way; dominance and the Pareto plots take each
# anchor at its best over all their runs.
ANCHOR_BENCHES = ("optimize", "graphed", "anchors", "compile", "compact_pools")


def session_anchors(benches=ANCHOR_BENCHES):
    """(model, anchor) -> (least step ms, least peak bytes) over every run of `benches` that
    measured it: each anchor at its best on both axes, so that run-to-run noise never counts for
    convmem."""
    best = {}
    for r in (row for bench in benches for row in rows_of_every_run(bench)):
        if r["strategy"] in ANCHOR_NAMES:
            key = (r["model"], r["strategy"])
            t, m = float(r["step_ms"]), int(r["peak_bytes"])
            old = best.get(key)
            best[key] = (min(t, old[0]), min(m, old[1])) if old else (t, m)
    return best


REGIME_STYLE = {  # regime -> colour, marker, legend
    "fp32": ("#C44E52", "*", "convmem plan, fp32"),
    "fp32+compile": ("#DD8452", "D", "convmem plan, fp32 + torch.compile"),
    "bf16": ("#8172B3", "*", "convmem plan, bf16 autocast"),
    "bf16+compile": ("#937860", "D", "convmem plan, bf16 autocast + torch.compile"),
}


def plan_rows():
    """convmem's measured plans (newest per model and strategy), any regime; "over": measured above
    its budget."""
    return [r for r in read("optimize", statuses=("ok", "over")) if r["strategy"].startswith("convmem_")]


def configuration_rows():
    """convmem's one-call configurations measured by the harness (``checkpoint_`` full or selective,
    eager or compiled, compile's CUDA graphs too: strategies.csv and graphed.csv), each with the regime
    of the dominance table (fp32, or fp32+compile when the note names torch.compile)."""
    rows = []
    for r in read("strategies") + read("graphed"):
        if r["strategy"].startswith(("convmem_checkpoint_", "convmem_selective", "convmem_full")):
            rows.append(dict(r, regime="fp32+compile" if "torch.compile" in (r.get("note") or "") else "fp32"))
    return rows


def plot_optimize_pareto(plans_of_every_model, plt):
    """One PNG per zoo model: the anchors (each at its best over every run) and convmem's
    plans by regime, peak memory against step time, with the frontier of the exact fp32 plans."""
    anchors = session_anchors()
    written = []
    for model in sorted({r["model"] for r in plans_of_every_model}):
        plans = [r for r in plans_of_every_model if r["model"] == model]
        fig, ax = plt.subplots(figsize=(8, 5.2))
        for (m, name), (t, peak) in anchors.items():
            if m == model:
                ax.scatter(t, peak / 2**30, color="#4C72B0", s=40, zorder=3)
                ax.annotate(name.replace("_", " "), (t, peak / 2**30), fontsize=7, xytext=(4, 3), textcoords="offset points")
        for regime, (color, marker, label) in REGIME_STYLE.items():
            rows = [r for r in plans if (r.get("regime") or "fp32") == regime]
            if rows:
                ax.scatter([float(r["step_ms"]) for r in rows], [int(r["peak_bytes"]) / 2**30 for r in rows], color=color,
                           marker=marker, s=90 if marker == "*" else 45, zorder=4, label=label)
                for r in rows:
                    ax.annotate(r["strategy"].replace("convmem_plan_", "").replace("convmem_at_", "@").replace("_compiled", ""),
                                (float(r["step_ms"]), int(r["peak_bytes"]) / 2**30), fontsize=6, xytext=(3, -9),
                                textcoords="offset points", color=color)
        exact = [r for r in plans if not (r.get("regime") or "fp32").startswith("bf16")]
        front = frontier([(float(r["step_ms"]), int(r["peak_bytes"])) for r in exact])
        if front:
            right = max([float(r["step_ms"]) for r in plans] + [t for (m, _), (t, _) in anchors.items() if m == model])
            xs = [t for t, _ in front] + [right * 1.05]
            ys = [m / 2**30 for _, m in front] + [front[-1][1] / 2**30]
            ax.step(xs, ys, where="post", color="#C44E52", alpha=0.6, label="convmem frontier, fp32 (eager or compiled)")
        ax.set_xscale("log")
        ax.set_xlabel("step time, ms (median; log scale)")
        ax.set_ylabel("peak memory, GiB (max_memory_allocated)")
        ax.set_title(f"{model}: peak memory vs step time ({plans[0]['device']})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        path = _save(fig, plt, f"pareto_{model}.png", dpi=100)
        written.append(path)
    return written


def plot_tile_curve(rows, plt) -> str:
    """tcn's tile curve: memory and step time of every tiled configuration against eager (the
    target region of issue 4, at most a tenth of the memory at at most 1.6x the time, shaded), and
    the plain `Tiled(model, n)` series by tile length."""
    eager = next(r for r in rows if r["strategy"] == "eager_fp32")
    base_gib, base_ms = int(eager["peak_bytes"]) / 2**30, float(eager["step_ms"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.5))
    ax.fill_between([0.9, 1.6], 0, base_gib / 10, color="tab:green", alpha=0.12,
                    label="10x less memory at <= 1.6x the time")
    for r in rows:
        x, y = float(r["step_ms"]) / base_ms, int(r["peak_bytes"]) / 2**30
        graphed = "cuda_graphs=True" in r["note"]
        marker = "*" if r["strategy"] == "eager_fp32" else ("s" if graphed else "o")
        ax.scatter(x, y, marker=marker, s=70 if marker != "o" else 30,
                   color="black" if r["strategy"].startswith(("eager", "compile")) else ("tab:red" if graphed else "tab:blue"))
        ax.annotate(r["strategy"].replace("convmem_", ""), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("step time / eager's")
    ax.set_ylabel("peak GiB (log)")
    ax.set_title(f"tcn {eager['input_shape']}: tiled configurations (red squares: CUDA graphs)")
    ax.legend(fontsize=8, loc="upper right")
    plain = sorted((int(r["strategy"].rsplit("_", 1)[1]), r) for r in rows
                   if r["strategy"].startswith("convmem_tiled_model_") and r["strategy"].rsplit("_", 1)[1].isdigit())
    tiles = [t for t, _ in plain]
    bx.plot(tiles, [int(r["peak_bytes"]) / 2**30 for _, r in plain], "o-", color="tab:blue", label="peak GiB")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("tile_length (samples), Tiled(model, n)")
    bx.set_ylabel("peak GiB", color="tab:blue")
    tx = bx.twinx()
    tx.plot(tiles, [float(r["step_ms"]) / base_ms for _, r in plain], "s--", color="tab:orange", label="time / eager")
    tx.set_ylabel("step time / eager's", color="tab:orange")
    bx.set_title(f"memory and time against tile length ({eager['device']}, commit {eager['commit']})")
    return _save(fig, plt, "tile_curve.png", dpi=110)


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
    tile_rows = [r for r in read("tile_curve") if r["model"] == "tcn"]
    if any(r["strategy"] == "eager_fp32" for r in tile_rows):
        written.append(plot_tile_curve(tile_rows, plt))
    plans = plan_rows()
    if plans:
        written += plot_optimize_pareto(plans, plt)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
