"""Where a training step's time goes: GPU kernels against the host. GPU machine only.

    python benchmarks/host_time.py lengths [--model tcn]
    python benchmarks/host_time.py selective [--models resnet1d,basenji,hifigan]

``lengths``: a zoo model's training step at its default batch on several input lengths, and the
least-squares line ``step = fixed + per_sample * length`` through them. A tiled step pays the fixed
part once per window (docs/BENCHMARKS.md, "Exact length tiling"); lengths one and two samples apart
show what an unaligned length costs (NOTE [Aligned windows] in convmem/analysis/windows.py).

``selective``: per model, the eager step and ``convmem.checkpoint_`` with policy full and selective:
the step time (CUDA events), the host time of the step (wall clock around the call, which returns
once the last kernel is queued) and the sum of the step's GPU kernel times (torch.profiler). A step
whose host time is about its step time is launch-bound: time added on the host is time added to
the step.

Rows are appended to benchmarks/results/host_time.csv (the harness's columns; host and kernel
milliseconds in the note). Memory and step time are the harness's measurement (harness.measure_strategy).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import harness  # noqa: E402
from strategies import Prepared  # noqa: E402

import convmem  # noqa: E402
from convmem import zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "host_time.csv")
DEVICE = torch.device("cuda")
LENGTHS = (8702, 8704, 9212, 9216, 10240, 17408, 32768, 65536)


def measure(entry, prepared: Prepared, repeats: int = 5) -> dict:
    """The harness's peak and step times (harness.measure_strategy), the median host ms of a step
    and the kernel ms of one profiled step."""
    gc.collect()
    torch.cuda.empty_cache()
    result = harness.measure_strategy(entry, prepared, repeats, DEVICE)
    hosts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        prepared.step()
        hosts.append((time.perf_counter() - began) * 1e3)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prepared.step()
        torch.cuda.synchronize()
    # Self device time is the kernels' own (operators above them have none of their own).
    kernels = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in prof.key_averages())
    return dict(result, peak_gib=round(result["peak_bytes"] / 2**30, 4), repeats=repeats,
                host_ms=statistics.median(hosts), kernel_ms=kernels / 1e3)


def record(base: dict, model: str, strategy: str, inputs, result: dict, note: str = "") -> dict:
    row = dict(base, model=model, strategy=strategy, status="ok", batch=inputs[0].shape[0],
               input_shape="x".join(str(n) for n in inputs[0].shape), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
               **{k: v for k, v in result.items() if k in harness.FIELDS})
    row["note"] = f"host {result['host_ms']:.1f} ms; kernels {result['kernel_ms']:.1f} ms" + (f"; {note}" if note else "")
    harness._append(RESULTS, row)
    print(harness._line(row), flush=True)
    return row


def lengths(base: dict, name: str) -> None:
    entry = zoo.get(name, size="default", device="cuda")
    full = entry.inputs[0]
    points = []
    for length in LENGTHS:
        x = full[..., :length].contiguous()
        prepared = Prepared(entry.model, (x,), entry.loss_fn)
        result = measure(entry, prepared)
        points.append((length, result["step_ms"]))
        record(base, name, f"eager_length_{length}", (x,), result)
    n = len(points)
    mean_l = sum(p[0] for p in points) / n
    mean_t = sum(p[1] for p in points) / n
    slope = sum((l - mean_l) * (t - mean_t) for l, t in points) / sum((l - mean_l) ** 2 for l, _ in points)
    print(f"[host_time] {name}: step ~ {mean_t - slope * mean_l:.2f} ms + {slope * 1e3:.3f} us x length", flush=True)


def selective(base: dict, names) -> None:
    for name in names:
        entry = zoo.get(name, size="default", device="cuda")
        for policy in ("eager", "full", "selective"):
            model = entry.model if policy == "eager" else convmem.checkpoint_(copy.deepcopy(entry.model), policy=policy)
            prepared = Prepared(model, entry.inputs, entry.loss_fn)
            record(base, name, "eager_fp32" if policy == "eager" else f"convmem_checkpoint_{policy}", entry.inputs,
                   measure(entry, prepared))
            del model, prepared
            gc.collect()
            torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("lengths", "selective"))
    p.add_argument("--model", default="tcn")
    p.add_argument("--models", default="resnet1d,basenji,hifigan,conformer_conv,tcn")
    args = p.parse_args()
    base = harness.row_base(f"host_time_{args.what}", "default")
    if args.what == "lengths":
        lengths(base, args.model)
    else:
        selective(base, args.models.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
