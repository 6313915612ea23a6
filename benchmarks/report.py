"""Render the benchmark CSVs as the tables of docs/BENCHMARKS.md (between generated markers).

    python benchmarks/report.py      # rewrites the generated sections in place
"""
from __future__ import annotations

import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))

from plot import read  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "BENCHMARKS.md")


def gib(value) -> str:
    return f"{int(value) / 2**30:.3f}" if value not in (None, "") else "-"


def estimate_table() -> str:
    rows = [r for r in read("anchors") if r.get("estimate_bytes")]
    lines = ["| model | input | autocast | measured peak GiB | estimate GiB | error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input_shape']} | {'bf16' if 'bf16' in r['strategy'] else 'fp32'} | "
                     f"{gib(r['peak_bytes'])} | {gib(r['estimate_bytes'])} | {float(r['estimate_error_pct']):+.1f}% |")
    worst = max((abs(float(r["estimate_error_pct"])) for r in rows), default=float("nan"))
    device = rows[0]["device"] if rows else "?"
    return "\n".join(lines) + f"\n\nWorst error {worst:.1f}% ({device}, torch {rows[0]['torch'] if rows else '?'}, commit {rows[0]['commit'] if rows else '?'})."


def strategy_table(*benches: str, only=None) -> str:
    """Per model: every strategy's peak and step time, and both against eager fp32 of the anchors."""
    eager_rows = {r["model"]: r for r in read("anchors") if r["strategy"] == "eager_fp32"}
    by_model = defaultdict(dict)
    for bench in benches:
        for r in read(bench):
            if only is None or r["strategy"] in only or r["strategy"] == "eager_fp32":
                by_model[r["model"]][r["strategy"]] = r
    lines = []
    for model in sorted(by_model):
        eager = by_model[model].get("eager_fp32") or eager_rows.get(model)
        first = next(iter(by_model[model].values()))
        lines.append(f"\n**{model}** ({eager['input_shape'] if eager else first['input_shape']}; {first['device']})\n")
        lines.append("| strategy | peak GiB | vs eager | step ms | vs eager | note |")
        lines.append("|---|---:|---:|---:|---:|---|")
        rows = dict(by_model[model])
        if eager is not None:
            rows = {"eager_fp32": eager, **{k: v for k, v in rows.items() if k != "eager_fp32"}}
        for strategy, r in rows.items():
            mem = f"{int(r['peak_bytes']) / int(eager['peak_bytes']):.2f}x" if eager and r.get("peak_bytes") else "-"
            time = f"{float(r['step_ms']) / float(eager['step_ms']):.2f}x" if eager else "-"
            lines.append(f"| {strategy} | {gib(r.get('peak_bytes'))} | {mem} | {float(r['step_ms']):.1f} | {time} | {r.get('note') or ''} |")
    return "\n".join(lines)


def tiling_table() -> str:
    lines = ["| run | model | strategy | input | peak GiB | time ms | note |", "|---|---|---|---|---:|---:|---|"]
    for r in read("tiling"):
        lines.append(f"| {r['bench']} | {r['model']} | {r['strategy']} | {r['input_shape']} | {gib(r.get('peak_bytes'))} | "
                     f"{float(r['step_ms']):.1f} | {r.get('note') or ''} |")
    return "\n".join(lines) + (f"\n\n({read('tiling')[0]['device']}, commit {read('tiling')[0]['commit']})" if read("tiling") else "")


SECTIONS = {
    "estimate": estimate_table,
    "anchors": lambda: strategy_table("anchors", "compile"),
    "strategies": lambda: strategy_table("anchors", "strategies", only={"torch_checkpoint_blocks"} | {
        r["strategy"] for r in read("strategies")}),
    "lossy": lambda: strategy_table("lossy"),
    "tile_curve": lambda: strategy_table("tile_curve"),
    "tiling": tiling_table,
}


def main() -> int:
    with open(DOC) as f:
        text = f.read()
    for name, render in SECTIONS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + render().strip("\n") + "\n" + m.group(2), text)
    with open(DOC, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
