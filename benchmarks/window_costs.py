"""Where a tiled tcn training step spends its time. GPU machine only.

    python benchmarks/window_costs.py kernels   # GPU kernel time of one step, by kernel
    python benchmarks/window_costs.py graphs    # CPU and GPU time, peak and graph pool, per config

`kernels` profiles one step (torch.profiler, CUDA activity) of eager tcn and of tiled tcn in a few
window shapes, and sums device time by kernel name: which kernels grow with the number of windows.
`graphs` runs each configuration of `CONFIGS` (benchmarks/strategies.py builds them as the
tile_curve bench does) and prints the median step time (CUDA events), the CPU time to issue a step
(wall clock before the device is synchronized), the allocator's peak, the CUDA-graph pool, and for
graphed configurations the captures and replays per step. docs/BENCHMARKS.md ("Exact length tiling")
quotes what it printed on an H200.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import strategies  # noqa: E402
from convmem import zoo  # noqa: E402
from convmem.profile.measure import graph_pool_bytes  # noqa: E402
from convmem.nn.tiled import Tiled  # noqa: E402

# name -> prepare(entry): the tiled configurations `graphs` compares, each with and without graphs
CONFIGS = {
    "tiled_8192": strategies.convmem_tiled_model(8192),
    "tiled_8192_graphs": strategies.convmem_tiled_model(8192, cuda_graphs=True),
    "tiled_21846_batch1": strategies.convmem_tiled_model(21846, batch_chunk=1),
    "tiled_21846_batch1_graphs": strategies.convmem_tiled_model(21846, batch_chunk=1, cuda_graphs=True),
    "selective_32768_batch1_graphs": strategies.convmem_tiled_model(
        32768, selective=True, batch_chunk=1, forward_tile_length=32768, cuda_graphs=True),
    "selective_compiled_32768_batch1_graphs": strategies.convmem_tiled_model(
        32768, selective=True, compiled=True, batch_chunk=1, forward_tile_length=32768, cuda_graphs=True),
    "mixed_compiled_32768_batch1_graphs": strategies.convmem_tiled_model(
        32768, selective=True, full_blocks=8, compiled=True, batch_chunk=1, forward_tile_length=32768,
        cuda_graphs=True),
}
# (tile_length, batch_chunk) of the tiled steps `kernels` profiles beside eager
KERNEL_TILES = ((16384, None), (32768, 1), (24576, 1))


def kernels(entry_of) -> None:
    from torch.profiler import ProfilerActivity, profile

    configs = [("eager", None)] + [(f"tiled {t}" + (f" batch_chunk={c}" if c else ""), (t, c)) for t, c in KERNEL_TILES]
    for name, tiling in configs:
        entry = entry_of()
        model = entry.model if tiling is None else Tiled(entry.model, tiling[0], batch_chunk=tiling[1],
                                                         forward_tile_length=tiling[0])
        prepared = strategies.Prepared(model, entry.inputs, entry.loss_fn)
        for _ in range(3):
            prepared.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prepared.step()
            torch.cuda.synchronize()
        by_name = collections.defaultdict(lambda: [0.0, 0])
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                by_name[event.name[:70]][0] += event.device_time_total
                by_name[event.name[:70]][1] += 1
        total = sum(us for us, _ in by_name.values()) / 1e3
        print(f"== {name}: kernels {total:.1f} ms in {sum(n for _, n in by_name.values())} launches", flush=True)
        for kernel, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]:
            print(f"   {us / 1e3:7.2f} ms {n:5d}x  {kernel}", flush=True)
        del entry, model, prepared
        gc.collect()
        torch.cuda.empty_cache()


def graphs(entry_of, repeats: int) -> None:
    for name, prepare in {"eager": strategies.eager, **CONFIGS}.items():
        entry = entry_of()
        print(f"{name}: {_probe(prepare(entry), repeats)}", flush=True)
        del entry
        harness.free_between_rows()


def _probe(prepared: strategies.Prepared, repeats: int) -> str:
    """One configuration's step time, CPU time to issue a step, peak, pool and graph counts."""
    tiled = prepared.model if isinstance(prepared.model, Tiled) else None
    for _ in range(prepared.warmup_steps + 1):  # graphs are captured in the second call
        prepared.step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    replays = tiled.graphs.replays if tiled is not None and tiled.graphs is not None else 0
    cpu_ms = []

    def step():
        began = time.perf_counter()
        prepared.step()
        cpu_ms.append((time.perf_counter() - began) * 1e3)

    times = harness.cuda_times(step, repeats)
    peak, pool = torch.cuda.max_memory_allocated(), graph_pool_bytes()
    extra = ""
    if tiled is not None and tiled.graphs is not None:
        extra = (f"; {tiled.graphs.captures} captures, {(tiled.graphs.replays - replays) / repeats:.0f} replays "
                 f"a step{', refused: ' + tiled.graphs.refused if tiled.graphs.refused else ''}")
    return (f"step {statistics.median(times):.1f} ms, CPU {statistics.median(cpu_ms):.1f} ms; allocated "
            f"{peak / 2**30:.3f} GiB + pool {pool / 2**30:.3f} GiB = {(peak + pool) / 2**30:.3f} GiB{extra}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("kernels", "graphs"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {harness.commit()}", flush=True)

    def entry_of():
        return zoo.get("tcn", "default", device="cuda")

    if args.what == "kernels":
        kernels(entry_of)
    else:
        graphs(entry_of, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
