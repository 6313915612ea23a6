"""Does a dilated Conv1d run faster as an undilated conv2d over its phases? GPU machine only.

A Conv1d of dilation d (stride 1) over a length L that d divides, padded by a multiple of d, is
the same sums of the same products as a conv2d with kernel (k, 1) and no dilation over the input
viewed (batch, channels, L / d, d): position t = m * d + r is row m, column r, and the taps
t - d, t, t + d are rows m - 1, m, m + 1 of the same column. The view costs nothing; whether
cuDNN's undilated kernels are faster than its dilated ones is what this measures:

1. per dilation, one convolution's forward and backward (eager), as it is and over its phases;
2. the zoo models with dilated convs (tcn, wavenet), eager and under torch.compile's default mode,
   as they are and with every dilated Conv1d computed over its phases, measured the harness's way,
   in alternating order (A B A B) so that the spread between two rows of one version shows;
3. a torch.profiler kernel table of one compiled step of each, to see where the time moves.

Versions are convmem's own (`conv_by_phases`, `Conv1dByPhases`); the rows of commits 4705c3d,
eea4805 and 0c67d79 came from an in-script prototype of the same view and conv2d (it ran the Conv1d
where the dilation did not divide the length, which no zoo length here is).

    python benchmarks/dilation_probe.py OUT_DIR [--models tcn,wavenet] [--repeats 7]
    python benchmarks/dilation_probe.py OUT_DIR --skip-micro --models conformer_conv --impls as_is,depthwise

``--impls depthwise`` measures the same way every depthwise Conv1d on convmem's Triton kernel
(NOTE [Depthwise under torch.compile]); ``--compile-mode reduce-overhead`` compiles with CUDA graphs,
where the kernel's host time would not count (the Conformer lead, docs/BENCHMARKS.md). ``--impls
matmul`` computes every Conv1d with few input channels as one matmul (Basenji's stem).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import harness  # noqa: E402
from kernel_profile import host_table, kernel_times  # noqa: E402
from strategies import Prepared  # noqa: E402

import convmem  # noqa: E402
from convmem import zoo  # noqa: E402
from convmem.nn.conv_as_2d import convs_as_2d  # noqa: E402
from convmem.nn.conv_as_matmul import convs_as_matmul  # noqa: E402
from convmem.nn.conv_phases import conv_by_phases, convs_by_phases  # noqa: E402
from convmem.strategies._common import swap_modules  # noqa: E402


class _ChannelsLastConv(nn.Module):
    """Prototype: a Conv1d as a conv2d whose input is laid out channels-last (NHWC, what cuDNN's
    Hopper kernels read), so that compiled, the kernel producing the input writes it that way."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        w4 = c.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        padding = c.padding if isinstance(c.padding, str) else (0, c.padding[0])
        return F.conv2d(x4, w4, c.bias, (1, c.stride[0]), padding, (1, c.dilation[0]), c.groups).squeeze(2)


def micro(rows, repeats: int) -> None:
    shapes = [("tcn", 4, 256, 256, 65536, 3, [1, 2, 4, 8, 16, 32, 64, 128], "same"),
              ("wavenet", 8, 128, 256, 16384, 2, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], "causal")]
    for model, batch, cin, cout, length, k, dilations, pad in shapes:
        for d in dilations:
            p = d * (k - 1) // 2 if pad == "same" else 0
            in_len = length if pad == "same" else length + d * (k - 1)
            x = torch.randn(batch, cin, in_len, device="cuda", requires_grad=True)
            w = torch.randn(cout, cin, k, device="cuda", requires_grad=True)
            b = torch.randn(cout, device="cuda", requires_grad=True)
            g = torch.randn(batch, cout, length, device="cuda")
            ref = F.conv1d(x.double(), w.double(), b.double(), 1, p, d)
            for impl in ("conv1d", "phases"):
                def forward():
                    return F.conv1d(x, w, b, 1, p, d) if impl == "conv1d" else conv_by_phases(x, w, b, d, p)

                def step():
                    y = forward()
                    y.backward(g)
                    return y
                with torch.no_grad():
                    y = forward()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                for _ in range(3):
                    step()
                times = harness.cuda_times(step, repeats)
                row = dict(section="micro", model=model, impl=impl, dilation=d, ms=round(statistics.median(times), 4),
                           ms_min=round(min(times), 4), ms_max=round(max(times), 4), rel_err=f"{err:.2e}")
                rows.append(row)
                print(row, flush=True)
                x.grad = w.grad = b.grad = None


def kernel_table(prepared, steps: int = 2, top: int = 20) -> str:
    """The step's GPU kernels by time (benchmarks/kernel_profile.py), as text."""
    totals = collections.Counter({name: us / 1e3 for name, us in kernel_times(prepared, steps).items()})
    lines = [f"  total {sum(totals.values()):8.2f} ms per step"]
    lines += [f"  {ms:8.2f} ms  {name[:110]}" for name, ms in totals.most_common(top)]
    return "\n".join(lines)


def _tower(conv: nn.Conv1d) -> bool:
    """An undilated Conv1d of kernel > 1 reading 8 channels or more: Basenji's tower, not its stem."""
    return conv.dilation[0] == 1 and conv.kernel_size[0] > 1 and conv.in_channels >= 8


# impl -> the modules it swaps in, by name (the layout lead of docs/BENCHMARKS.md for the conv2d ones)
SWAPS = {
    "phases": lambda model: convs_by_phases(model),
    "phases16": lambda model: {n: w for n, w in convs_by_phases(model).items() if w.wrapped.dilation[0] >= 16},
    "matmul": lambda model: convs_as_matmul(model),
    "conv2d": lambda model: convs_as_2d(model),
    "conv2d_undilated": lambda model: {n: w for n, w in convs_as_2d(model).items() if _tower(w.wrapped)},
    "nhwc_undilated": lambda model: {n: _ChannelsLastConv(w.wrapped) for n, w in convs_as_2d(model).items()
                                     if _tower(w.wrapped)},
}
IMPLS = ("as_is", "depthwise", *SWAPS)


def swap(model: nn.Module, impl: str) -> int:
    """`impl`'s modules swapped in; how many. "phases"/"phases16": the dilated Conv1ds (of dilation
    16 or more) by phases; "depthwise": every depthwise Conv1d on convmem's Triton kernel (`fuse_`
    without chains, pools or activations; compiled, NOTE [Depthwise under torch.compile]); "matmul":
    every Conv1d with few input channels as one matmul (NOTE [Conv1d as a matmul]); "conv2d": every
    Conv1d as a conv2d, "conv2d_undilated" those of the tower only (`_tower`), "nhwc_undilated" those
    on channels-last inputs (NOTE [Conv1d as conv2d under torch.compile])."""
    if impl == "as_is":
        return 0
    if impl == "depthwise":
        convmem.fuse_(model, activations=False, norm_act_conv=False, pools=False)
        return sum(type(m).__name__ == "FusedDepthwiseConv1d" for m in model.modules())
    swaps = SWAPS[impl](model)
    swap_modules(model, swaps)
    return len(swaps)


def models(rows, names, repeats: int, impls=("as_is", "phases", "phases16"), rounds: int = 2,
           compile_mode=None, host: bool = False) -> None:
    for name in names:
        tables = {}
        for round_ in range(rounds):
            for mode in ("eager", "compile") if round_ == 0 else ("compile",):
                for impl in impls:
                    entry = zoo.get(name, size="default", device="cuda")
                    swapped = swap(entry.model, impl)
                    torch._dynamo.utils.counters.clear()
                    forward = torch.compile(entry.model, mode=compile_mode) if mode == "compile" else entry.model
                    prepared = Prepared(entry.model, entry.inputs, entry.loss_fn, forward=forward,
                                        warmup_steps=3)
                    result = harness.measure_strategy(entry, prepared, repeats, torch.device("cuda"))
                    if round_ == 0 and mode == "compile":
                        tables[impl] = kernel_table(prepared)
                        if host:
                            tables[impl] += "\n" + host_table(prepared, steps=2, top=20)
                    row = dict(section="model", model=name, impl=impl, round=round_, swapped=swapped,
                               mode=mode + (f" {compile_mode}" if mode == "compile" and compile_mode else ""),
                               peak_gib=round(result["peak_bytes"] / 2**30, 4), ms=round(result["step_ms"], 3),
                               ms_min=round(result["step_ms_min"], 3), ms_max=round(result["step_ms_max"], 3))
                    if mode == "compile":  # a graph break would explain a slow compiled step
                        counters = torch._dynamo.utils.counters
                        row.update(graphs=counters["stats"]["unique_graphs"],
                                   graph_breaks=sum(counters["graph_break"].values()))
                    rows.append(row)
                    print(row, flush=True)
                    del entry, prepared, forward
                    harness.free_between_rows()
        for impl, table in tables.items():
            print(f"[{name} compiled, {impl}] kernels\n{table}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--models", default="tcn,wavenet")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--impls", default="as_is,phases,phases16", help=f"any of {','.join(IMPLS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile-mode", choices=("reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="compiled rows in this mode (reduce-overhead: CUDA graphs, their pool counts in the "
                             "peak; max-autotune-no-cudagraphs: Inductor times its Triton templates against "
                             "cuDNN per conv2d)")
    parser.add_argument("--host", action="store_true",
                        help="with each compiled kernel table, the ops taking the step's host time")
    args = parser.parse_args()
    unknown = [impl for impl in args.impls.split(",") if impl not in IMPLS]
    if unknown:
        parser.error(f"--impls {','.join(unknown)}: choose from {','.join(IMPLS)}")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    base = harness.row_base("dilation_probe", "default")
    try:
        if not args.skip_micro:
            micro(rows, 20)
        models(rows, [m for m in args.models.split(",") if m], args.repeats, args.impls.split(","), args.rounds,
               args.compile_mode, args.host)
    finally:
        harness.write_rows(os.path.join(args.out_dir, "dilation_probe.csv"), base, rows)


if __name__ == "__main__":
    main()
