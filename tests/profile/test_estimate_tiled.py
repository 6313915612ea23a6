"""The no-GPU estimate of tiled models against CUDA peaks measured on the GPU machine.

benchmarks/results/tile_curve.csv holds tcn (4 x 1 x 65536) measured on an H200 as
``convmem.nn.Tiled(model, T, ...)`` and ``convmem.tile_(model, T)``; the estimate is recomputed
here (as tests/profile/test_estimate_vs_measured.py does for the anchors). A `Tiled` module
analyses itself at its first call by tracing the module on the meta device at the input's full
length and twice that: the estimate once counted that trace as device memory and put the peak in
forward (2.8 GiB for tiles of 4096 against 1.03 measured; NOTE [The trace is not part of the step]
in analysis/trace.py).
"""
from __future__ import annotations

import csv
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import convmem
from convmem import zoo
from convmem.analysis import trace as _trace
from convmem.analysis.receptive_field import analyse
from convmem.profile import estimate_step
from convmem.profile.autocast_sim import SimulatedAutocast

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "tile_curve.csv")
# Graphed rows (their peak adds a CUDA-graph pool, reserved and fragmented as the allocator lays it
# out) and compiled rows (inductor decides what a window keeps) are outside what the estimate models.
ROWS = [r for r in csv.DictReader(open(RESULTS)) if r["status"] == "ok" and r["strategy"].startswith("convmem_")
        and "cuda_graphs=True" not in r["note"] and "compile(" not in r["note"]]
_TILED = re.compile(r"convmem_tiled_model_(\d+)(?:_(oldfwd|batch(\d+)))?$")
_TILE = re.compile(r"convmem_tile_(\d+)$")
_TILED_SELECTIVE = re.compile(r"convmem_tiled_selective_(\d+)(?:_batch(\d+))?$")


def _tiled_model(row, model):
    """The model of a tile_curve row, as benchmarks/run.py built it."""
    tiled = _TILED.match(row["strategy"])
    if tiled:
        tile, kind, chunk = int(tiled.group(1)), tiled.group(2), tiled.group(3)
        options = {}
        if kind == "oldfwd":
            options["forward_tile_length"] = tile
        elif chunk:
            options["batch_chunk"] = int(chunk)
        return convmem.nn.Tiled(model, tile, **options)
    selective = _TILED_SELECTIVE.match(row["strategy"])
    if selective:
        tile, chunk = int(selective.group(1)), selective.group(2)
        options = {"batch_chunk": int(chunk), "forward_tile_length": tile} if chunk else {}
        return convmem.nn.Tiled(convmem.checkpoint_(model, policy="selective"), tile, **options)
    tile = _TILE.match(row["strategy"])
    assert tile, f"tile_curve.csv row {row['strategy']!r}: no rule here to rebuild it"
    return convmem.tile_(model, int(tile.group(1)))


def test_the_measured_tile_lengths_are_all_here():
    assert {r["strategy"] for r in ROWS} >= {
        *(f"convmem_tiled_model_{n}" for n in (4096, 8192, 16384, 32768)),
        "convmem_tiled_model_8192_batch2", "convmem_tiled_model_16384_batch1", "convmem_tile_8192",
    }


# Rows the estimate misses, and what it says. With selective recompute inside the windows, backward's
# windows keep little and the forward's single no-grad window over the whole 65536 samples sets the
# estimate's peak: four full-length activations and 384 MiB of convolution workspace, 1.39 GiB
# against 1.32 GiB measured (which phase the GPU peaked in was not recorded).
_KNOWN_MISSES = {"convmem_tiled_selective_8192": "estimate +5.5%, its peak in the forward's full-length window"}


@pytest.mark.parametrize("row", [
    pytest.param(r, marks=pytest.mark.xfail(reason=_KNOWN_MISSES[r["strategy"]], strict=True))
    if r["strategy"] in _KNOWN_MISSES else r for r in ROWS
], ids=lambda r: f"{r['model']}-{r['strategy']}")
def test_tiled_estimate_within_5_percent_of_measured_peak(row):
    entry = zoo.get(row["model"], size=row["size"], device="meta")
    assert "x".join(str(n) for n in entry.inputs[0].shape) == row["input_shape"]
    estimate = estimate_step(_tiled_model(row, entry.model), entry.inputs, entry.loss_fn)
    measured = int(row["peak_bytes"])
    error = (estimate.peak_bytes - measured) / measured
    assert abs(error) < 0.05, (
        f"estimate {estimate.peak_bytes / 2**30:.4f} GiB ({estimate.peak_phase}, {estimate.peak_op}) vs measured "
        f"{measured / 2**30:.4f} GiB on {row['device']}: {error:+.1%}"
    )
    # A tiled step keeps nothing in forward; its peak is a backward window's recompute.
    assert estimate.peak_phase == "backward"


def test_the_length_analysis_is_not_recorded_as_module_calls():
    entry = zoo.get("tcn", size="small", device="meta")
    x = torch.empty(2, 1, 8192, device="meta")
    estimate = estimate_step(convmem.nn.Tiled(entry.model, 1024, forward_tile_length=1024), (x,), entry.loss_fn)
    stems = [c for c in estimate.calls if c.name == "wrapped.stem"]
    assert len(stems) > 2 and all(c.input_shapes[0][-1] < 8192 for c in stems)  # windows only, no trace


class _Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_the_trace_runs_outside_the_callers_modes():
    entry = zoo.get("tcn", size="small", device="meta")
    x = entry.inputs[0]
    with _Counting() as counting, SimulatedAutocast(torch.bfloat16) as autocast:
        assert not _trace.is_active()
        rf = analyse(entry.model, x, (), {}, -1)
        assert not _trace.is_active()
    assert rf.local
    assert counting.ops == 0 and not autocast._weight_cache


def test_tiled_backward_recomputes_under_the_simulated_autocast():
    # Tiled re-enters forward's autocast in backward; on the meta device that is the estimate's
    # simulated autocast. Without it the recompute ran in float32 and the estimate of a bf16 step
    # was about that of a float32 one. Measured on an H200 (tcn, tiles of 4096): 0.544 GiB in
    # bf16 against 1.033 GiB in float32; the estimate: 0.543 and 1.039.
    entry = zoo.get("tcn", size="default", device="meta")
    fp32 = estimate_step(convmem.nn.Tiled(entry.model, 4096), entry.inputs, entry.loss_fn)
    entry = zoo.get("tcn", size="default", device="meta")
    bf16 = estimate_step(convmem.nn.Tiled(entry.model, 4096), entry.inputs, entry.loss_fn,
                         autocast_dtype=torch.bfloat16)
    assert bf16.peak_phase == "backward"
    assert bf16.peak_bytes < 0.6 * fp32.peak_bytes
