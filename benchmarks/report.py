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


def strategy_table(*benches: str) -> str:
    rows = [r for b in benches for r in read(b)]
    by_model = defaultdict(dict)
    for r in rows:
        by_model[r["model"]][r["strategy"]] = r
    lines = []
    for model in sorted(by_model):
        eager = by_model[model].get("eager_fp32")
        lines.append(f"\n**{model}** ({eager['input_shape'] if eager else ''}, {next(iter(by_model[model].values()))['device']})\n")
        lines.append("| strategy | peak GiB | vs eager | step ms | vs eager | note |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for strategy, r in by_model[model].items():
            mem = f"{int(r['peak_bytes']) / int(eager['peak_bytes']):.2f}x" if eager else "-"
            time = f"{float(r['step_ms']) / float(eager['step_ms']):.2f}x" if eager else "-"
            lines.append(f"| {strategy} | {gib(r['peak_bytes'])} | {mem} | {float(r['step_ms']):.1f} | {time} | {r.get('note') or ''} |")
    return "\n".join(lines)


SECTIONS = {
    "estimate": estimate_table,
    "anchors": lambda: strategy_table("anchors", "compile", "strategies"),
}


def main() -> int:
    with open(DOC) as f:
        text = f.read()
    for name, render in SECTIONS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(\n<!-- /generated:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + render() + m.group(2), text)
    with open(DOC, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
