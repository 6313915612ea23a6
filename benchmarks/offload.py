"""Offloading saved tensors to host memory on the GPU: peak memory and step time against eager.

    python benchmarks/offload.py benchmarks/results/offload.csv [model ...]

For tcn, wavenet and resnet1d at their default size (or the models named), one row per model and
strategy through the one harness (harness.py: warm-up, reset the peak, one step for
``max_memory_allocated``, then the median of 5 steps timed with CUDA events). Strategies: eager
fp32, and ``convmem.offload_`` on all repeated blocks (min_bytes 1 MiB, prefetch 1). Rows are
appended to the CSV given as the first argument; a summary table is printed at the end. Memory in
GiB (2**30 bytes).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import harness  # noqa: E402  (puts src/ on the path)
from strategies import Prepared, eager  # noqa: E402

MODELS = ("tcn", "wavenet", "resnet1d")


class _OffloadedStep(Prepared):
    """A Prepared step whose note reports what one step moved to the host."""

    def __init__(self, entry, group, blocks: int):
        super().__init__(entry.model, entry.inputs, entry.loss_fn)
        self.group = group
        self.blocks = blocks
        self.steps = 0

    def step(self) -> None:
        super().step()
        self.steps += 1

    @property
    def note(self) -> str:
        per_step = self.group.bytes_offloaded / max(self.steps, 1) / 2**30
        return f"{self.blocks} blocks offloaded; {per_step:.3f} GiB to host per step"

    @note.setter
    def note(self, value) -> None:  # Prepared.__init__ sets it
        pass


def offload(entry):
    import convmem
    from convmem.nn import Offloaded

    convmem.offload_(entry.model)
    wrappers = [m for m in entry.model.modules() if isinstance(m, Offloaded)]
    if not wrappers:
        return None
    return _OffloadedStep(entry, wrappers[0].group, len(wrappers))


STRATEGIES = {"eager_fp32": eager, "convmem_offload": offload}


def summary(rows) -> str:
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["strategy"]] = row
    lines = [f"{'model':<10} {'eager GiB':>10} {'offload GiB':>12} {'saved':>7} {'eager ms':>9} {'offload ms':>11} {'slowdown':>9}"]
    for model, rows_ in by_model.items():
        e, o = rows_.get("eager_fp32", {}), rows_.get("convmem_offload", {})
        ep, op = e.get("peak_bytes"), o.get("peak_bytes")
        et, ot = e.get("step_ms"), o.get("step_ms")
        lines.append(
            f"{model:<10} "
            f"{(f'{ep / 2**30:.3f}' if ep else e.get('status', '-')):>10} "
            f"{(f'{op / 2**30:.3f}' if op else o.get('status', '-')):>12} "
            f"{(f'{(1 - op / ep) * 100:.0f}%' if ep and op else '-'):>7} "
            f"{(f'{et:.1f}' if et else '-'):>9} "
            f"{(f'{ot:.1f}' if ot else '-'):>11} "
            f"{(f'{ot / et:.2f}x' if et and ot else '-'):>9}"
        )
    return "\n".join(lines)


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    if not torch.cuda.is_available():
        print("benchmarks/offload.py needs a CUDA device")
        return 1
    out_csv, models = argv[1], tuple(argv[2:]) or MODELS
    rows = harness.run("offload", models, STRATEGIES, out_csv, size="default", repeats=5, row_timeout_s=300)
    device = torch.cuda.get_device_name()
    print(f"\noffload vs eager on {device} (peaks: max_memory_allocated, GiB = 2**30 bytes; times: median of 5)")
    print(summary(rows))
    return 0 if all(row.get("status") == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
