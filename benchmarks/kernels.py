"""Fused depthwise conv kernels on the GPU: kernel sweep against PyTorch, and the zoo after fuse_.

    python benchmarks/kernels.py --out DIR            # copy, zoo, kernel (about 3 minutes on an H200)
    python benchmarks/kernels.py --out DIR --quick    # a few sizes, to check that it runs
    python benchmarks/kernels.py --out DIR --sections tune   # tile sizes and warps of the fused kernels

Sections (rows in DIR/kernels.csv, one table line printed per measurement):

* ``copy``: the card's device-to-device copy bandwidth (1 GiB ``copy_``, bytes read + written),
  the ceiling every achieved bandwidth below is a fraction of.
* ``kernel``: forward + backward of a depthwise conv followed by SiLU, PyTorch (``F.conv1d(groups=C)``
  then ``F.silu``) against `convmem.kernels.depthwise_conv1d`, for channels {256, 512, 1536},
  kernels {3, 4, 31, 64} ('same' padding), lengths {4096, 65536, 1048576}, float32 and bfloat16.
  The batch keeps every tensor near 2**28 elements (at least 1). Per row: the median time of a
  step (forward, then backward from a fixed random gradient) with CUDA events; the bytes autograd
  keeps between forward and backward (saved_tensors_hooks, distinct storages); the step's peak
  above the inputs; the achieved bandwidth, ``minimal bytes / time``, where minimal bytes are
  what any implementation must move -- forward reads x and writes y, backward reads x and
  grad_y and writes grad_x (the weights are negligible) -- and its fraction of the copy bandwidth;
  and the relative difference of the fused outputs and gradients from PyTorch's.
* ``host``: the host time of one small depthwise conv's forward and backward, PyTorch's against the
  fused kernels', and a cProfile of the fused calls (where a launch-bound step spends it).
* ``zoo``: conformer_conv and convtasnet at their default input, eager against the same model
  after ``convmem.fuse_``, float32 and bf16 autocast: training step time and peak memory, measured
  the one way (benchmarks/harness.py: warm-up, reset the peak, one step; median of CUDA-event
  timed steps).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402  (puts src/ on the path)
from convmem import zoo  # noqa: E402
from convmem.kernels import depthwise_conv1d  # noqa: E402
from convmem.profile.measure import reset_cuda_peak  # noqa: E402
from convmem.strategies.fuse import fuse_  # noqa: E402

DEVICE = torch.device("cuda")
FIELDS = [
    "section", "impl", "dtype", "channels", "kernel", "length", "batch", "activation", "status", "ms", "ms_min",
    "ms_max", "repeats", "kept_bytes", "peak_bytes", "min_bytes", "gbps", "copy_gbps", "frac_copy", "speedup",
    "err_y", "err_gx", "err_gw", "model", "device", "torch", "triton", "commit", "time", "note",
]
CHANNELS = (256, 512, 1536)
KERNELS = (3, 4, 31, 64)
LENGTHS = (4096, 65536, 1048576)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ELEMENTS = 2**28


def _timed(fn, repeats: int):
    times = harness.cuda_times(fn, repeats)
    return statistics.median(times), min(times), max(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**28, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms, _, _ = _timed(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _kept_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _pytorch(x, w, b, padding):
    return F.silu(F.conv1d(x, w, b, padding=padding, groups=x.shape[1]))


def _fused(x, w, b, padding):
    return depthwise_conv1d(x, w, b, padding=padding, activation="silu")


def kernel_rows(base, copy_bps, quick: bool, budget_s: float, out_csv: str):
    began = time.time()
    sizes = [(c, k, n) for c in CHANNELS for k in KERNELS for n in LENGTHS]
    if quick:
        sizes = [(256, 3, 65536), (512, 31, 4096), (1536, 64, 1048576)]
    for channels, kernel, length in sizes:
        for dtype_name, dtype in DTYPES.items():
            if time.time() - began > budget_s:
                print(f"[kernel] time budget of {budget_s:.0f} s spent; skipping {dtype_name} C={channels} "
                      f"K={kernel} L={length}", flush=True)
                continue
            batch = max(1, ELEMENTS // (channels * length))
            common = dict(base, section="kernel", dtype=dtype_name, channels=channels, kernel=kernel, length=length,
                          batch=batch, activation="silu")
            try:
                rows = _measure_kernel(common, dtype, copy_bps)
            except torch.cuda.OutOfMemoryError:
                rows = [dict(common, impl=impl, status="oom") for impl in ("pytorch", "convmem")]
            gc.collect()
            torch.cuda.empty_cache()
            for row in rows:
                _append(out_csv, row)
            _print_pair(rows)


def _measure_kernel(common, dtype, copy_bps):
    channels, kernel, length, batch = common["channels"], common["kernel"], common["length"], common["batch"]
    padding = "same"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, channels, length, device=DEVICE, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(channels, 1, kernel, device=DEVICE, generator=gen) / kernel**0.5).to(dtype).requires_grad_()
    b = torch.randn(channels, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(batch, channels, length, device=DEVICE, dtype=dtype, generator=gen)
    element = x.element_size()
    min_bytes = 5 * x.numel() * element  # fwd: read x, write y; bwd: read x, read grad_y, write grad_x
    results = {}
    rows = []
    for impl, fn in (("convmem", _fused), ("pytorch", _pytorch)):
        def step():
            x.grad = w.grad = b.grad = None
            fn(x, w, b, padding).backward(g)

        step()  # warm-up: compilation, cuDNN plans
        torch.cuda.synchronize()
        results[impl] = (fn(x, w, b, padding).detach(), x.grad.detach().clone(), w.grad.detach().clone())
        kept = _kept_bytes(lambda: fn(x, w, b, padding))
        reset_cuda_peak(DEVICE)
        base_alloc = torch.cuda.memory_allocated(DEVICE)
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(DEVICE) - base_alloc
        first, _, _ = _timed(step, 1)
        repeats = int(min(20, max(3, 150 / max(first, 1e-3))))
        ms, ms_min, ms_max = _timed(step, repeats)
        gbps = min_bytes / (ms * 1e-3) / 1e9
        rows.append(dict(common, impl=impl, status="ok", ms=round(ms, 4), ms_min=round(ms_min, 4),
                         ms_max=round(ms_max, 4), repeats=repeats, kept_bytes=kept, peak_bytes=peak,
                         min_bytes=min_bytes, gbps=round(gbps, 1), copy_gbps=round(copy_bps / 1e9, 1),
                         frac_copy=round(gbps * 1e9 / copy_bps, 3)))
        x.grad = w.grad = b.grad = None
    fused, pytorch = rows
    fused["speedup"] = round(pytorch["ms"] / fused["ms"], 3)
    ours, theirs = results["convmem"], results["pytorch"]
    fused["err_y"], fused["err_gx"], fused["err_gw"] = (round(_rel(a, e), 8) for a, e in zip(ours, theirs))
    return [pytorch, fused]


def tune_rows(base, copy_bps, out_csv: str):
    """Fused step time for other tile sizes and warps (convmem.kernels.depthwise._TUNING)."""
    from convmem.kernels import depthwise as dw

    default = dict(dw._TUNING)
    channels, length, batch = 512, 65536, 8
    for kernel in (3, 31, 64):
        for dtype_name, dtype in DTYPES.items():
            x = torch.randn(batch, channels, length, device=DEVICE, dtype=dtype).requires_grad_()
            w = torch.randn(channels, 1, kernel, device=DEVICE, dtype=dtype).requires_grad_()
            b = torch.randn(channels, device=DEVICE, dtype=dtype).requires_grad_()
            g = torch.randn_like(x)
            min_bytes = 5 * x.numel() * x.element_size()
            for tile, warps in ((2048, 4), (4096, 4), (8192, 4), (4096, 8), (8192, 8), (16384, 8)):
                dw._TUNING.update(tile=tile, warps=warps)

                def step():
                    x.grad = w.grad = b.grad = None
                    _fused(x, w, b, "same").backward(g)

                def forward():
                    with torch.no_grad():
                        _fused(x, w, b, "same")

                step()
                forward()
                ms, _, _ = _timed(step, 5)
                fwd_ms, _, _ = _timed(forward, 5)
                gbps = min_bytes / (ms * 1e-3) / 1e9
                row = dict(base, section="tune", impl=f"convmem_tile{tile}_warps{warps}", dtype=dtype_name,
                           channels=channels, kernel=kernel, length=length, batch=batch, activation="silu",
                           status="ok", ms=round(ms, 4), gbps=round(gbps, 1), copy_gbps=round(copy_bps / 1e9, 1),
                           frac_copy=round(gbps * 1e9 / copy_bps, 3), note=f"forward alone {fwd_ms:.3f} ms")
                _append(out_csv, row)
                print(f"[tune] {dtype_name} K={kernel:<2} tile {tile:<5} warps {warps}: step {ms:8.3f} ms "
                      f"(forward {fwd_ms:7.3f} ms) {100 * row['frac_copy']:5.1f}% of copy", flush=True)
            x = w = b = g = None  # free this size's tensors before the cache is emptied (the closures above read them)
            torch.cuda.empty_cache()
    dw._TUNING.update(default)


def _print_pair(rows):
    pytorch, fused = rows
    head = (f"[kernel] {fused['dtype']} C={fused['channels']:<4} K={fused['kernel']:<2} L={fused['length']:<7} "
            f"B={fused['batch']:<3}")
    if fused.get("status") != "ok" or pytorch.get("status") != "ok":
        print(f"{head} pytorch {pytorch.get('status')} convmem {fused.get('status')}", flush=True)
        return
    print(f"{head} pytorch {pytorch['ms']:9.3f} ms kept {pytorch['kept_bytes'] / 2**20:8.0f} MiB | convmem "
          f"{fused['ms']:9.3f} ms kept {fused['kept_bytes'] / 2**20:8.0f} MiB | {fused['speedup']:5.2f}x | "
          f"{fused['gbps']:6.0f} GB/s = {100 * fused['frac_copy']:4.1f}% of copy (pytorch "
          f"{100 * pytorch['frac_copy']:4.1f}%) | diff y {fused['err_y']:.1e} gx {fused['err_gx']:.1e} "
          f"gw {fused['err_gw']:.1e}", flush=True)


class _Step:
    def __init__(self, entry, autocast):
        self.entry, self.autocast = entry, autocast

    def step(self):
        model = self.entry.model
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.entry.loss_fn(model(*self.entry.inputs))
        loss.backward()


def zoo_rows(base, repeats: int, out_csv: str):
    for name in ("conformer_conv", "convtasnet"):
        for precision, autocast in (("fp32", False), ("bf16_autocast", True)):
            entry = zoo.get(name, size="default", device="cuda")
            shape = "x".join(str(n) for n in entry.inputs[0].shape)
            for impl in ("eager", "fuse_"):
                if impl == "fuse_":
                    fuse_(entry.model, norm_act_conv=False, pools=False)  # the depthwise kernel's effect alone
                row = dict(base, section="zoo", model=name, impl=impl, dtype=precision, batch=entry.inputs[0].shape[0],
                           length=entry.inputs[0].shape[-1], note=f"input {shape}")
                try:
                    row.update(harness.measure_strategy(entry, _Step(entry, autocast), repeats, DEVICE))
                    row["status"] = "ok"
                    row["ms"] = round(row.pop("step_ms"), 3)
                    row["ms_min"], row["ms_max"] = round(row.pop("step_ms_min"), 3), round(row.pop("step_ms_max"), 3)
                    row["repeats"] = repeats
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                _append(out_csv, row)
                if row["status"] == "ok":
                    print(f"[zoo] {name:<15} {precision:<13} {impl:<6} {row['ms']:9.2f} ms  peak "
                          f"{row['peak_bytes'] / 2**30:7.3f} GiB", flush=True)
                else:
                    print(f"[zoo] {name:<15} {precision:<13} {impl:<6} {row['status']}", flush=True)
            del entry
            gc.collect()
            torch.cuda.empty_cache()


def host_rows(base, out_csv: str, calls: int = 300) -> None:
    """Host microseconds of one forward + backward: a tensor so small that the GPU waits for the
    host, so that the wall clock of `calls` of them (synchronized once, at the end) is host time;
    then a cProfile of the fused one's calls, by own time, to show where that time goes."""
    import cProfile
    import pstats

    x = torch.randn(1, 256, 256, device=DEVICE, requires_grad=True)
    w = torch.randn(256, 1, 31, device=DEVICE, requires_grad=True)
    b = torch.randn(256, device=DEVICE, requires_grad=True)
    impls = {"pytorch": lambda: F.conv1d(x, w, b, padding=15, groups=256),
             "fused": lambda: depthwise_conv1d(x, w, b, padding=15)}

    def steps(fn, n):
        for _ in range(n):
            fn().sum().backward()

    for impl, fn in impls.items():
        steps(fn, 10)
        torch.cuda.synchronize()
        began = time.perf_counter()
        steps(fn, calls)
        torch.cuda.synchronize()
        us = (time.perf_counter() - began) / calls * 1e6
        print(f"[host] {impl}: {us:.1f} us of host time per forward + backward (with .sum())", flush=True)
        _append(out_csv, dict(base, section="host", impl=impl, dtype="fp32", channels=256, kernel=31, length=256,
                              batch=1, status="ok", ms=round(us / 1e3, 4), repeats=calls,
                              note="host time per forward+backward, wall clock / calls"))
    profiler = cProfile.Profile()
    profiler.enable()
    steps(impls["fused"], 100)
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _append(path: str, row: dict) -> None:
    harness._append(path, row, FIELDS)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")),
                   help="folder for kernels.csv (default $OUT, else benchmarks/results)")
    p.add_argument("--sections", default="copy,zoo,kernel", help="any of copy,zoo,kernel,tune,host")
    p.add_argument("--quick", action="store_true", help="three sizes only")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting kernel rows after this many seconds")
    p.add_argument("--zoo-repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    out_csv = os.path.join(args.out, "kernels.csv")
    env = harness.environment()
    base = {"device": env["device"], "torch": env["torch"], "triton": env.get("triton"), "commit": harness.commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"[env] {env['device']} torch {env['torch']} triton {env.get('triton')} cuda {env['cuda']}", flush=True)
    sections = set(args.sections.split(","))
    copy_bps = copy_bandwidth()
    _append(out_csv, dict(base, section="copy", impl="copy_", dtype="fp32", status="ok",
                          copy_gbps=round(copy_bps / 1e9, 1), min_bytes=2 * 2**30))
    print(f"[copy] device-to-device copy: {copy_bps / 1e9:.0f} GB/s (bytes read + written)", flush=True)
    if "zoo" in sections:
        zoo_rows(base, args.zoo_repeats, out_csv)
    if "kernel" in sections:
        kernel_rows(base, copy_bps, args.quick, args.budget_s, out_csv)
    if "tune" in sections:
        tune_rows(base, copy_bps, out_csv)
    if "host" in sections:
        host_rows(base, out_csv)
    print(f"[done] rows in {out_csv}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
