"""Exact length tiling on the GPU: the longest trainable input and hour-long inference.

    python benchmarks/tiling.py longest      # tcn, batch 4: eager's longest input vs tiled
    python benchmarks/tiling.py infer        # 1 hour of 16 kHz audio through tcn and hifigan

Rows go to benchmarks/results/tiling.csv (same columns as the harness). Memory is measured the
one way (harness.py); "throughput" is input samples per second of the no-grad forward.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from convmem import zoo  # noqa: E402
from convmem.nn.tiled import Tiled  # noqa: E402
from convmem.profile import max_input_length  # noqa: E402
from convmem.profile.measure import reset_cuda_peak  # noqa: E402
from convmem.strategies.infer import infer_tiled  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "tiling.csv")
DEVICE = torch.device("cuda")


def base_row(bench: str, model: str, strategy: str) -> dict:
    return dict(harness.row_base(bench, "custom"), model=model, strategy=strategy,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))


def train_step_peak(model, inputs, loss_fn) -> tuple:
    """(peak bytes, seconds) of one training step after one warm-up step."""
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(*inputs)).backward()

    step()
    reset_cuda_peak(DEVICE)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(DEVICE), time.perf_counter() - start


def record(row: dict) -> None:
    harness._append(RESULTS, row)
    print(harness._line(row), flush=True)  # the line ends with the note


def longest(tile_length: int, factor: int) -> None:
    """Eager's longest tcn input at batch 4 (estimated, then measured), and the tiled model at `factor` x."""
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    entry = zoo.get("tcn", size="default", device="meta")
    # Leave 3% of the card for the CUDA context and the allocator's own rounding.
    eager_len = max_input_length(entry.model, entry.inputs, int(total * 0.97), loss_fn=entry.loss_fn).samples
    for attempt in range(4):
        row = base_row("tiling_longest", "tcn", "eager_fp32")
        try:
            e = zoo.get("tcn", size="default", length=eager_len, device="cuda")
            peak, seconds = train_step_peak(e.model, e.inputs, e.loss_fn)
            row.update(status="ok", peak_bytes=peak, peak_gib=round(peak / 2**30, 3), step_ms=seconds * 1e3,
                       input_shape="x".join(map(str, e.inputs[0].shape)), batch=4,
                       note=f"longest eager input: {eager_len} samples ({eager_len / 16000:.1f} s at 16 kHz)")
            record(row)
            del e
            break
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom", note=f"{eager_len} samples")
            record(row)
            eager_len = int(eager_len * 0.95)
        finally:
            torch.cuda.empty_cache()
    tiled_len = eager_len * factor
    row = base_row("tiling_longest", "tcn", f"convmem_tiled_root_{tile_length}")
    try:
        e = zoo.get("tcn", size="default", length=tiled_len, device="cuda")
        model = Tiled(e.model, tile_length)
        peak, seconds = train_step_peak(model, e.inputs, e.loss_fn)
        row.update(status="ok", peak_bytes=peak, peak_gib=round(peak / 2**30, 3), step_ms=seconds * 1e3, batch=4,
                   input_shape="x".join(map(str, e.inputs[0].shape)),
                   note=f"{factor}x eager's longest: {tiled_len} samples ({tiled_len / 16000 / 60:.1f} min at 16 kHz)")
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom", note=f"{tiled_len} samples")
    record(row)


def infer(seconds_of_audio: int, tile_length: int, models=("tcn", "hifigan"), hifigan_frames=None) -> None:
    """infer_tiled over an hour of audio, input and output in pinned CPU memory, vs eager throughput."""
    samples = seconds_of_audio * 16000
    cases = {
        # tcn maps samples to samples; hifigan maps mel frames (hop 256) to samples.
        "tcn": (zoo.get("tcn", size="default", device="cuda").model, (1, 1, samples), 1),
        "hifigan": (zoo.get("hifigan", size="default", device="cuda").model, (1, 80, samples // 256), 256),
    }
    for name, (model, shape, hop) in cases.items():
        if name not in models:
            continue
        model.eval()
        x = torch.randn(shape).pin_memory()
        # Untiled throughput on a length that fits comfortably.
        fit = x[..., : (2**20 // hop)].to(DEVICE)
        with torch.no_grad():
            model(fit)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                model(fit)
            torch.cuda.synchronize()
        eager_rate = 3 * fit.shape[-1] * hop / (time.perf_counter() - start)
        row = base_row("tiling_infer", name, "eager_no_grad")
        row.update(status="ok", step_ms=(time.perf_counter() - start) / 3 * 1e3, input_shape="x".join(map(str, fit.shape)),
                   note=f"{eager_rate / 1e6:.2f} M output samples/s")
        record(row)
        del fit
        # tile_length counts the model's own input samples: mel frames for hifigan.
        tiles = hifigan_frames if hop > 1 and hifigan_frames else [max(tile_length // hop, 64)]
        for tile in tiles:
            for again in (False, True):  # the check on a prefix is made once per model and tiling
                reset_cuda_peak(DEVICE)
                start = time.perf_counter()
                y = infer_tiled(model, x, tile, progress=False)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated(DEVICE)
                rate = y.shape[-1] / elapsed
                row = base_row("tiling_infer", name, f"infer_tiled_{tile}" + ("_again" if again else ""))
                row.update(status="ok", peak_bytes=peak, peak_gib=round(peak / 2**30, 3), step_ms=elapsed * 1e3,
                           input_shape="x".join(map(str, x.shape)),
                           note=f"{y.shape[-1]} output samples ({y.shape[-1] / (16000 if hop == 1 else 22050) / 3600:.2f} h); "
                                f"{rate / 1e6:.2f} M samples/s = {rate / eager_rate:.0%} of eager; output on {y.device}"
                                + ("; a second call: verification reused" if again else ""))
                record(row)
                del y
        del model, x
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("longest", "infer"))
    p.add_argument("--tile-length", type=int, default=65536)
    p.add_argument("--factor", type=int, default=50)
    p.add_argument("--seconds", type=int, default=3600)
    p.add_argument("--models", default="tcn,hifigan")
    p.add_argument("--hifigan-frames", help="hifigan tiles in mel frames, comma-separated (default tile_length // 256)")
    args = p.parse_args()
    if args.what == "longest":
        longest(args.tile_length, args.factor)
    else:
        frames = [int(n) for n in args.hifigan_frames.split(",")] if args.hifigan_frames else None
        infer(args.seconds, args.tile_length, args.models.split(","), frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
