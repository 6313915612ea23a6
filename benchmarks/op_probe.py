"""Scratch memory per aten op on CUDA: what tensors do not show (cuDNN/cuBLAS workspace, copies).

For every op of a zoo model's training step: reset the peak, run the op, and call
``max_memory_allocated - memory_allocated`` after it the op's scratch. Ops with more than 1 MiB
are printed; this is how `profile/workspace.py`'s model was calibrated.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from convmem import zoo  # noqa: E402
from convmem.profile.recorder import tensors_in  # noqa: E402


class ScratchProbe(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = func(*args, **(kwargs or {}))
        peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        scratch = peak - max(after, before)
        if scratch > 2**20:
            shapes = [tuple(t.shape) for t in tensors_in(args)]
            strides = [tuple(t.stride()) for t in tensors_in(args)]
            dtypes = sorted({str(t.dtype) for t in tensors_in(args)})
            nonargs = [a for a in args if not isinstance(a, torch.Tensor)]
            self.rows.append({"op": str(func), "shapes": shapes, "strides": strides, "dtypes": dtypes,
                              "args": repr(nonargs)[:200], "scratch": scratch,
                              "largest": max((t.numel() * t.element_size() for t in tensors_in(args) + tensors_in(out)), default=0)})
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(zoo.names()))
    p.add_argument("--out", default="op_probe.json")
    args = p.parse_args()
    results = {}
    for name in args.models.split(","):
        for autocast in (None, torch.bfloat16):
            entry = zoo.get(name, size="default", device="cuda")
            ctx = torch.autocast("cuda", dtype=autocast) if autocast else torch.autocast("cuda", enabled=False)
            for _ in range(2):  # the first step warms cuDNN plans up
                entry.model.zero_grad(set_to_none=True)
                probe = ScratchProbe()
                with probe:
                    with ctx:
                        loss = entry.loss_fn(entry.model(*entry.inputs))
                    loss.backward()
            key = f"{name}/{autocast}"
            results[key] = probe.rows
            summary = collections.Counter()
            for r in probe.rows:
                summary[(r["op"], r["scratch"], r["largest"])] += 1
            print(f"== {key}: {len(probe.rows)} ops with >1 MiB scratch")
            for (op, scratch, largest), n in sorted(summary.items(), key=lambda kv: -kv[0][1])[:8]:
                print(f"   {n:3d} x {op:45s} scratch {scratch/2**20:9.1f} MiB  largest operand {largest/2**20:9.1f} MiB")
            del entry
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
