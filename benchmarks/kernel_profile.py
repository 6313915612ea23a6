"""Where a step's GPU time goes, strategy against strategy: kernel times from torch.profiler.

For each named strategy of a bench (benchmarks/run.py) on one zoo model: prepare it the harness's
way, run its warm-up steps, then profile `--steps` steps and print the kernels by total GPU time,
per step, with the step's sum. Kernels whose per-step time differs most between the first strategy
and each other one are listed last: that is where a slower strategy spends its extra time.

    python benchmarks/kernel_profile.py compact_pools basenji compile_default,convmem_compact_pools_compiled
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import harness  # noqa: E402
from run import BENCHES  # noqa: E402

from convmem import zoo  # noqa: E402


def _profiled(prepared, steps: int, activity) -> torch.profiler.profile:
    """torch.profiler's record of `steps` steps of `prepared` after its warm-up, for `activity`."""
    for _ in range(getattr(prepared, "warmup_steps", 1)):
        prepared.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            prepared.step()
        torch.cuda.synchronize()
    return prof


def kernel_times(prepared, steps: int) -> Dict[str, float]:
    """Microseconds per step of every GPU kernel `prepared.step()` launches, by kernel name."""
    prof = _profiled(prepared, steps, torch.profiler.ProfilerActivity.CUDA)
    times = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += (getattr(event, "device_time", None) or event.cuda_time) / steps
    return dict(times)


def host_table(prepared, steps: int, top: int) -> str:
    """The ops that take a step's host (CPU) time, by self time per step, as torch.profiler's table:
    where a step the GPU waits for spends it (a compiled step's custom ops, say)."""
    prof = _profiled(prepared, steps, torch.profiler.ProfilerActivity.CPU)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("model", choices=zoo.names())
    p.add_argument("strategies", help="comma-separated strategies of the bench; the first is the baseline")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", help="write every kernel's time per strategy here")
    args = p.parse_args(argv)
    chosen, _ = BENCHES[args.bench]
    names = args.strategies.split(",")
    unknown = [n for n in names if n not in chosen]
    if unknown:
        p.error(f"not strategies of {args.bench}: {', '.join(unknown)}; it has {', '.join(chosen)}")
    if not torch.cuda.is_available():
        p.error("kernel times need a CUDA device")
    results = {}
    for name in names:
        harness.free_between_rows()
        entry = zoo.get(args.model, "default", device="cuda")
        prepared = chosen[name](entry)
        times = kernel_times(prepared, args.steps)
        results[name] = times
        print(f"\n== {args.model} {name}: {sum(times.values()) / 1e3:.2f} ms of kernels per step, "
              f"{len(times)} kernels")
        for kernel, us in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"{us / 1e3:9.3f} ms  {kernel[:110]}")
        del entry, prepared
    base = results[names[0]]
    for name in names[1:]:
        other = results[name]
        diff = {k: other.get(k, 0.0) - base.get(k, 0.0) for k in set(base) | set(other)}
        print(f"\n== {name} - {names[0]}: {sum(diff.values()) / 1e3:+.2f} ms; largest differences")
        for kernel, us in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
            print(f"{us / 1e3:+9.3f} ms  {kernel[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
