"""The one benchmark harness: models x strategies x sizes -> rows in a CSV. GPU machine only.

A benchmark is declarative (STYLE.md, 6): it names zoo models, strategies (benchmarks/strategies.py)
and sizes; `run` measures each combination the one way and appends a row per combination with
the device, versions, commit and config. `benchmarks/plot.py` draws the PNGs from the CSVs.

Memory: one warm-up step, synchronize, collect, empty the cache, reset the peak, one step, read
``max_memory_allocated``, plus what CUDA-graph private pools reserve (a replay allocates nothing, so
the counter does not see it: NOTE [Graphed windows] in convmem/nn/_window_graphs.py). Time: the median of `repeats` further steps, each timed with CUDA
events. A training step is zero_grad(set_to_none) + forward + the zoo loss + backward (no
optimizer, so that every row shares the same resident memory).
"""
from __future__ import annotations

import csv
import datetime
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from convmem import zoo  # noqa: E402
from convmem.cli import environment  # noqa: E402
from convmem.profile import estimate_step  # noqa: E402
from convmem.profile.measure import graph_pool_bytes, reset_cuda_peak  # noqa: E402

FIELDS = [
    "bench", "model", "size", "strategy", "batch", "input_shape", "status", "peak_bytes", "peak_gib",
    "estimate_bytes", "estimate_error_pct", "step_ms", "step_ms_min", "step_ms_max", "repeats",
    "device", "torch", "cuda", "commit", "time", "note",
]


def commit() -> str:
    """The commit measured: $CONVMEM_COMMIT when set (the GPU machine's copy of the tree may carry a
    stale .git), else git's HEAD."""
    if os.environ.get("CONVMEM_COMMIT"):
        return os.environ["CONVMEM_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(__file__), stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("CONVMEM_COMMIT", "unknown")


def row_base(bench: str, size: str) -> Dict[str, str]:
    """The columns every row of one bench run shares: which bench, what size, on what, at which commit."""
    env = environment()
    return {"bench": bench, "size": size, "device": env["device"], "torch": env["torch"], "cuda": env["cuda"],
            "commit": commit()}


def free_between_rows() -> None:
    """What one row compiled, captured and allocated, given back before the next row is measured;
    and Inductor's activation memory budget, which the compile anchors set process-wide, back at
    its default (before this reset, a row compiled after a budget row ran under that budget)."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = 1.0
    torch._dynamo.reset()  # first: it drops CUDA graph trees, whose pools empty_cache can then give back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_times(fn: Callable[[], Any], repeats: int) -> List[float]:
    """Milliseconds of each of `repeats` calls of `fn`, timed by CUDA events around each."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure_strategy(entry: zoo.ZooEntry, prepared, repeats: int, device: torch.device) -> Dict[str, float]:
    """Peak bytes and step times of ``prepared.step()`` (see strategies.Prepared).

    Off CUDA (a smoke test of the harness itself) there is no peak and times are wall-clock.
    """
    cuda = device.type == "cuda"
    for _ in range(getattr(prepared, "warmup_steps", 1)):  # cuDNN plans, compilation, graph captures
        prepared.step()
    peak = None
    if cuda:
        reset_cuda_peak(device)
        prepared.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) + graph_pool_bytes()
    if cuda:
        times = cuda_times(prepared.step, repeats)
    else:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            prepared.step()
            times.append((time.perf_counter() - began) * 1e3)
    return {"peak_bytes": peak, "step_ms": statistics.median(times), "step_ms_min": min(times),
            "step_ms_max": max(times)}


def run(
    bench: str,
    models: Iterable[str],
    strategies: Dict[str, Callable],
    out_csv: str,
    size: str = "default",
    repeats: int = 5,
    estimate_for: Iterable[str] = (),
    entry_kwargs: Optional[Dict[str, dict]] = None,
    budget_s: float = float("inf"),
    device: str = "cuda",
    row_timeout_s: int = 0,
) -> List[dict]:
    """Measure every (model, strategy); append rows to `out_csv`; return them.

    `estimate_for` names strategies whose row also carries convmem's no-GPU estimate of the same
    step (eager fp32 and bf16 autocast). `budget_s` stops starting new rows after that many seconds;
    `row_timeout_s` (0: none) abandons a row that runs longer (status "timeout": a compile that takes
    minutes is a result too).
    """

    def _timeout(signum, frame):
        raise TimeoutError(f"row ran over {row_timeout_s} s")

    signal.signal(signal.SIGALRM, _timeout)
    base = row_base(bench, size)
    rows = []
    began = time.time()
    os.makedirs(os.path.dirname(out_csv) or ".", exist_ok=True)
    for name in models:
        for strategy, prepare in strategies.items():
            if time.time() - began > budget_s:
                print(f"[{bench}] time budget spent; skipping the rest", flush=True)
                return rows
            row = dict(base, model=name, strategy=strategy, time=datetime.datetime.now().isoformat(timespec="seconds"))
            entry = None
            prepared = None
            signal.alarm(row_timeout_s)
            try:
                entry = zoo.get(name, size=size, device=device, **(entry_kwargs or {}).get(name, {}))
                row["batch"] = entry.inputs[0].shape[0]
                row["input_shape"] = "x".join(str(n) for n in entry.inputs[0].shape)
                prepared = prepare(entry)
                if prepared is None:
                    row["status"] = "n/a"
                else:
                    row.update(measure_strategy(entry, prepared, repeats, torch.device(device)))
                    if row["peak_bytes"] is not None:
                        row["peak_gib"] = round(row["peak_bytes"] / 2**30, 4)
                    row["status"] = "ok"
                    row["note"] = getattr(prepared, "note", "")
                    if strategy in estimate_for and row["peak_bytes"]:
                        est = estimate_step(entry.model, entry.inputs, entry.loss_fn,
                                            autocast_dtype=getattr(prepared, "autocast_dtype", None))
                        row["estimate_bytes"] = est.peak_bytes
                        row["estimate_error_pct"] = round((est.peak_bytes - row["peak_bytes"]) / row["peak_bytes"] * 100, 2)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
            except TimeoutError as error:
                row["status"] = "timeout"
                row["note"] = str(error)
            except Exception as error:  # a failed row is data too; keep going
                row["status"] = "error"
                row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                traceback.print_exc()
            finally:
                signal.alarm(0)
                del entry, prepared
                free_between_rows()
            rows.append(row)
            _append(out_csv, row)
            print(_line(row), flush=True)
    return rows


def _append(path: str, row: dict, fields: List[str] = FIELDS) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_rows(path: str, base: dict, rows: List[dict]) -> None:
    """A probe's rows to a new CSV at `path`, each with `base` (the machine and commit) in front;
    the columns are base's, then every key of any row, sorted."""
    fields = list(base) + sorted({k for r in rows for k in r} - set(base))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**base, **row})


def _line(row: dict) -> str:
    peak = f"{row['peak_bytes'] / 2**30:8.3f} GiB" if row.get("peak_bytes") else f"{'':>12}"
    step = f"{row['step_ms']:9.2f} ms" if row.get("step_ms") else f"{'':>12}"
    est = f" est {row['estimate_error_pct']:+.1f}%" if row.get("estimate_error_pct") is not None else ""
    return f"[{row['bench']}] {row['model']:<15} {row['strategy']:<24} {row.get('status', ''):<6} {peak} {step}{est} {row.get('note', '')}"
