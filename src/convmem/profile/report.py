"""`MemoryProfile`: the answer to "where does my model's GPU memory go?", as table, dict and plot."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional

from .._units import format_bytes
from .estimate import StepEstimate
from .measure import StepMeasurement
from .recorder import LOSS_ROW, ModuleCall


@dataclasses.dataclass
class ModuleRow:
    """One module call. Bytes; times in seconds (None where the step was only estimated).

    `kept_bytes` is what autograd saved while this module (not a child) ran, so the rows add up to
    the step's total; `kept_total_bytes` includes the children.
    """

    name: str
    label: str
    module_type: str
    depth: int
    param_bytes: int
    grad_bytes: int
    kept_bytes: int
    kept_total_bytes: int
    output_bytes: int
    forward_s: Optional[float] = None
    backward_s: Optional[float] = None
    calls: int = 1  # no-grad calls of one module (tiles of a tiled forward) share one row


@dataclasses.dataclass
class MaxLength:
    """The longest input that fits `memory_bytes`, from the estimate (kept bytes grow linearly)."""

    memory_bytes: int
    samples: int
    seconds: Optional[float]
    bytes_per_sample: float
    fixed_bytes: float


def _inclusive_kept(calls: List[ModuleCall]) -> Dict[int, int]:
    total = {id(c): c.kept_bytes for c in calls}
    for call in reversed(calls):
        if call.parent is not None:
            total[id(call.parent)] += total[id(call)]
    return total


def build_rows(estimate: StepEstimate, measured: Optional[StepMeasurement]) -> List[ModuleRow]:
    inclusive = _inclusive_kept(estimate.calls)
    times = {}
    if measured is not None:
        times = {(c.name, c.call_index): (c.forward_s, c.backward_s) for c in measured.calls}
    rows = []
    no_grad_rows: Dict[str, ModuleRow] = {}
    for call in estimate.calls + [estimate.loss_call]:
        if call.in_backward:
            continue  # a recompute (checkpoint, tiling): NOTE [Kept bytes]
        forward_s, backward_s = times.get((call.name, call.call_index), (None, None))
        if not call.grad_enabled and call.name in no_grad_rows:
            # Calls under no_grad keep nothing (a tiled forward runs each module once per tile).
            row = no_grad_rows[call.name]
            row.calls += 1
            row.output_bytes = max(row.output_bytes, call.output_bytes)
            if forward_s is not None and row.forward_s is not None:
                row.forward_s += forward_s
            continue
        rows.append(
            ModuleRow(
                name=call.name,
                label=_readable(call.label) or "(model)",
                module_type=call.module_type,
                depth=call.depth,
                param_bytes=call.param_bytes,
                grad_bytes=call.grad_bytes,
                kept_bytes=call.kept_bytes,
                kept_total_bytes=inclusive.get(id(call), call.kept_bytes),
                output_bytes=call.output_bytes,
                forward_s=forward_s,
                backward_s=backward_s,
            )
        )
        if not call.grad_enabled:
            no_grad_rows[call.name] = rows[-1]
    return rows


@dataclasses.dataclass
class MemoryProfile:
    """Where one training step's GPU memory goes, per module and for the step.

    `estimate` is the no-GPU estimate of a CUDA step; `measured` the real step on the model's
    device (CUDA peak from the allocator), when one was run. `peak_bytes` is the measured CUDA peak
    when there is one, else the estimate.
    """

    model: str
    inputs: List[Dict[str, Any]]
    autocast: Optional[str]
    rows: List[ModuleRow]
    estimate: StepEstimate
    measured: Optional[StepMeasurement] = None
    max_length: Optional[MaxLength] = None

    @property
    def peak_bytes(self) -> int:
        if self.measured is not None and self.measured.peak_bytes is not None:
            return self.measured.peak_bytes
        return self.estimate.peak_bytes

    @property
    def kept_bytes(self) -> int:
        """All bytes autograd saved for backward (deduplicated; parameters and inputs excluded)."""
        return self.estimate.saved_bytes

    def block_rows(self, at_least: int = 4) -> List[ModuleRow]:
        """Rows at the shallowest depth where at least `at_least` module calls keep memory.

        For a model of repeated blocks these are the blocks, each with its children's kept bytes
        (`kept_total_bytes`): the view that says which part of the network to change.
        """
        depths = sorted({r.depth for r in self.rows if r.name != LOSS_ROW})
        for depth in depths:
            rows = [r for r in self.rows if r.depth == depth and r.kept_total_bytes > 0 and r.label != LOSS_ROW]
            if len(rows) >= at_least:
                return rows
        return [r for r in self.rows if r.kept_bytes > 0 and r.label != LOSS_ROW]

    # -- text ------------------------------------------------------------------------------
    def summary(self) -> str:
        e = self.estimate
        shapes = ", ".join(f"{tuple(i['shape'])} {i['dtype']}" for i in self.inputs)
        lines = [f"convmem profile: {self.model}, input {shapes}" + (f", autocast {self.autocast}" if self.autocast else "")]
        lines.append(
            f"estimated CUDA peak {format_bytes(e.peak_bytes)} (in {e.peak_phase}) = resident "
            f"{format_bytes(e.resident_bytes)} + kept {format_bytes(e.kept_bytes)} + grads "
            f"{format_bytes(e.grad_bytes)} + optimizer {format_bytes(e.optimizer_bytes)} + transient "
            f"{format_bytes(e.transient_bytes)} + workspace {format_bytes(e.workspace_bytes)}"
        )
        m = self.measured
        if m is not None and m.peak_bytes is not None:
            error = (e.peak_bytes - m.peak_bytes) / m.peak_bytes * 100
            lines.append(
                f"measured peak on {m.device}: {format_bytes(m.peak_bytes)} (estimate {error:+.1f}%), "
                f"of which {format_bytes(m.start_bytes)} allocated before the step; step "
                f"{m.step_s * 1e3:.1f} ms"
            )
        elif m is not None:
            lines.append(f"measured on {m.device}: step {m.step_s * 1e3:.1f} ms (memory figures need CUDA)")
        if self.max_length is not None:
            ml = self.max_length
            seconds = f" = {ml.seconds:,.1f} s" if ml.seconds is not None else ""
            lines.append(
                f"longest input that fits {format_bytes(ml.memory_bytes)}: {ml.samples:,} samples{seconds} "
                f"({format_bytes(ml.bytes_per_sample)} per sample of length)"
            )
        return "\n".join(lines)

    def table(self, top: int = 15) -> str:
        """The summary, then the `top` module calls by kept bytes with their share of the peak."""
        peak = max(self.peak_bytes, 1)
        ranked = sorted((r for r in self.rows if r.kept_bytes > 0), key=lambda r: -r.kept_bytes)
        timed = any(r.forward_s is not None for r in self.rows)
        header = f"{'module':<34} {'type':<18} {'params':>10} {'kept':>11} {'of peak':>7} {'output':>11}"
        if timed:
            header += f" {'fwd ms':>8} {'bwd ms':>8}"
        lines = [self.summary(), "", header, "-" * len(header)]
        for r in ranked[:top]:
            line = (
                f"{r.label[:34]:<34} {r.module_type[:18]:<18} {format_bytes(r.param_bytes):>10} "
                f"{format_bytes(r.kept_bytes):>11} {r.kept_bytes / peak:>7.1%} {format_bytes(r.output_bytes):>11}"
            )
            if timed:
                line += f" {_ms(r.forward_s):>8} {_ms(r.backward_s):>8}"
            lines.append(line)
        rest = ranked[top:]
        if rest:
            rest_bytes = sum(r.kept_bytes for r in rest)
            lines.append(f"... {len(rest)} more module calls keep {format_bytes(rest_bytes)} ({rest_bytes / peak:.1%})")
        lines.append(f"{'total kept':<34} {'':<18} {'':>10} {format_bytes(self.kept_bytes):>11} {self.kept_bytes / peak:>7.1%}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # -- data ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        e = self.estimate
        estimate = {
            k: getattr(e, k)
            for k in (
                "peak_bytes", "resident_bytes", "kept_bytes", "grad_bytes", "optimizer_bytes",
                "transient_bytes", "workspace_bytes", "saved_bytes", "peak_phase", "peak_op",
            )
        }
        measured = None
        if self.measured is not None:
            m = self.measured
            measured = {k: getattr(m, k) for k in ("device", "step_s", "peak_bytes", "start_bytes", "saved_bytes")}
        return {
            "model": self.model,
            "inputs": self.inputs,
            "autocast": self.autocast,
            "peak_bytes": self.peak_bytes,
            "estimate": estimate,
            "measured": measured,
            "max_length": dataclasses.asdict(self.max_length) if self.max_length is not None else None,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # -- plot ------------------------------------------------------------------------------
    def plot(self, path: str, top: int = 20) -> str:
        """A PNG: kept bytes per module (left) and live memory over the step (right)."""
        plt = _pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(4.5, 0.28 * top + 1.5)))
        blocks = self.block_rows()[:top]
        gib = 2**30
        left.barh([r.label for r in blocks][::-1], [r.kept_total_bytes / gib for r in blocks][::-1], color="#4C72B0")
        left.set_xlabel("kept for backward, children included (GiB)")
        left.set_title("Where the kept memory goes, in forward order")
        left.tick_params(axis="y", labelsize=7)

        timeline = [b / gib for b in self.estimate.timeline]
        right.plot(range(len(timeline)), timeline, color="#DD8452", lw=1.2, label="estimated live bytes")
        starts = sorted(self.estimate.phase_starts.items(), key=lambda kv: kv[1])
        colors = {"forward": "#e8f0fb", "loss": "#fbf3e8", "backward": "#eefbe8", "optimizer": "#f6e8fb"}
        for (name, start), nxt in zip(starts, starts[1:] + [("", len(timeline))]):
            if name in colors and nxt[1] > start:
                right.axvspan(start, nxt[1], color=colors[name], zorder=0)
                right.text(start, 0, f" {name}", fontsize=8, va="bottom", rotation=90)
        right.axhline(self.estimate.peak_bytes / gib, color="#C44E52", ls="--", lw=1, label="estimated peak")
        m = self.measured
        if m is not None and m.peak_bytes is not None:
            right.axhline(m.peak_bytes / gib, color="black", ls=":", lw=1, label=f"measured peak ({m.device})")
        right.set_xlabel("op in the step")
        right.set_ylabel("GiB")
        right.set_title("Memory over the step")
        right.legend(loc="upper right", fontsize=8)
        fig.suptitle(self.summary().splitlines()[0], fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _readable(label: str) -> str:
    """``blocks.wrapped.0.conv`` -> ``blocks.0.conv``: wrappers keep state_dict names, so do rows."""
    return ".".join(part for part in label.split(".") if part != "wrapped")


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'convmem[plot]'") from error
    return plt
