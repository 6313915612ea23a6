"""Run a named benchmark on the GPU machine: ``python benchmarks/run.py anchors [--models tcn,wavenet]``.

Rows are appended to ``benchmarks/results/<bench>.csv`` (or --out); see harness.py for how.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import strategies  # noqa: E402
from convmem import zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# name -> (strategies, strategies whose rows carry the no-GPU estimate)
BENCHES = {
    "anchors": (strategies.ANCHORS, ("eager_fp32", "bf16_autocast")),
    "compile": (strategies.COMPILE_ANCHORS, ()),
    "strategies": (strategies.CONVMEM, ()),
    "lossy": (strategies.LOSSY, ()),
    # torch.compile's CUDA graphs (mode="reduce-overhead") under convmem's checkpointing, against
    # compile's default mode: the launch-bound models' fastest configurations
    "graphed": ({
        "compile_default": strategies.COMPILE_ANCHORS["compile_default"],
        "compile_reduce_overhead": strategies.compiled(mode="reduce-overhead"),
        "convmem_selective_compiled": strategies.convmem_checkpoint("selective", compile_model=True),
        "convmem_selective_reduce_overhead": strategies.convmem_checkpoint(
            "selective", compile_model=True, compile_mode="reduce-overhead"),
        "convmem_full_reduce_overhead": strategies.convmem_checkpoint("full", compile_model=True,
                                                                      compile_mode="reduce-overhead"),
    }, ()),
    # selective under torch.compile with block outputs saved (the default) and left to the
    # partitioner (NOTE [Block outputs under torch.compile] in nn/checkpointed.py)
    "compiled_outputs": ({
        "eager_fp32": strategies.eager,
        "compile_default": strategies.COMPILE_ANCHORS["compile_default"],
        "convmem_selective_compiled": strategies.convmem_checkpoint("selective", compile_model=True),
        "convmem_selective_compiled_outputs_recomputed": strategies.convmem_checkpoint(
            "selective", compile_model=True, save_outputs_compiled=False),
    }, ()),
    # fuse_'s [BatchNorm ->] activation -> Conv1d chains in eager mode, against selective checkpointing
    # (NOTE [Norm-activation-conv chains] in nn/fused_norm_conv.py)
    "fused_chains": ({
        "eager_fp32": strategies.eager,
        "convmem_checkpoint_selective": strategies.convmem_checkpoint("selective"),
        "convmem_fused_chains": strategies.convmem_fused_chains,
    }, ()),
    # max-pools keeping int8 offsets in eager mode, against compile's default (Inductor lowers
    # max-pools to offsets itself): NOTE [Compact max-pool] in nn/compact_pool.py
    "compact_pools": ({
        "eager_fp32": strategies.eager,
        "convmem_compact_pools": strategies.with_compact_pools(strategies.eager),
        "compile_default": strategies.COMPILE_ANCHORS["compile_default"],
        # and under torch.compile, where Inductor lowers max-pools to offsets itself
        "convmem_compact_pools_compiled": strategies.with_compact_pools(strategies.compiled(None)),
        "compile_budget_0.5": strategies.COMPILE_ANCHORS["compile_budget_0.5"],
        "convmem_selective_compiled": strategies.convmem_checkpoint("selective", compile_model=True),
        "convmem_selective_compact_pools_compiled": strategies.with_compact_pools(
            strategies.convmem_checkpoint("selective", compile_model=True)),
        # selective blocks composed with Inductor's memory budget (a first run measured the two
        # rows above so, before the harness reset the budget between rows)
        "convmem_selective_compiled_budget_0.5": strategies.convmem_checkpoint(
            "selective", compile_model=True, inductor_budget=0.5),
        # the pools composed with Inductor's budget, alone and under selective blocks
        "convmem_compact_pools_compiled_budget_0.5": strategies.with_compact_pools(strategies.compiled(0.5)),
        "convmem_selective_compact_pools_compiled_budget_0.5": strategies.with_compact_pools(
            strategies.convmem_checkpoint("selective", compile_model=True, inductor_budget=0.5)),
    }, ("eager_fp32", "convmem_compact_pools")),
    # Conv1d run as conv2d under torch.compile, whose layout optimization is for conv2d alone
    "conv_layout": ({
        "compile_default": strategies.COMPILE_ANCHORS["compile_default"],
        "compile_convs_as_2d": strategies.with_convs_as_2d(strategies.compiled(None)),
        "eager_fp32": strategies.eager,
        "eager_convs_as_2d": strategies.with_convs_as_2d(strategies.eager),
    }, ()),
    # memory and time of tcn against tile length (docs/BENCHMARKS.md, "Exact length tiling")
    "tile_curve": ({
        "eager_fp32": strategies.eager,
        "convmem_tiled_model_4096_oldfwd": strategies.convmem_tiled_model(4096, forward_tile_length=4096),
        **{f"convmem_tiled_model_{n}": strategies.convmem_tiled_model(n) for n in (4096, 8192, 16384, 32768)},
        "convmem_tiled_model_8192_batch2": strategies.convmem_tiled_model(8192, batch_chunk=2),
        **{f"convmem_tiled_model_{n}_batch1": strategies.convmem_tiled_model(n, batch_chunk=1) for n in (16384, 21846)},
        "convmem_tile_8192": strategies.convmem_tile(8192),
        **{f"convmem_tiled_selective_{n}": strategies.convmem_tiled_model(n, selective=True) for n in (8192, 12288)},
        # NOTE [Graphed windows]: each window shape captured once in a CUDA graph, against the same without
        **{f"convmem_tiled_model_{n}_graphs": strategies.convmem_tiled_model(n, cuda_graphs=True) for n in (8192, 16384)},
        "convmem_tiled_model_21846_batch1_graphs": strategies.convmem_tiled_model(21846, batch_chunk=1, cuda_graphs=True),
        "convmem_tiled_selective_21846_batch1": strategies.convmem_tiled_model(
            21846, selective=True, batch_chunk=1, forward_tile_length=21846),
        "convmem_tiled_selective_21846_batch1_graphs": strategies.convmem_tiled_model(
            21846, selective=True, batch_chunk=1, forward_tile_length=21846, cuda_graphs=True),
        "convmem_tiled_selective_compiled_24576_batch1": strategies.convmem_tiled_model(
            24576, selective=True, compiled=True, batch_chunk=1, forward_tile_length=24576),
        **{f"convmem_tiled_selective_compiled_{n}_batch1_graphs": strategies.convmem_tiled_model(
            n, selective=True, compiled=True, batch_chunk=1, forward_tile_length=n, cuda_graphs=True)
           for n in (24576, 32768)},
        # half the blocks keep only their input, the other half their convolution outputs
        "convmem_tiled_mixed_compiled_32768_batch1_graphs": strategies.convmem_tiled_model(
            32768, selective=True, full_blocks=8, compiled=True, batch_chunk=1, forward_tile_length=32768,
            cuda_graphs=True),
        "convmem_tiled_full_compiled_32768_batch1_graphs": strategies.convmem_tiled_model(
            32768, full_blocks=16, compiled=True, batch_chunk=1, forward_tile_length=32768, cuda_graphs=True),
        "compile_default": strategies.COMPILE_ANCHORS["compile_default"],  # the untiled model compiled, same run
    }, ()),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("--models", default=",".join(zoo.names()))
    p.add_argument("--size", default="default", choices=("small", "default"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="CSV path (default benchmarks/results/<bench>.csv)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no row after this many seconds")
    p.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the harness")
    p.add_argument("--strategies", help="comma-separated subset of the bench's strategies")
    p.add_argument("--row-timeout-s", type=int, default=0, help="abandon a row after this many seconds")
    args = p.parse_args(argv)
    chosen, estimate_for = BENCHES[args.bench]
    if args.strategies:
        chosen = {k: v for k, v in chosen.items() if k in args.strategies.split(",")}
    out = args.out or os.path.join(RESULTS, f"{args.bench}.csv")
    harness.run(args.bench, args.models.split(","), chosen, out, size=args.size, repeats=args.repeats,
                estimate_for=estimate_for, budget_s=args.budget_s, device=args.device,
                row_timeout_s=args.row_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
