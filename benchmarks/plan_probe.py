"""Measure hand-written plans of one zoo model under torch.compile, beside an anchor. GPU machine only.

    python benchmarks/plan_probe.py OUT_DIR --model w2v2_fe --anchor torch_checkpoint_blocks \
        --plans "chunk4,keep;checkpoint,chunk2" [--conv2d both] [--compile-mode reduce-overhead]
    python benchmarks/plan_probe.py OUT_DIR --model basenji --anchor compile_default,compile_budget_0.5 \
        --plans "keep;selective*19" --conv2d no --swaps pools,matmul --rounds 3

Where the planner's cost model and a compiled step disagree (NOTE [Using the slack] in
convmem/strategies/optimize.py), this answers which plans near its answer would have fit and how fast
they run, without the planner in the way: each plan is written block by block (``keep``,
``selective``, ``checkpoint``, ``chunkN`` for a batch chunk of N samples, ``offload``; blocks not
named are kept), applied with `convmem.apply_` to a fresh model, compiled and measured the way the
optimize bench measures its rows (benchmarks/harness.py). ``--conv2d`` runs each plan with the
model's Conv1ds as they are, as conv2d (NOTE [Conv layouts in compiled plans]), or both
(``--conv2d-only`` names the convs by prefix); ``--swaps`` gives every plan the module swaps of a
plan's other fields, each on every module that can take it (``pools``: compact max-pools; ``phases``,
``depthwise``, ``matmul``: the Conv1ds of those options); ``--chunks`` runs the chunked blocks' modules
compiled on their own, as `optimize_`'s compiled plans do (NOTE [Compiled chunks] in
convmem/nn/batch_chunked.py), eagerly, or both. ``--rounds N`` measures the anchors and the plans
N times over, in turn (A P A P), so that a difference smaller than the card's drift between rows
shows as a sign that holds round after round or does not. Rows go to
OUT_DIR/plan_probe.csv; the probe informs the planner's design and is not a plan of `optimize_`, so
docs/BENCHMARKS.md reports its rows apart from the optimize bench's.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import harness  # noqa: E402
import strategies  # noqa: E402
from strategies import Prepared  # noqa: E402

from convmem import apply_, optimize_, zoo  # noqa: E402
from convmem.nn.conv_as_2d import convs_as_2d  # noqa: E402
from convmem.plan.plan import _SWAPS, CONV_FIELDS, PlanSegment  # noqa: E402

ANCHORS = {**strategies.ANCHORS, **strategies.COMPILE_ANCHORS}
FIELDS = harness.FIELDS + ["plan", "conv2d", "compiled_chunks", "compile_mode", "swaps", "round"]
_OPTION = re.compile(r"^(keep|selective|checkpoint|offload|chunk(\d+))(\*(\d+))?$")
SWAP_FIELDS = {"pools": "pools", **CONV_FIELDS}  # --swaps word -> the Plan field it fills


def swaps_of(model, words) -> dict:
    """Plan field -> the names of every module of `model` that the field's wrapper can take, for
    each of `words` (SWAP_FIELDS); a Conv1d goes to the first word that can take it (one way each)."""
    reasons = {field: reason_of for field, _, reason_of, _, _ in _SWAPS}
    taken, fields = set(), {}
    for word in words:
        field = SWAP_FIELDS[word]
        fields[field] = [n for n, m in model.named_modules() if n not in taken and reasons[field](m) is None]
        taken.update(fields[field])
    return fields


def parse_plan(text: str, n_items: int):
    """``"chunk4,keep"`` -> one PlanSegment per block (the blocks not named kept); ``selective*19``
    stands for that option on 19 blocks in a row."""
    words = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        times = _OPTION.match(word)
        words += [times.group(1)] * int(times.group(4)) if times and times.group(4) else [word]
    if len(words) > n_items:
        raise ValueError(f"plan {text!r} names {len(words)} blocks; the model has {n_items}")
    segments = []
    for index, word in enumerate(words + ["keep"] * (n_items - len(words))):
        match = _OPTION.match(word)
        if match is None:
            raise ValueError(f"plan {text!r}: {word!r} is not keep, selective, checkpoint, offload or chunkN")
        if match.group(2):
            segments.append(PlanSegment(index, index + 1, "chunk", batch_chunk=int(match.group(2))))
        else:
            segments.append(PlanSegment(index, index + 1, word))
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--model", required=True, choices=zoo.names())
    parser.add_argument("--anchor", default="", help="anchors measured first, in the same run (comma-separated)")
    parser.add_argument("--plans", required=True, help="plans separated by ';', blocks by ','")
    parser.add_argument("--conv2d", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--conv2d-only", default="",
                        help="with --conv2d: only the Conv1ds whose names start with one of these (comma-separated)")
    parser.add_argument("--chunks", choices=("compiled", "eager", "both"), default="compiled")
    parser.add_argument("--swaps", default="", help=f"module swaps every plan makes, from {','.join(SWAP_FIELDS)}")
    parser.add_argument("--rounds", type=int, default=1, help="measure the anchors and plans this many times, in turn")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead"), default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="default")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    anchors = [a for a in args.anchor.split(",") if a]
    for anchor in anchors:
        if anchor not in ANCHORS:
            parser.error(f"--anchor {anchor!r}: choose one of {', '.join(ANCHORS)}")
    swap_words = [w for w in args.swaps.split(",") if w]
    for word in swap_words:
        if word not in SWAP_FIELDS:
            parser.error(f"--swaps {word!r}: choose from {', '.join(SWAP_FIELDS)}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    out_csv = os.path.join(args.out_dir, "plan_probe.csv")
    device = torch.device(args.device)
    mode = None if args.compile_mode == "default" else args.compile_mode
    base = harness.row_base("plan_probe", args.size)

    def row_for(strategy, entry, **extra):
        return dict(base, model=args.model, strategy=strategy,
                    batch=entry.inputs[0].shape[0], input_shape="x".join(str(n) for n in entry.inputs[0].shape),
                    time=datetime.datetime.now().isoformat(timespec="seconds"), **extra)

    def measure(entry, prepared, row):
        row.update(harness.measure_strategy(entry, prepared, args.repeats, device))
        row["peak_gib"] = round(row["peak_bytes"] / 2**30, 4) if row["peak_bytes"] is not None else None
        row["status"] = "ok"
        harness._append(out_csv, row, FIELDS)
        print(harness._line(row), row.get("plan", ""), f"conv2d={row.get('conv2d', '')}",
              f"compiled_chunks={row.get('compiled_chunks', '')}", f"swaps={row.get('swaps', '')}",
              f"round={row.get('round', '')}", flush=True)

    # the untouched plan of this model (from its estimate, on the meta device): its blocks and
    # structure, which each written plan's segments replace
    entry = zoo.get(args.model, size=args.size, device="meta")
    # the convs by their names in the untouched model, where the written plans are applied
    prefixes = tuple(p for p in args.conv2d_only.split(",") if p)
    convs = sorted(name for name in convs_as_2d(entry.model) if not prefixes or name.startswith(prefixes))
    if not convs and args.conv2d != "no":
        parser.error(f"--conv2d-only {args.conv2d_only!r} names no Conv1d of {args.model}")
    swaps = swaps_of(entry.model, swap_words)
    template = optimize_(entry.model, *entry.inputs, budget=1.0, loss_fn=entry.loss_fn, allow=("checkpoint",),
                         measure=False)
    del entry
    try:  # every plan read before anything is measured
        written = {text: parse_plan(text, len(template.items)) for text in [p.strip() for p in args.plans.split(";")]
                   if text}
    except ValueError as error:
        parser.error(str(error))

    layouts = {"no": [False], "yes": [True], "both": [False, True]}[args.conv2d]
    chunkings = {"eager": [False], "compiled": [True], "both": [False, True]}[args.chunks]
    runs = [(text, as_2d, compiled_chunks) for text in written for as_2d in layouts for compiled_chunks in chunkings]
    swapped = ",".join(swap_words)
    for round_ in range(args.rounds):
        for anchor in anchors:
            entry = zoo.get(args.model, size=args.size, device=args.device)
            measure(entry, ANCHORS[anchor](entry), row_for(anchor, entry, round=round_))
            del entry
            harness.free_between_rows()
        for text, as_2d, compiled_chunks in runs:
            segments = written[text]
            plan = dataclasses.replace(template, segments=segments, convs_2d=convs if as_2d else [],
                                       compiled=compiled_chunks, **{"pools": [], **swaps})
            entry = zoo.get(args.model, size=args.size, device=args.device)
            row = row_for("probe_compiled" + (f"_{mode.replace('-', '_')}" if mode else ""), entry,
                          plan=text, conv2d=(f"{len(convs)} convs" if prefixes else True) if as_2d else False,
                          compiled_chunks=compiled_chunks, compile_mode=args.compile_mode, swaps=swapped,
                          round=round_)
            try:
                apply_(entry.model, plan)
                harness.free_between_rows()  # a reset compiler: each plan compiles from scratch
                prepared = Prepared(entry.model, entry.inputs, entry.loss_fn,
                                    forward=torch.compile(entry.model, mode=mode),
                                    warmup_steps=strategies.compile_warmup(mode))
                measure(entry, prepared, row)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
                harness._append(out_csv, row, FIELDS)
                print(f"[plan_probe] {text} conv2d={as_2d} compiled_chunks={compiled_chunks}: out of memory",
                      flush=True)
            del entry
            harness.free_between_rows()


if __name__ == "__main__":
    main()
