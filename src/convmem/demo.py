"""``make demo``: the main job, end to end, on whatever machine this is.

Profile a zoo model at its training size, plan its training step to a memory budget with
`convmem.optimize_`, verify on a small float64 copy that the plan changes no number, compare the
step before and after (measured on a GPU, the no-GPU estimate otherwise), explain the plan and plot
it. `convmem optimize` shares the pieces: `verify_plan`, `plot_plan`, `before_after`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import zoo
from ._metrics import relative_error
from ._units import format_bytes
from .plan import Plan, apply_
from .profile import profile
from .profile.step import default_loss
from .strategies.optimize import InfeasibleBudget, optimize_

__all__ = ["run_demo", "verify_plan", "Verification", "plot_plan", "before_after"]

EXACT_TOLERANCE = 1e-10  # STYLE.md 3: exact strategies, float64 on the CPU


# ------------------------------------------------------------------------------ verification


@dataclasses.dataclass
class Verification:
    """The plan on a small float64 copy of a zoo model against the untouched model, one step."""

    model: str
    input_shape: Tuple[int, ...]
    tensors: int  # output, input gradients, parameter gradients and buffers compared
    max_error: float  # largest relative error among them
    worst: str  # which tensor it was
    seconds: float
    tolerance: float = EXACT_TOLERANCE
    note: str = ""

    @property
    def exact(self) -> bool:
        return self.max_error < self.tolerance

    def summary(self) -> str:
        verdict = "exact" if self.exact else "NOT EXACT"
        error = "0 (bitwise equal)" if self.max_error == 0 else f"{self.max_error:.2e} ({self.worst})"
        shape = " x ".join(str(n) for n in self.input_shape)
        text = (f"{verdict}: output, every gradient and buffer of zoo:{self.model} at {shape}, float64 on the CPU "
                f"({self.tensors} tensors, {self.seconds:.1f} s)\n  max relative error {error}, tolerance "
                f"{self.tolerance:.0e}")
        return text + (f"\n  note: {self.note}" if self.note else "")


def verify_plan(name: str, plan: Plan, tolerance: float = EXACT_TOLERANCE, seed: int = 0) -> Verification:
    """Apply `plan` to zoo model `name` at size "small" in float64 on the CPU and compare one training
    step with the untouched model: output, input gradients, every parameter gradient (matched by
    state_dict key, which wrappers keep) and every buffer after the step (BatchNorm statistics).

    Plans name their blocks, so a plan made at the training size applies to the same model at any
    length; its tile lengths are scaled to the small input (`_tiles_scaled`), so tiled parts run in
    several windows with their halos here too (NOTE [Tiled autograd] in nn/tiled.py).
    """
    started = time.perf_counter()
    entry = zoo.get(name, "small", dtype=torch.float64, seed=seed)
    reference = entry.model
    length = int(entry.inputs[0].shape[-1])
    plan = _tiles_scaled(plan, length)
    optimized = apply_(copy.deepcopy(reference), plan)
    expected = _step(reference, entry.inputs, entry.loss_fn, seed)
    actual = _step(optimized, entry.inputs, entry.loss_fn, seed)
    if expected.keys() != actual.keys():
        missing = sorted(set(expected) ^ set(actual))
        raise RuntimeError(f"verify_plan: the optimized model's state_dict keys differ from the untouched one's: {missing}")
    errors = {key: _error(actual[key], value) for key, value in expected.items()}
    worst = max(errors, key=errors.get)
    tiles = sorted({s.tile_length for s in plan.segments if s.tile_length is not None})
    note = (f"tile lengths scaled with the input to {', '.join(map(str, tiles))} samples here, so that the "
            "tiled parts run in several windows" if tiles else "")
    return Verification(name, tuple(entry.inputs[0].shape), len(errors), errors[worst], worst,
                        time.perf_counter() - started, tolerance, note)


def _tiles_scaled(plan: Plan, length: int) -> Plan:
    """`plan` with its tile lengths scaled from the plan's input length to `length` (at least 1),
    so that a tiled part of the small model runs in as many windows as at the planned size and the
    check covers the windows and their halos, not one untiled window."""
    if not plan.length or length >= plan.length:
        return plan
    segments = [dataclasses.replace(s, tile_length=max(1, s.tile_length * length // plan.length))
                if s.tile_length is not None else s for s in plan.segments]
    return dataclasses.replace(plan, segments=segments)


def lossy_error(name: str, plan: Plan, seed: int = 0) -> float:
    """A lossy plan's relative gradient error (L2, all gradients) on zoo model `name` at size "small"
    in float64 on the CPU: NOTE [Saved tensors in low precision] in nn/saved_precision.py."""
    from .strategies.optimize import step_gradient_error

    entry = zoo.get(name, "small", dtype=torch.float64, seed=seed)
    optimized = apply_(copy.deepcopy(entry.model), plan)
    return step_gradient_error(entry.model, optimized, entry.inputs, entry.loss_fn, None)


def _step(model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """One training step; what it produced, by name: output, input gradients, parameter gradients
    and buffers, parameters by their state_dict key."""
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(seed)  # the same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    output = model(*inputs)
    (loss_fn or default_loss)(output).backward()
    out: Dict[str, Optional[torch.Tensor]] = {}
    for i, t in enumerate(t for t in torch.utils._pytree.tree_flatten(output)[0] if isinstance(t, torch.Tensor)):
        out[f"output {i}"] = t.detach()
    for i, x in enumerate(inputs):
        if x.is_floating_point():
            out[f"input {i} grad"] = x.grad
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            out[f"{key} grad"] = value.grad
        else:
            out[key] = value.detach()
    return out


def _error(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> float:
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    if not expected.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else float("inf")
    # An absolute floor where the reference is zero (DESIGN.md, tiling pitfalls).
    return relative_error(actual, expected, floor=1e-12)


# ------------------------------------------------------------------------------ before / after


def before_after(plan: Plan) -> str:
    """The untouched and the optimized step side by side: estimates, and measurements where taken."""
    rows = [("", "untouched", "optimized"),
            ("peak, estimated", format_bytes(plan.eager_peak_bytes), format_bytes(plan.estimated_peak_bytes)),
            ("peak, planner's model", "", format_bytes(plan.predicted_peak_bytes))]
    if plan.measured_peak_bytes is not None or plan.eager_measured_peak_bytes is not None:
        rows.append(("peak, measured", format_bytes(plan.eager_measured_peak_bytes), format_bytes(plan.measured_peak_bytes)))
    if plan.eager_step_s is not None:
        after = plan.measured_step_s if plan.measured_step_s is not None else plan.eager_step_s + plan.predicted_extra_s
        rows.append(("step time" if plan.times != "modelled" else "step time (modelled)",
                     f"{plan.eager_step_s * 1e3:.1f} ms", f"{after * 1e3:.1f} ms"))
    rows.append(("budget", "", format_bytes(plan.budget_bytes)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}".rstrip() for a, b, c in rows]
    measured = plan.measured_peak_bytes is not None and plan.eager_measured_peak_bytes is not None
    peak = plan.measured_peak_bytes if measured else plan.estimated_peak_bytes
    eager = plan.eager_measured_peak_bytes if measured else plan.eager_peak_bytes
    if peak and eager:
        lines.append(f"  the optimized step needs {peak / eager:.0%} of the untouched step's memory "
                     f"({'measured' if measured else 'estimated'})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plot


def plot_plan(plan: Plan, path: str, title: Optional[str] = None) -> str:
    """A PNG: per block, the bytes kept for backward before and after the plan (left); the peaks of
    the untouched and optimized step against the budget (right). Needs matplotlib."""
    from .profile.report import _pyplot

    plt = _pyplot()
    mib = 2**20
    n = len(plan.items)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [2.4, 1]})

    by_item = {it.name: it for it in (plan.costs.items if plan.costs is not None else [])}
    scale = plan.costs.scale(plan.length) if plan.costs is not None else 1.0
    before = [by_item[name].kept_before * scale / mib if name in by_item else 0.0 for name in plan.items]
    after = [0.0] * n
    colors = {"keep": "#8c8c8c", "selective": "#55A868", "checkpoint": "#4C72B0", "tile": "#C44E52", "offload": "#8172B3",
              "chunk": "#937860", "fuse": "#DD8452", "bf16": "#DA8BC3"}
    positions = list(range(n))
    if by_item:
        left.bar([p - 0.2 for p in positions], before, width=0.4, color="#DD8452", label="untouched")
    for seg in plan.segments:
        # A segment keeps its bytes at its start (a checkpointed or tiled run keeps its input).
        after[seg.start] += seg.kept_bytes / mib
        if seg.stop - seg.start > 1:
            left.axvspan(seg.start - 0.45, seg.stop - 0.55, color=colors.get(seg.option, "#cccccc"), alpha=0.08, zorder=0)
            left.text((seg.start + seg.stop - 1) / 2, 0.98, seg.label, transform=left.get_xaxis_transform(),
                      ha="center", va="top", fontsize=8, color=colors.get(seg.option, "black"))
    seg_of = {i: seg for seg in plan.segments for i in range(seg.start, seg.stop)}
    offset = 0.2 if by_item else 0.0
    left.bar([p + offset for p in positions], after, width=0.4,
             color=[colors.get(seg_of[i].option, "#cccccc") for i in positions])
    # Nothing kept (offload, or the inside of a multi-block run): a marker, so the option still shows.
    empty = [i for i in positions if after[i] == 0]
    left.scatter([i + offset for i in empty], [0] * len(empty), marker="^", s=18, zorder=3, clip_on=False,
                 color=[colors.get(seg_of[i].option, "#cccccc") for i in empty])
    for option, color in colors.items():
        if any(seg.option == option for seg in plan.segments):
            left.bar([0], [0], color=color, label=f"plan: {option}")
    left.set_xticks(positions)
    left.set_xticklabels(plan.items, rotation=60, ha="right", fontsize=7)
    left.set_ylabel("kept for backward (MiB)")
    left.set_title("Kept bytes per block: untouched vs with the plan")
    left.set_ylim(0, 1.25 * max(before + after + [1e-9]))
    left.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.93), ncol=2)

    bars: List[Tuple[str, Optional[int], str]] = [
        ("untouched\nestimate", plan.eager_peak_bytes, "#DD8452"),
        ("untouched\nmeasured", plan.eager_measured_peak_bytes, "#a0522d"),
        ("plan\npredicted", plan.predicted_peak_bytes, "#9ecae1"),
        ("plan\nestimate", plan.estimated_peak_bytes, "#4C72B0"),
        ("plan\nmeasured", plan.measured_peak_bytes, "#1f3b70"),
    ]
    bars = [b for b in bars if b[1] is not None]
    gib = 2**30
    for i, (label, value, color) in enumerate(bars):
        right.bar(i, value / gib, color=color)
        right.text(i, value / gib, format_bytes(value), ha="center", va="bottom", fontsize=8)
    right.axhline(plan.budget_bytes / gib, color="black", ls="--", lw=1, label=f"budget {format_bytes(plan.budget_bytes)}")
    right.set_xticks(range(len(bars)))
    right.set_xticklabels([b[0] for b in bars], fontsize=8)
    right.set_ylabel("peak of one training step (GiB)")
    right.set_title("Peak memory")
    right.set_ylim(0, 1.15 * max([b[1] / gib for b in bars] + [plan.budget_bytes / gib]))
    right.legend(fontsize=8, loc="upper right")

    fig.suptitle(title or f"convmem plan for {plan.model}: input length {plan.length}, budget "
                 f"{format_bytes(plan.budget_bytes)} ({plan.times} times)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ demo


def run_demo(model: str = "tcn", budget: Union[str, float] = "25%", plot: Optional[str] = "convmem_demo.png",
             device: Optional[str] = None, out: Optional[Callable[[str], None]] = None) -> int:
    """Profile, plan, verify, compare, explain and plot zoo model `model`; 0 when the plan is exact.

    On a GPU the model runs at its training size there; without one, profiling and planning run on
    the meta device (nothing allocated) and the figures are the no-GPU estimate of a CUDA step.
    """
    say = out or (lambda text: print(text, flush=True))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    where = torch.cuda.get_device_name() if cuda else "no GPU here: the estimate of a CUDA step, computed on the meta device"
    entry = zoo.get(model, size="default", device="cuda" if cuda else "meta")
    shape = " x ".join(str(n) for n in entry.inputs[0].shape)
    say(f"== convmem demo: zoo:{entry.name} ({entry.description})\n   {where}\n")
    started = time.perf_counter()

    say(f"[1/5] profile the untouched training step at its training size, input {shape}")
    prof = profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, sample_rate=entry.sample_rate, measure=cuda)
    prof.model = f"zoo:{entry.name}"
    say(_indent(prof.table(top=4)))

    share = isinstance(budget, float) or str(budget).strip().endswith("%")
    wanted = (f"{budget:.0%}" if isinstance(budget, float) else str(budget)) + (" of the untouched peak" if share else "")
    say(f"\n[2/5] plan to a budget of {wanted}: convmem.optimize_")
    progress = lambda text: say(f"      {text}")  # noqa: E731
    try:
        plan = optimize_(entry.model, *entry.inputs, budget=budget, loss_fn=entry.loss_fn, progress=progress)
    except InfeasibleBudget as error:
        say(_indent(str(error)))
        say(f"      planning to the smallest feasible budget instead: {format_bytes(error.min_bytes)}")
        try:
            plan = optimize_(entry.model, *entry.inputs, budget=error.min_bytes, loss_fn=entry.loss_fn,
                             progress=progress)
        except InfeasibleBudget as again:
            print(f"convmem demo: {again}", file=sys.stderr)
            return 2
    if prof.measured is not None:
        plan.eager_measured_peak_bytes = prof.measured.peak_bytes
    say(f"      chosen: {_choices(plan)}")

    say(f"\n[3/5] verify exact gradients: the same plan on zoo:{entry.name} at its small size, float64 on the CPU")
    check = verify_plan(entry.name, plan)
    say(_indent(check.summary()))

    say("\n[4/5] before and after" + ("" if plan.measured_peak_bytes is not None else
                                      " (no GPU: estimates; step times from the roofline model)"))
    say(before_after(plan))

    say("\n[5/5] the plan")
    say(_indent(plan.explain()))
    if plot:
        try:
            plot_plan(plan, plot, title=f"convmem demo: zoo:{entry.name} at {shape}, budget "
                                        f"{format_bytes(plan.budget_bytes)} ({'measured on ' + where if cuda else 'estimates'})")
            say(f"\nplot: {os.path.abspath(plot)}")
        except ImportError as error:
            say(f"\nno plot: {error}")
    say(f"\ndone in {time.perf_counter() - started:.0f} s; apply the same plan in a training script with "
        "convmem.apply_(model, plan) (docs/optimize.md)")
    if not check.exact:
        print(f"convmem demo: the plan is not exact on zoo:{entry.name}: {check.max_error:.3g} in {check.worst}",
              file=sys.stderr)
        return 1
    return 0


def _choices(plan: Plan) -> str:
    parts = []
    for seg in plan.segments:
        names = plan.items[seg.start:seg.stop]
        where = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        parts.append(f"{seg.label} on {where}")
    return "; ".join(parts) if len(parts) <= 6 else f"{len(parts)} segments: " + ", ".join(
        f"{sum(1 for s in plan.segments if s.label == label)} x {label}" for label in sorted({s.label for s in plan.segments}))


def _indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())
