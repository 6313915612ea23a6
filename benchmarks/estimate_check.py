"""Estimate vs CUDA allocator, model by model: `convmem.profile` on the GPU, JSON per model.

Where the estimate misses, this says in which part: saved bytes (what autograd keeps, measured by
the same hooks on the real run) or the rest (transient, workspace, rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from convmem import profile, zoo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(zoo.names()))
    p.add_argument("--out", default="estimate_check.json")
    args = p.parse_args(argv)
    results = []
    for name in args.models.split(","):
        for autocast in (None, torch.bfloat16):
            entry = zoo.get(name, size="default", device="cuda")
            prof = profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, autocast=autocast)
            d = prof.to_dict()
            d.pop("rows")
            d["model"] = name
            results.append(d)
            m, e = d["measured"], d["estimate"]
            print(f"{name:15s} {str(autocast):15s} measured {m['peak_bytes']/2**30:7.3f} GiB est {e['peak_bytes']/2**30:7.3f} "
                  f"({(e['peak_bytes']-m['peak_bytes'])/m['peak_bytes']*100:+.1f}%) saved meas {m['saved_bytes']/2**30:.3f} "
                  f"est {e['saved_bytes']/2**30:.3f} start {m['start_bytes']/2**30:.3f} step {m['step_s']*1e3:.1f} ms "
                  f"peak@{e['peak_phase']}:{e['peak_op']}", flush=True)
            del entry, prof
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
