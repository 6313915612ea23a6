"""convmem.optimize_ on every zoo model against the anchors of the same run. GPU machine only.

    python benchmarks/optimize.py OUT_DIR [--models tcn,wavenet] [--anchors eager_fp32,...]
        [--budgets 0.75,0.5,0.35,0.25,0.1] [--match eager_fp32,torch_checkpoint_blocks,...]
        [--match-compiled eager_fp32,bf16_autocast] [--bf16 0.5] [--compiled 0.75,0.5] [--budget-s 500]

Per model, in one process on one card:

1. the anchors named in ``--anchors`` (benchmarks/strategies.py: eager, bf16 autocast,
   torch.utils.checkpoint per block, checkpoint_sequential, torch.compile with and without a memory
   budget), so that every plan is compared with baselines measured minutes apart on the same card;
2. a plan for each share of the eager fp32 peak in ``--budgets`` (every exact option), and the plan at
   the smallest feasible budget when one of them is infeasible ("convmem_plan_min", the low end of
   the frontier; ``--no-floor`` skips it);
3. a plan *at each anchor in* ``--match``: the budget is 99% of that anchor's measured peak, in the
   anchor's regime (a torch.compile anchor is met by a plan run under torch.compile, the bf16 autocast
   anchor by a plan under the same autocast; the rest in eager fp32). Its step time against the
   anchor's answers "does convmem do better at this anchor's memory?" directly: "convmem_at_<anchor>".
   ``--match-compiled`` does the same with the plan run under torch.compile, in the anchor's
   precision ("convmem_at_<anchor>_compiled"): an eager anchor met by a compiled plan;
4. plans under bf16 autocast (``--bf16``, shares of the eager fp32 peak) and plans run under
   torch.compile (``--compiled``; the options that act there: selective, checkpoint, and the
   model-wide "pool" and "conv2d"), judged by
   the compiled step's measured peak (``optimize_(..., compiled=True)``; with ``--compile-mode
   reduce-overhead`` or ``max-autotune-no-cudagraphs`` every compiled row is planned, judged and run
   in that mode, CUDA graphs' pool counted).

The planner's option costs are taken once per model and regime (its own timing on this card) and
reused for every budget (``costs=``). Rows go to OUT_DIR/optimize.csv with a ``regime`` column
(fp32, bf16, fp32+compile, bf16+compile); an infeasible budget is a row with status "infeasible"
and the smallest feasible budget in its note. `benchmarks/plot.py` draws the Pareto plots and
`benchmarks/report.py` the tables, dominance included.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import harness  # noqa: E402
import strategies  # noqa: E402
from strategies import Prepared  # noqa: E402

from convmem import InfeasibleBudget, optimize_, zoo  # noqa: E402
from convmem.plan.costs import OPTIONS  # noqa: E402

# "pool": max-pools compact (NOTE [Compact max-pools in plans]); "conv2d": Conv1ds as conv2d where the
# compiled step measures better so (NOTE [Conv layouts in compiled plans]); "chunk" and "offload" as
# eager islands where no fully compiled plan fits (NOTE [Eager islands in compiled plans]); "phases":
# dilated Conv1ds by phases, "depthwise": depthwise ones on convmem's kernel, "matmul": those with
# few input channels as one matmul, where each measures faster so (NOTE [Convs by phases in plans])
COMPILE_OPTIONS = ("selective", "checkpoint", "pool", "conv2d", "chunk", "offload", "phases", "depthwise",
                   "matmul")
FIELDS = harness.FIELDS + ["regime", "budget_bytes"]
ANCHORS = {**strategies.ANCHORS, **strategies.COMPILE_ANCHORS}
# what a row's note calls the modules a plan swaps, by Plan field (report.py brackets them): NOTE
# [Compact max-pools in plans], [Conv layouts in compiled plans], [Convs by phases in plans]
SWAP_LABELS = {"pools": "max-pools compact", "convs_2d": "Conv1d as conv2d", "convs_by_phases": "Conv1d by phases",
               "convs_depthwise": "Conv1d on the depthwise kernel", "convs_as_matmul": "Conv1d as a matmul"}
MATCH_SHARE = 0.99  # a matched plan's budget: this share of its anchor's measured peak (--match-share)


def regime_of(anchor: str, compiled: bool = False) -> str:
    """The regime in which a plan meets `anchor`: torch.compile anchors compiled, bf16 under autocast."""
    precision = "bf16" if "bf16" in anchor else "fp32"
    return precision + "+compile" if compiled or anchor.startswith("compile") else precision


def _row(base, model, strategy, entry, regime):
    return dict(base, model=model, strategy=strategy, regime=regime, batch=entry.inputs[0].shape[0],
                input_shape="x".join(str(n) for n in entry.inputs[0].shape),
                time=datetime.datetime.now().isoformat(timespec="seconds"))


def _emit(out_csv, row):
    harness._append(out_csv, row, FIELDS)
    print(harness._line(row), flush=True)


def _measure(entry, prepared, row, args, device):
    row.update(harness.measure_strategy(entry, prepared, args.repeats, device))
    if row["peak_bytes"] is None:  # off CUDA (a smoke test of this script): the estimate stands in
        row["peak_bytes"] = harness.estimate_step(entry.model, entry.inputs, entry.loss_fn,
                                                  autocast_dtype=prepared.autocast_dtype).peak_bytes
    row["peak_gib"] = round(row["peak_bytes"] / 2**30, 4)


def _timeout_inside(error: BaseException):
    """The TimeoutError that `error` was raised from, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TimeoutError):
            return error
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


def _guarded(row, work, *work_args):
    """Run `work(*work_args)`; a failure is recorded in the row (a failed row is data too)."""
    try:
        work(*work_args)
    except InfeasibleBudget as error:
        row["status"] = "infeasible"
        row["note"] = f"budget {row['budget_bytes']} B; smallest feasible {error.min_bytes} B"
        return error
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except TimeoutError as error:
        row["status"], row["note"] = "timeout", str(error)
    except Exception as error:
        timeout = _timeout_inside(error)  # the alarm inside a compilation comes back wrapped by Dynamo
        if timeout is not None:
            row["status"], row["note"] = "timeout", f"{timeout} (inside {type(error).__name__})"
            return None
        row["status"] = "error"
        row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        traceback.print_exc()
    finally:
        signal.alarm(0)
    return None


def bench_model(name, args, base, out_csv, deadline):
    device = torch.device(args.device)
    measured = {}  # anchor -> its row, this run

    for anchor in args.anchors:
        entry = zoo.get(name, size=args.size, device=args.device)
        row = _row(base, name, anchor, entry, regime_of(anchor))

        def work(entry):
            prepared = ANCHORS[anchor](entry)
            if prepared is None:
                row["status"] = "n/a"
                return
            _measure(entry, prepared, row, args, device)
            row["status"], row["note"] = "ok", prepared.note

        signal.alarm(args.row_timeout_s)
        _guarded(row, work, entry)
        _emit(out_csv, row)
        if row.get("status") == "ok":
            measured[anchor] = row
        del entry
        harness.free_between_rows()
    if "eager_fp32" not in measured:
        print(f"[optimize] {name}: no eager fp32 step measured; no plans", flush=True)
        return
    eager_peak = measured["eager_fp32"]["peak_bytes"]
    costs = {}  # (regime, allow) -> ChainCosts, measured once per model on this card
    floors = {}  # regime -> the smallest feasible budget an infeasible row named

    def plan_row(strategy, budget, regime):
        compiled, autocast = "compile" in regime, (torch.bfloat16 if "bf16" in regime else None)
        mode = args.compile_mode if compiled else None
        if mode:
            strategy += "_" + mode.replace("-", "_")  # beside, not in place of, the default mode's rows
        allow = (args.compiled_allow or COMPILE_OPTIONS) if compiled else OPTIONS
        entry = zoo.get(name, size=args.size, device=args.device)
        row = _row(base, name, strategy, entry, regime)
        row["budget_bytes"] = budget

        def work(entry):
            began = time.time()
            plan = optimize_(entry.model, *entry.inputs, budget=budget, loss_fn=entry.loss_fn, allow=allow,
                             autocast=autocast, compiled=mode or compiled, costs=costs.get((regime, allow)),
                             progress=args.progress)
            costs[(regime, allow)] = plan.costs
            planned_s = time.time() - began
            if compiled:
                # from a reset compiler: optimize_'s judged plans used up Dynamo's recompile limit
                # for this model's functions (NOTE [Plans for compiled models])
                harness.free_between_rows()
            forward = torch.compile(entry.model, mode=mode) if compiled else entry.model
            prepared = Prepared(entry.model, entry.inputs, entry.loss_fn, autocast_dtype=autocast, forward=forward,
                                warmup_steps=strategies.compile_warmup(mode))
            _measure(entry, prepared, row, args, device)
            row["status"] = "ok" if row["peak_bytes"] <= budget else "over"
            row["estimate_bytes"] = plan.estimated_peak_bytes
            row["estimate_error_pct"] = round((plan.estimated_peak_bytes - row["peak_bytes"]) / row["peak_bytes"] * 100, 2)
            labels = "+".join(f"{s.label}x{s.stop - s.start}" for s in plan.segments)
            swapped = plan.swapped_modules()
            labels += "".join(f"; {len(names)} {SWAP_LABELS[field]}" for field, names in swapped.items() if names)
            # what optimize_ measured when it judged the plan, beside this row's own measurement: on an
            # H200 the judging timed compiled plans 0.3-0.9 ms faster than their rows (runs 42, 43, 45 and
            # 46; 4-5 ms on host-bound convtasnet, runs 41 and 44), for reasons not yet traced
            judged = (f"judged {plan.measured_peak_bytes} B at {plan.measured_step_s * 1e3:.2f} ms; "
                      if plan.measured_step_s is not None else "")
            row["note"] = (f"budget {budget} B; predicted {plan.predicted_peak_bytes} B, extra "
                           f"{plan.predicted_extra_s * 1e3:.1f} ms ({plan.times}); {judged}planned in {planned_s:.0f} s; "
                           f"{labels}")
            print(plan.explain(), flush=True)

        signal.alarm(args.row_timeout_s)
        error = _guarded(row, work, entry)
        if error is not None:
            floors[regime] = error.min_bytes
        _emit(out_csv, row)
        del entry
        harness.free_between_rows()

    jobs = [(f"convmem_plan_{share:g}", int(share * eager_peak), "fp32") for share in args.budgets]
    jobs += [(f"convmem_at_{anchor}", int(args.match_share * measured[anchor]["peak_bytes"]), regime_of(anchor))
             for anchor in args.match if anchor in measured]
    jobs += [(f"convmem_at_{anchor}_compiled", int(args.match_share * measured[anchor]["peak_bytes"]),
              regime_of(anchor, True))
             for anchor in args.match_compiled if anchor in measured]
    jobs += [(f"convmem_plan_{share:g}_bf16", int(share * eager_peak), "bf16") for share in args.bf16]
    jobs += [(f"convmem_plan_{share:g}_compiled", int(share * eager_peak), "fp32+compile") for share in args.compiled]
    for index, (strategy, budget, regime) in enumerate(jobs):
        if time.time() > deadline:
            print(f"[optimize] time budget spent; skipping the rest of {name}", flush=True)
            return
        plan_row(strategy, budget, regime)
        if index == len(args.budgets) - 1 and args.floor and "fp32" in floors:
            # The least memory the planner reaches: a point of the frontier no share above gives.
            plan_row("convmem_plan_min", floors["fp32"], "fp32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--anchors", default=",".join(strategies.ANCHORS),
                        help=f"anchors to measure first, from {', '.join(ANCHORS)}")
    parser.add_argument("--budgets", default="0.75,0.5,0.35,0.25,0.1")
    parser.add_argument("--match", default="", help="anchors to plan at (99%% of their peak, in their regime)")
    parser.add_argument("--match-compiled", default="",
                        help="anchors to plan at with the plan under torch.compile, in the anchor's precision")
    parser.add_argument("--match-share", type=float, default=MATCH_SHARE,
                        help="a matched plan's budget as a share of its anchor's peak (in (0, 1]: less memory)")
    parser.add_argument("--bf16", default="", help="shares of the eager fp32 peak, planned under bf16 autocast")
    parser.add_argument("--compiled", default="", help="shares of the eager fp32 peak, planned for torch.compile")
    parser.add_argument("--compile-mode", choices=("reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="plan and run the compiled rows in this torch.compile mode (reduce-overhead: CUDA "
                             "graphs, the pool counts in the peak); their names end in the mode's name")
    parser.add_argument("--compiled-allow", default="",
                        help=f"the options compiled rows plan with (default {','.join(COMPILE_OPTIONS)}); leaving out "
                             "conv2d skips the two compilations that judge the layout where it is known to lose")
    parser.add_argument("--progress", action="store_true", help="print what optimize_ does (the plans it judges)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the plan at the smallest feasible budget (run when some budget is infeasible)")
    parser.add_argument("--size", default="default", help="zoo size; 'small' with --device cpu smoke-tests the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--row-timeout-s", type=int, default=150)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting rows after this")
    args = parser.parse_args(argv)
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    names = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    args.budgets, args.bf16, args.compiled = floats(args.budgets), floats(args.bf16), floats(args.compiled)
    args.anchors, args.match, args.match_compiled = names(args.anchors), names(args.match), names(args.match_compiled)
    args.compiled_allow = tuple(names(args.compiled_allow))
    if not 0 < args.match_share <= 1:
        parser.error(f"--match-share must be in (0, 1], got {args.match_share}")
    unknown = [a for a in args.anchors + args.match + args.match_compiled if a not in ANCHORS]
    if unknown:
        parser.error(f"unknown anchors {unknown}; the anchors are {list(ANCHORS)}")
    if "eager_fp32" not in args.anchors:
        args.anchors.insert(0, "eager_fp32")  # every share is of the eager peak of this run
    missing = [a for a in args.match + args.match_compiled if a not in args.anchors]
    if missing:
        parser.error(f"--match {missing}: measure them too (--anchors)")

    def _timeout(signum, frame):
        raise TimeoutError(f"row ran over {args.row_timeout_s} s")

    signal.signal(signal.SIGALRM, _timeout)
    base = harness.row_base("optimize", args.size)
    out_csv = os.path.join(args.out_dir, "optimize.csv")
    os.makedirs(args.out_dir, exist_ok=True)
    deadline = time.time() + args.budget_s
    for name in args.models.split(","):
        if time.time() > deadline:
            print("[optimize] time budget spent", flush=True)
            break
        try:
            bench_model(name, args, base, out_csv, deadline)
        except Exception:
            traceback.print_exc()
            harness.free_between_rows()


if __name__ == "__main__":
    main()
