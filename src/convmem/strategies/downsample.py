"""Downsampling the input of chosen Conv1d layers (lossy, opt-in, needs retraining).

``convmem.downsample_(model, factor, mode)`` wraps the chosen ``nn.Conv1d`` layers in
`DownsampleConv1d` (pool by `factor`, then the conv) and returns a `DownsampleReport`: per layer
the input and output lengths before and after; for the model its output shapes before and after,
the output SQNR where the shapes did not change, and the estimated memory of a training step.

# NOTE [Which convs are downsampled by default]
# By default only the first Conv1d the model runs: the one that sees the raw signal. Everything
# after it then runs at 1/factor of the length, so the activations kept for backward shrink by up
# to the factor all the way down, and nothing downstream pools again. Downsampling more convs
# in series compounds: a conv after another downsampled one sees its input shortened twice
# (factor**2), and a residual connection or concatenation that joins a shortened signal to one at
# full length breaks. So more convs are downsampled only when a filter_fn asks for them; with
# example inputs the strategy then warns where factors multiply, and undoes everything if the
# model no longer runs. With ``restore_length=True`` each chosen conv's output is interpolated back
# to its original length: the change stays local and never compounds, and the memory saved is only
# that conv's input (NOTE [Restoring the output length]).
#
# "First" is the order of the forward pass, taken from a run on the example inputs; without them it
# is definition order (``model.named_modules()``), which is the same for most models but not all.
#
# The model's output length changes with the factor unless the model ends in a global pooling (a
# classifier), or restore_length is on: the SQNR against the original model is reported only
# where the output shapes are unchanged, otherwise the report gives the shapes.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional

from torch import nn

from .._checks import positive_int
from .._units import format_bytes
from ..nn.downsample import MODES, DownsampleConv1d
from ._common import (
    ConfigDict,
    FilterFn,
    as_inputs,
    check_filter_fn,
    check_model,
    estimate_memory,
    eval_forward,
    fmt_db,
    has_plain_conv1d_forward,
    output_sqnr_db,
    swap_modules,
    warn_nothing_selected,
    warn_skipped,
)

__all__ = ["DownsampleConfig", "DownsampleRow", "DownsampleReport", "downsample_"]

_STRATEGY = "downsample_"


@dataclasses.dataclass(frozen=True)
class DownsampleConfig(ConfigDict):
    """``factor`` (integer >= 1), ``mode`` (one of "avg", "max", "strided", "lowpass"), ``restore_length``.

    Modes: NOTE [Downsampling modes]; restore_length: NOTE [Restoring the output length].
    """

    factor: int
    mode: str = "avg"
    restore_length: bool = False

    def __post_init__(self) -> None:
        positive_int(self.factor, "factor")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.restore_length, bool):
            raise TypeError(f"restore_length must be a bool, got {self.restore_length!r}")


@dataclasses.dataclass
class DownsampleRow:
    """One downsampled Conv1d: lengths of its input and output on the example input (None without one)."""

    name: str
    input_length_before: Optional[int] = None
    input_length_after: Optional[int] = None
    output_length_before: Optional[int] = None
    output_length_after: Optional[int] = None


@dataclasses.dataclass
class DownsampleReport:
    """What `downsample_` did to a model; ``table()`` for people, ``to_dict()`` for programs.

    `output_sqnr_db` compares the outputs after and before (eval mode), only where every output
    kept its shape; otherwise it is None and the shapes tell the length change. Byte figures are
    the no-GPU estimate of one training step. Input-dependent figures are None without example inputs.
    """

    model: str
    config: DownsampleConfig
    rows: List[DownsampleRow]
    skipped: Dict[str, str]
    output_shapes_before: Optional[List[List[int]]] = None
    output_shapes_after: Optional[List[List[int]]] = None
    output_sqnr_db: Optional[float] = None
    saved_bytes_before: Optional[int] = None
    saved_bytes_after: Optional[int] = None
    peak_bytes_before: Optional[int] = None
    peak_bytes_after: Optional[int] = None

    @property
    def output_shape_changed(self) -> Optional[bool]:
        if self.output_shapes_before is None:
            return None
        return self.output_shapes_before != self.output_shapes_after

    def table(self) -> str:
        c = self.config
        lines = [
            f"{_STRATEGY}: {self.model}, factor {c.factor}, mode {c.mode!r}"
            + (", output length restored" if c.restore_length else "")
            + f", {len(self.rows)} Conv1d downsampled"
        ]
        if self.output_shapes_before is not None:
            shapes = lambda s: ", ".join(str(tuple(x)) for x in s)  # noqa: E731
            if self.output_shape_changed:
                lines.append(
                    f"model output {shapes(self.output_shapes_before)} -> {shapes(self.output_shapes_after)}: "
                    "shape changed, no SQNR"
                )
            else:
                lines.append(
                    f"model output {shapes(self.output_shapes_before)} unchanged; SQNR {fmt_db(self.output_sqnr_db)}"
                )
        if self.saved_bytes_before is not None and self.saved_bytes_after is not None:
            lines.append(
                f"estimated training step: saved for backward {format_bytes(self.saved_bytes_before)} -> "
                f"{format_bytes(self.saved_bytes_after)}, peak {format_bytes(self.peak_bytes_before)} -> "
                f"{format_bytes(self.peak_bytes_after)}"
            )
        header = f"{'layer':<40} {'input length':>20} {'output length':>20}"
        lines += ["", header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r.name[:40]:<40} {f'{_n(r.input_length_before)} -> {_n(r.input_length_after)}':>20} "
                f"{f'{_n(r.output_length_before)} -> {_n(r.output_length_after)}':>20}"
            )
        for name, reason in self.skipped.items():
            lines.append(f"left alone: {name}: {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # the config becomes its to_dict() too


def _n(value: Optional[int]) -> str:
    return "-" if value is None else f"{value:,}"


def downsample_(
    model: nn.Module,
    factor: int,
    mode: str = "avg",
    filter_fn: Optional[FilterFn] = None,
    example_inputs: Any = None,
    restore_length: bool = False,
) -> DownsampleReport:
    """Pool the input of chosen Conv1d layers of `model` by `factor`, in place; return the report.

    Args:
        model: any ``nn.Module`` holding ``nn.Conv1d`` layers (``x: (batch, channels, length)``).
        factor: integer >= 1; each chosen conv sees ``ceil(length / factor)`` samples.
        mode: "avg", "max", "strided" or "lowpass" (anti-aliased): NOTE [Downsampling modes].
        filter_fn: ``filter_fn(conv, fqn) -> bool`` chooses among the ``nn.Conv1d`` modules; default:
            only the first Conv1d of the forward pass (NOTE [Which convs are downsampled by default]).
        example_inputs: a tensor or tuple of the model's positional arguments. When given: the
            forward order for the default choice, lengths, output shapes, SQNR where the shapes did
            not change, estimated memory before and after, and a check that the model still runs.
        restore_length: interpolate each chosen conv's output back to its original length.

    Returns:
        a `DownsampleReport`; the model is modified in place. A downsampled conv's state_dict keys
        gain ``.conv`` (``<name>.conv.weight``).

    Raises TypeError/ValueError for bad arguments, before anything changes; ValueError, with the
    model put back as it was, when the downsampled model fails on `example_inputs`.

    Warning: lossy and opt-in. The output length of a sequence-to-sequence model changes by the
    factor; kernels cover `factor` times more signal than they were trained on: retrain.

    Example::

        >>> model = convmem.zoo.get("resnet1d", size="small").model
        >>> report = convmem.downsample_(model, 2, mode="lowpass", example_inputs=torch.randn(2, 12, 1000))
        >>> print(report.table())
    """
    check_model(model, _STRATEGY)
    config = DownsampleConfig(factor, mode, restore_length)
    check_filter_fn(filter_fn, _STRATEGY)
    inputs = as_inputs(example_inputs, _STRATEGY)

    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv1d)}
    before = eval_forward(model, inputs, convs) if inputs is not None else None
    if filter_fn is not None:
        selected = [name for name, conv in convs.items() if filter_fn(conv, name)]
    else:
        selected = (before.order if before is not None else list(convs))[:1]
    if "" in selected:
        raise ValueError(
            f"{_STRATEGY}: the model itself is a {type(model).__name__} and cannot be replaced in place; "
            "use convmem.nn.DownsampleConv1d(conv, factor, mode)"
        )
    skipped = {
        name: f"{type(convs[name]).__name__} overrides Conv1d.forward; wrapping it may not be what it expects"
        for name in selected
        if not has_plain_conv1d_forward(convs[name])
    }
    warn_skipped(_STRATEGY, skipped)
    chosen = [name for name in selected if name not in skipped]
    if not chosen:
        warn_nothing_selected(model, _STRATEGY, filter_fn is not None, f" ({len(convs)} Conv1d in the model)")
        return DownsampleReport(type(model).__name__, config, [], skipped)

    memory_before = estimate_memory(model, inputs, _STRATEGY) if inputs is not None else None
    replacements = {name: DownsampleConv1d(convs[name], factor, mode, restore_length) for name in chosen}
    undo = swap_modules(model, replacements)
    report = DownsampleReport(type(model).__name__, config, [DownsampleRow(name) for name in chosen], skipped)
    if inputs is None:
        return report
    try:
        after = eval_forward(model, inputs, replacements)
    except Exception as error:
        undo()
        raise ValueError(
            f"{_STRATEGY}: {type(model).__name__} no longer runs on the example input with {chosen} downsampled "
            f"({type(error).__name__}: {error}). A residual connection or concatenation that joins the shortened "
            "signal to one at full length does this, as does a forward that relies on the input's length; "
            "choose other convs or pass restore_length=True. "
            "The model is unchanged."
        ) from error

    compounded = []
    for row in report.rows:
        row.input_length_before = before.input_lengths.get(row.name)
        row.output_length_before = before.output_lengths.get(row.name)
        row.input_length_after = after.input_lengths.get(row.name)
        row.output_length_after = after.output_lengths.get(row.name)
        if row.input_length_after != row.input_length_before:
            compounded.append(f"{row.name!r} ({row.input_length_before} -> {row.input_length_after} samples in)")
    if compounded:
        warnings.warn(
            f"{_STRATEGY}: {', '.join(compounded)} run after another downsampled conv: their input was shortened "
            "already and the factors multiply (NOTE [Which convs are downsampled by default])",
            stacklevel=2,
        )
    report.output_shapes_before = [list(t.shape) for t in before.outputs]
    report.output_shapes_after = [list(t.shape) for t in after.outputs]
    report.output_sqnr_db = output_sqnr_db(after.outputs, before.outputs)
    memory_after = estimate_memory(model, inputs, _STRATEGY)
    if memory_before is not None and memory_after is not None:
        report.saved_bytes_before, report.saved_bytes_after = memory_before.saved_bytes, memory_after.saved_bytes
        report.peak_bytes_before, report.peak_bytes_after = memory_before.peak_bytes, memory_after.peak_bytes
    return report
