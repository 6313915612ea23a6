"""``make demo``: the main job, end to end, on whatever machine this is."""
from __future__ import annotations

import copy
import os
import warnings

import torch

from . import zoo
from ._units import format_bytes
from .profile import estimate_step, profile
from .strategies.checkpoint import checkpoint_


def run_demo(out_dir: str = "out", model: str = "tcn") -> int:
    """Profile a zoo model at its published training size and show where the memory goes."""
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    entry = zoo.get(model, size="default", device=device if device.type == "cuda" else "meta")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU here: a CUDA estimate"
    print(f"== convmem demo: {entry.name} ({entry.description}) — {where}\n")
    gpu_memory = None if device.type == "cuda" else "80GiB"
    prof = profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, gpu_memory=gpu_memory, sample_rate=entry.sample_rate)
    prof.model = f"zoo:{entry.name}"
    print(prof.table())
    path = prof.plot(os.path.join(out_dir, f"profile_{entry.name}.png"))
    print(f"\nplot: {path}")
    share = prof.estimate.kept_bytes / prof.estimate.peak_bytes
    print(
        f"\nKept activations are {share:.0%} of the peak ({format_bytes(prof.estimate.kept_bytes)}): "
        "that is what checkpointing and exact length tiling cut."
    )
    print("\nWhat the exact strategies do to the same step (no-GPU estimate of the CUDA peak):")
    for label, peak in _strategy_estimates(entry):
        print(f"  {label:<40} {format_bytes(peak):>11}  ({peak / prof.estimate.peak_bytes:.2f}x)")
    return 0


def _strategy_estimates(entry):
    """(label, estimated peak) of the zoo entry's step under each exact strategy (meta copies)."""
    meta = zoo.get(entry.name, size="default", device="meta")
    variants = [("eager", meta.model)]
    for policy in ("full", "selective"):
        model = copy.deepcopy(meta.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. selective falling back on an old PyTorch
            checkpoint_(model, policy=policy, example_inputs=meta.inputs)
        variants.append((f"convmem.checkpoint_(policy={policy!r})", model))
    for label, model in variants:
        yield label, estimate_step(model, meta.inputs, meta.loss_fn).peak_bytes
