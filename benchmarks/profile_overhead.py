"""How much convmem.profile's measured step costs over a plain step (hooks, events), fp32 and bf16.

Each variant runs two warm-up steps then three timed steps (CUDA events, median).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from harness import cuda_times  # noqa: E402

from convmem import zoo  # noqa: E402
from convmem.profile.recorder import StepRecorder  # noqa: E402


def main() -> int:
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(dtypes)
    for name in sys.argv[1].split(","):
        for dtype in (dtypes[d] for d in chosen):
            entry = zoo.get(name, size="default", device="cuda")
            resident = list(entry.model.parameters()) + list(entry.inputs)

            def step(recorder=None):
                entry.model.zero_grad(set_to_none=True)
                ctx = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
                with recorder if recorder is not None else contextlib.nullcontext():
                    with ctx:
                        loss = entry.loss_fn(entry.model(*entry.inputs))
                    loss.backward()

            results = {}
            for label, make in (
                ("plain", lambda: None),
                ("hooks", lambda: StepRecorder(entry.model, resident)),
                ("hooks+timing", lambda: StepRecorder(entry.model, resident, timer_device=torch.device("cuda"))),
            ):
                step(make())
                step(make())
                results[label] = statistics.median(cuda_times(lambda: step(make()), 3))
                print(f"  {name} {dtype} {label}: {results[label]:.1f} ms", flush=True)
            print(f"{name:15s} {str(dtype):15s} " + "  ".join(f"{k} {v:9.1f} ms" for k, v in results.items()), flush=True)
            entry = resident = None  # free this model before the cache is emptied (step reads entry)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
