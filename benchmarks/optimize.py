"""convmem.optimize_ on every zoo model: budgets as shares of the measured eager peak. GPU machine only.

    python benchmarks/optimize.py OUT_DIR [--models tcn,wavenet] [--budgets 0.5,0.25,0.1]
                                          [--sweep 0.75,0.35] [--compiled 0.5,0.25] [--budget-s 500]

Per model, in one process on one card: the eager fp32 step (the reference of this run), then a plan
for each budget (a share of that measured peak) applied to a fresh model and measured the one way
(`harness.measure_strategy`), then plans restricted to options torch.compile traces (selective,
checkpoint) run under ``torch.compile``. The planner's option costs are taken once per model (its
own timing on this card) and reused for every budget (``costs=``). Rows go to
OUT_DIR/optimize.csv; an infeasible budget is a row with status "infeasible" and the smallest
feasible budget in its note, and the plan at that smallest budget is measured too
("convmem_plan_min": the low end of the frontier; --no-floor skips it). `benchmarks/plot.py pareto` draws the plots with the anchors.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import signal
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import harness  # noqa: E402
from strategies import Prepared  # noqa: E402

from convmem import InfeasibleBudget, optimize_, zoo  # noqa: E402
from convmem.plan.costs import OPTIONS  # noqa: E402
from convmem.cli import environment  # noqa: E402

COMPILE_OPTIONS = ("selective", "checkpoint")


def _row(base, model, strategy, entry):
    return dict(base, model=model, strategy=strategy, batch=entry.inputs[0].shape[0],
                input_shape="x".join(str(n) for n in entry.inputs[0].shape),
                time=datetime.datetime.now().isoformat(timespec="seconds"))


def _emit(out_csv, row):
    harness._append(out_csv, row)
    print(harness._line(row), flush=True)


def _cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def bench_model(name, args, base, out_csv, deadline):
    device = torch.device(args.device)
    entry = zoo.get(name, size=args.size, device=args.device)
    row = _row(base, name, "eager_fp32", entry)
    row.update(harness.measure_strategy(entry, Prepared(entry.model, entry.inputs, entry.loss_fn), args.repeats, device))
    if row["peak_bytes"] is None:  # off CUDA (a smoke test of this script): the estimate stands in
        row["peak_bytes"] = harness.estimate_step(entry.model, entry.inputs, entry.loss_fn).peak_bytes
    row["status"], row["peak_gib"] = "ok", round(row["peak_bytes"] / 2**30, 4)
    _emit(out_csv, row)
    eager_peak = row["peak_bytes"]
    del entry
    _cleanup()

    costs = {}  # allow -> ChainCosts, measured once per model on this card
    floors = {}  # allow -> the smallest feasible budget an infeasible row named

    def plan_row(share, allow, compiled, budget=None, strategy=None):
        strategy = strategy or f"convmem_plan_{share:g}" + ("_compiled" if compiled else "")
        entry = zoo.get(name, size=args.size, device=args.device)
        row = _row(base, name, strategy, entry)
        budget = budget or int(share * eager_peak)
        signal.alarm(args.row_timeout_s)
        try:
            began = time.time()
            plan = optimize_(entry.model, *entry.inputs, budget=budget, loss_fn=entry.loss_fn, allow=allow,
                             costs=costs.get(allow))
            costs[allow] = plan.costs
            planned_s = time.time() - began
            forward = torch.compile(entry.model) if compiled else entry.model
            prepared = Prepared(entry.model, entry.inputs, entry.loss_fn, forward=forward)
            row.update(harness.measure_strategy(entry, prepared, args.repeats, device))
            if row["peak_bytes"] is None:  # off CUDA: the estimate stands in
                row["peak_bytes"] = plan.estimated_peak_bytes
            row["status"] = "ok" if row["peak_bytes"] <= budget else "over"
            row["peak_gib"] = round(row["peak_bytes"] / 2**30, 4)
            row["estimate_bytes"] = plan.estimated_peak_bytes
            row["estimate_error_pct"] = round((plan.estimated_peak_bytes - row["peak_bytes"]) / row["peak_bytes"] * 100, 2)
            labels = "+".join(f"{s.label}x{s.stop - s.start}" for s in plan.segments)
            row["note"] = (f"budget {budget} B; predicted {plan.predicted_peak_bytes} B, extra "
                           f"{plan.predicted_extra_s * 1e3:.1f} ms ({plan.times}); planned in {planned_s:.0f} s; {labels}")
            print(plan.explain(), flush=True)
        except InfeasibleBudget as error:
            row["status"] = "infeasible"
            row["note"] = f"budget {budget} B; smallest feasible {error.min_bytes} B"
            floors[allow] = error.min_bytes
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except TimeoutError as error:
            row["status"], row["note"] = "timeout", str(error)
        except Exception as error:  # a failed row is data too
            row["status"] = "error"
            row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            traceback.print_exc()
        finally:
            signal.alarm(0)
        _emit(out_csv, row)
        del entry
        _cleanup()

    full = OPTIONS  # every exact option
    for share in args.budgets + args.sweep:
        if time.time() > deadline:
            print(f"[optimize] time budget spent; skipping the rest of {name}", flush=True)
            return
        plan_row(share, full, compiled=False)
    if args.floor and full in floors and time.time() < deadline:
        # The least memory the planner reaches: a point of the frontier no share above gives.
        plan_row(floors[full] / eager_peak, full, compiled=False, budget=floors[full], strategy="convmem_plan_min")
    for share in args.compiled:
        if time.time() > deadline:
            return
        plan_row(share, COMPILE_OPTIONS, compiled=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--budgets", default="0.5,0.25,0.1")
    parser.add_argument("--sweep", default="0.75,0.35")
    parser.add_argument("--compiled", default="0.5,0.25")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the plan at the smallest feasible budget (run when some budget is infeasible)")
    parser.add_argument("--size", default="default", help="zoo size; 'small' with --device cpu smoke-tests the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--row-timeout-s", type=int, default=150)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting models after this")
    args = parser.parse_args(argv)
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    args.budgets, args.sweep, args.compiled = floats(args.budgets), floats(args.sweep), floats(args.compiled)

    def _timeout(signum, frame):
        raise TimeoutError(f"row ran over {args.row_timeout_s} s")

    signal.signal(signal.SIGALRM, _timeout)
    env = environment()
    base = {"bench": "optimize", "size": args.size, "device": env["device"], "torch": env["torch"],
            "cuda": env["cuda"], "commit": harness.commit()}
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
            _cleanup()


if __name__ == "__main__":
    main()
