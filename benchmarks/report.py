"""Render the benchmark CSVs as the tables of docs/BENCHMARKS.md (between generated markers).

    python benchmarks/report.py      # rewrites the generated sections in place
"""
from __future__ import annotations

import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))

from plot import ANCHOR_NAMES, configuration_rows, plan_rows, read, rows_of_every_run, session_anchors  # noqa: E402

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
            if r["strategy"] == "eager_fp32":  # several benches measure it: the newest counts
                newest = by_model[r["model"]].get("eager_fp32")
                if newest is None or r["time"] > newest["time"]:
                    by_model[r["model"]]["eager_fp32"] = r
            elif only is None or r["strategy"] in only:
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
    rows = read("tiling")
    commits = ", ".join(sorted({r["commit"] for r in rows}))
    return "\n".join(lines) + (f"\n\n({rows[0]['device']}, commits {commits}; 'unknown': before commits were recorded)" if rows else "")


def _plan_text(note: str) -> str:
    """'checkpointx1+checkpointx1+keepx1' -> 'checkpoint x2, keep': runs of one option grouped; the
    plan's modules swapped, counted ('; 7 max-pools compact', '; 1 Conv1d as a matmul'), follow in
    brackets: the note's fields that start with a number (the bench's labels, benchmarks/optimize.py)."""
    fields = note.split("; ")
    extras = [f for f in fields if f.split(" ", 1)[0].isdigit()]
    tokens = [f for f in fields if f not in extras][-1].split("+")
    groups = []
    for token in tokens:
        label, _, count = token.rpartition("x")
        label = label if count.isdigit() else token
        blocks = int(count) if count.isdigit() else 1
        single = blocks == 1
        key = (label, single)
        if groups and groups[-1][0] == key:
            groups[-1][1] += 1
        else:
            groups.append([key, 1])
    parts = []
    for (label, single), n in groups:
        parts.append(f"{label} x{n}" if single and n > 1 else label if single else f"{label} ({n} runs)" if n > 1 else f"{label} (run)")
    return ", ".join(parts) + (f" ({', '.join(extras)})" if extras else "")


def optimize_table() -> str:
    """Must-show 1: each share of the eager peak, planned with every exact option and measured,
    beside the eager fp32 step of the same run."""
    rows = read("optimize", statuses=None)
    eager = {(r["model"], r.get("run")): r for r in rows_of_every_run("optimize") if r["strategy"] == "eager_fp32"}
    lines = ["| model | budget (of eager) | status | measured peak GiB | budget GiB | vs eager | step ms | vs eager | estimate GiB | plan (blocks in order) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    plans = [r for r in rows if re.fullmatch(r"convmem_plan_(min|[0-9.]+)", r["strategy"])]
    share = lambda r: r["strategy"].replace("convmem_plan_", "")  # noqa: E731
    plans.sort(key=lambda r: (models.index(r["model"]), -float(share(r)) if share(r) != "min" else 1.0))
    for r in plans:
        e = eager.get((r["model"], r.get("run")))
        note = r.get("note") or ""
        budget = re.search(r"budget (\d+) B", note)
        budget_gib = gib(budget.group(1)) if budget else "-"
        if r["status"] in ("ok", "over"):
            mem = f"{int(r['peak_bytes']) / int(e['peak_bytes']):.2f}x" if e else "-"
            time = f"{float(r['step_ms']) / float(e['step_ms']):.2f}x" if e else "-"
            lines.append(f"| {r['model']} | {share(r)} | {r['status']} | {gib(r['peak_bytes'])} | {budget_gib} | {mem} | "
                         f"{float(r['step_ms']):.1f} | {time} | {gib(r.get('estimate_bytes'))} | {_plan_text(note)} |")
        else:
            smallest = re.search(r"smallest feasible (\d+) B", note)
            text = (f"smallest feasible {gib(smallest.group(1))} GiB "
                    f"({int(smallest.group(1)) / int(e['peak_bytes']):.1%} of eager)") if smallest and e else note
            lines.append(f"| {r['model']} | {share(r)} | {r['status']} | - | {budget_gib} | - | - | - | - | {text} |")
    first = plans[0] if plans else {}
    commits = ", ".join(sorted({r.get("commit", "?") for r in plans}))
    return "\n".join(lines) + (f"\n\n({first.get('device', '?')}, torch {first.get('torch', '?')}, commits "
                               f"{commits}; each row against the eager step of its own run.)")


def dilation_tables() -> str:
    """benchmarks/dilation_probe.py: one convolution per dilation, then whole steps, as they are and
    with their dilated Conv1ds by phases (NOTE [Dilated convs by phases]) or other convs swapped."""
    rows = rows_of_every_run("dilation_probe", statuses=None)  # a probe: no status column
    micro = defaultdict(dict)
    for r in (r for r in rows if r["section"] == "micro"):
        micro[(r["model"], int(r["dilation"]))][r["impl"]] = float(r["ms"])
    lines = ["| shape of | dilation | Conv1d ms | by phases ms | speed-up |", "|---|---:|---:|---:|---:|"]
    for (model, dilation), t in micro.items():
        lines.append(f"| {model} | {dilation} | {t['conv1d']:.2f} | {t['phases']:.2f} | {t['conv1d'] / t['phases']:.2f}x |")
    lines += ["", "| model | mode | round | convs swapped | peak GiB | step ms (min-max) |",
              "|---|---|---:|---|---:|---|"]
    for r in (r for r in rows if r["section"] == "model"):
        which = {"as_is": "none", "phases": f"every dilated ({r['swapped']})",
                 "phases16": f"dilation >= 16 ({r['swapped']})",
                 "depthwise": f"none; depthwise on the kernel ({r['swapped']})",
                 "matmul": f"none; few input channels as a matmul ({r['swapped']})",
                 "conv2d": f"none; every Conv1d as conv2d ({r['swapped']})",
                 "conv2d_undilated": f"none; undilated as conv2d ({r['swapped']})",
                 "nhwc_undilated": f"none; undilated as channels-last conv2d ({r['swapped']})"}[r["impl"]]
        lines.append(f"| {r['model']} | {r['mode']} | {r['round']} | {which} | {float(r['peak_gib']):.3f} | "
                     f"{float(r['ms']):.1f} ({float(r['ms_min']):.1f}-{float(r['ms_max']):.1f}) |")
    commits = ", ".join(sorted({r["commit"] for r in rows}))
    return "\n".join(lines) + f"\n\n({rows[0]['device']}, torch {rows[0]['torch']}, commits {commits}.)"


def comparable(anchor: str, regime: str) -> bool:
    """Exact numerics: an fp32 anchor is met only by fp32 plans (eager or compiled); the bf16 anchor by
    any plan (a plan under the same autocast computes what the anchor computes; its options are exact)."""
    return "bf16" in anchor or not regime.startswith("bf16")


def matched_table() -> str:
    """Must-show 2, asked directly: at 99% of each anchor's memory, in its regime, is convmem faster?"""
    # the newest measured row of each plan; a failed one only where none measured (a later attempt
    # that timed out does not hide the run that measured it)
    measured = {(r["model"], r["strategy"]): r for r in read("optimize", statuses=("ok", "over"))}
    rows = [measured.get((r["model"], r["strategy"]), r) for r in read("optimize", statuses=None)]
    anchors = {(r["model"], r.get("run"), r["strategy"]): r for r in rows_of_every_run("optimize")
               if r["strategy"] in ANCHOR_NAMES}
    lines = ["| model | anchor | anchor GiB | anchor ms | convmem plan (regime) | GiB | ms | faster at less memory |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in sorted((r for r in rows if r["strategy"].startswith("convmem_at_")), key=lambda r: r["model"]):
        name = r["strategy"].replace("convmem_at_", "").replace("_compiled", "")
        a = anchors.get((r["model"], r.get("run"), name))
        if a is None:
            continue
        if r["status"] not in ("ok", "over"):
            lines.append(f"| {r['model']} | {name} | {gib(a['peak_bytes'])} | {float(a['step_ms']):.1f} | {r['regime']}: "
                         f"{r['status']} | - | - | no |")
            continue
        won = int(r["peak_bytes"]) < int(a["peak_bytes"]) and float(r["step_ms"]) <= float(a["step_ms"])
        lines.append(f"| {r['model']} | {name} | {gib(a['peak_bytes'])} | {float(a['step_ms']):.1f} | {_plan_text(r['note'])} "
                     f"({r['regime']}) | {gib(r['peak_bytes'])} | {float(r['step_ms']):.1f} | {'yes' if won else '**no**'} |")
    return "\n".join(lines) + "\n\n(Anchor and plan from the same run, minutes apart on one card.)"


def dominance_table(with_configurations: bool = False) -> str:
    """Must-show 2: for each anchor, the least memory of a convmem plan at no more step time.
    `with_configurations`: `checkpoint_`'s one-call configurations count too (plot.configuration_rows).
    Each anchor is at its best over every bench that measured it on the card (all H200)."""
    anchors = session_anchors()
    plans = plan_rows() + (configuration_rows() if with_configurations else [])
    lines = ["| model | anchor | anchor GiB | anchor ms | best convmem plan at <= that time | regime | GiB | ms | dominated |",
             "|---|---|---:|---:|---|---|---:|---:|---|"]
    total = met = 0
    for model in sorted({m for m, _ in anchors}):
        for name in ANCHOR_NAMES:
            if (model, name) not in anchors:
                continue
            t, m = anchors[(model, name)]
            faster = [r for r in plans if r["model"] == model and comparable(name, r.get("regime") or "fp32")
                      and float(r["step_ms"]) <= t]
            best = min(faster, key=lambda r: int(r["peak_bytes"])) if faster else None
            won = best is not None and int(best["peak_bytes"]) < m
            total += 1
            met += won
            if best is None:
                lines.append(f"| {model} | {name} | {gib(m)} | {t:.1f} | (none that fast) | - | - | - | **no** |")
            else:
                lines.append(f"| {model} | {name} | {gib(m)} | {t:.1f} | {best['strategy']} | {best.get('regime')} | "
                             f"{gib(best['peak_bytes'])} | {float(best['step_ms']):.1f} | {'yes' if won else '**no**'} |")
    return "\n".join(lines) + f"\n\nDominated: {met} of {total} anchors."


SECTIONS = {
    "optimize": optimize_table,
    "matched": matched_table,
    "dominance": dominance_table,
    "dominance_configurations": lambda: dominance_table(with_configurations=True),
    "estimate": estimate_table,
    "anchors": lambda: strategy_table("anchors", "compile"),
    "strategies": lambda: strategy_table("anchors", "compile", "strategies", only={
        "torch_checkpoint_blocks", "compile_default"} | {r["strategy"] for r in read("strategies")}),
    "lossy": lambda: strategy_table("lossy"),
    "tile_curve": lambda: strategy_table("tile_curve"),
    "graphed": lambda: strategy_table("graphed"),
    "fused_chains": lambda: strategy_table("fused_chains"),
    "compact_pools": lambda: strategy_table("compact_pools"),
    "conv_layout": lambda: strategy_table("conv_layout"),
    # eager and both compiled variants of the newest run only (the older run's compile_default
    # row came from another machine)
    "compiled_outputs": lambda: strategy_table("compiled_outputs", only={
        "convmem_selective_compiled", "convmem_selective_compiled_outputs_recomputed"}),
    "host_time": lambda: strategy_table("host_time"),
    "tiling": tiling_table,
    "dilation_probe": dilation_tables,
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
