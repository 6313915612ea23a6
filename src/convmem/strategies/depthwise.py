"""Depthwise-separable conversion of a model's dense Conv1d layers (lossy below full rank, opt-in).

``convmem.to_depthwise_separable_(model, rank)`` replaces every eligible ``nn.Conv1d`` by a
`DepthwiseSeparableConv1d` converted from its trained weight (NOTE [Per-channel SVD]) and returns
a `ConversionReport`: per layer the parameters, FLOPs and kept bytes before and after and the
weight error; for the model the output SQNR on an example input.

# NOTE [Which convs are converted]
# `filter_fn(module, fqn)` is asked about every nn.Conv1d (default: all of them). Of those chosen:
# * converted: groups=1 and kernel_size > 1;
# * left alone as having nothing to separate: kernel_size 1 (already pointwise) and depthwise convs
#   (groups == in_channels). With the default filter this is silent (converting "everything"
#   should not warn about 1x1 convs); when a filter_fn chose them, it warns.
# * left alone with a warning, always: grouped convs (1 < groups < in_channels; see NOTE
#   [Per-channel SVD]), Conv1d subclasses that override forward (converting them would drop what
#   their forward adds, e.g. causal padding) and lazy convs not yet initialized.
# Every module left alone is listed in the report's `skipped` with its reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from torch import nn

from .._checks import positive_int
from .._metrics import relative_error, sqnr_db
from .._units import format_bytes
from ..nn.depthwise_separable import DepthwiseSeparableConv1d
from ._common import (
    ConfigDict,
    FilterFn,
    MemoryEstimate,
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

__all__ = ["DepthwiseSeparableConfig", "ConversionRow", "ConversionReport", "to_depthwise_separable_"]

_STRATEGY = "to_depthwise_separable_"


@dataclasses.dataclass(frozen=True)
class DepthwiseSeparableConfig(ConfigDict):
    """``rank``: depthwise filters per input channel (None: the exact rank, min(out_channels, kernel_size)).

    A rank above a layer's exact rank is clamped to it for that layer.
    """

    rank: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rank is not None:
            positive_int(self.rank, "rank")


@dataclasses.dataclass
class ConversionRow:
    """One converted Conv1d. FLOPs are per output position of one example (2 x multiply-adds, bias
    excluded); kept bytes (what a training step saves for backward in this layer, from the no-GPU
    estimate) are None without example inputs."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    rank: int
    full_rank: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    weight_rel_error: float
    weight_sqnr_db: float
    kept_bytes_before: Optional[int] = None
    kept_bytes_after: Optional[int] = None

    @property
    def exact(self) -> bool:
        return self.rank >= self.full_rank


@dataclasses.dataclass
class ConversionReport:
    """What `to_depthwise_separable_` did to a model; ``table()`` for people, ``to_dict()`` for programs.

    `output_sqnr_db` compares the model's outputs on the example input after and before (eval mode,
    NOTE [Lossy strategies measure before they report]); ``inf`` means identical. Byte figures are
    the no-GPU estimate of one training step; all input-dependent figures are None without
    example inputs.
    """

    model: str
    config: DepthwiseSeparableConfig
    rows: List[ConversionRow]
    skipped: Dict[str, str]
    params_before: int
    params_after: int
    output_sqnr_db: Optional[float] = None
    saved_bytes_before: Optional[int] = None
    saved_bytes_after: Optional[int] = None
    peak_bytes_before: Optional[int] = None
    peak_bytes_after: Optional[int] = None

    def table(self) -> str:
        rank = "exact" if self.config.rank is None else str(self.config.rank)
        lines = [
            f"{_STRATEGY}: {self.model}, rank {rank}, {len(self.rows)} Conv1d converted, {len(self.skipped)} left alone",
            f"parameters {self.params_before:,} -> {self.params_after:,}; output SQNR {fmt_db(self.output_sqnr_db)}",
        ]
        if self.saved_bytes_before is not None and self.saved_bytes_after is not None:
            lines.append(
                f"estimated training step: saved for backward {format_bytes(self.saved_bytes_before)} -> "
                f"{format_bytes(self.saved_bytes_after)}, peak {format_bytes(self.peak_bytes_before)} -> "
                f"{format_bytes(self.peak_bytes_after)}"
            )
        header = (
            f"{'layer':<32} {'k':>3} {'rank':>6} {'params before -> after':>24} "
            f"{'FLOPs/pos before -> after':>26} {'kept before -> after':>24} {'weight SQNR':>11}"
        )
        lines += ["", header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r.name[:32]:<32} {r.kernel_size:>3} {f'{r.rank}/{r.full_rank}':>6} "
                f"{f'{r.params_before:,} -> {r.params_after:,}':>24} {f'{r.flops_before:,} -> {r.flops_after:,}':>26} "
                f"{f'{format_bytes(r.kept_bytes_before)} -> {format_bytes(r.kept_bytes_after)}':>24} "
                f"{fmt_db(r.weight_sqnr_db):>11}"
            )
        for name, reason in self.skipped.items():
            lines.append(f"left alone: {name}: {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # the config becomes its to_dict() too


def _flops_per_position(in_channels: int, out_channels: int, kernel_size: int, rank: Optional[int]) -> int:
    if rank is None:
        return 2 * in_channels * out_channels * kernel_size
    return 2 * in_channels * rank * (kernel_size + out_channels)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _skip_reason(conv: nn.Conv1d) -> Optional[tuple]:
    """(reason, warn even under the default filter) for a conv that is not converted, else None."""
    if not has_plain_conv1d_forward(conv):
        return (f"{type(conv).__name__} overrides Conv1d.forward; replacing it would drop what that forward does", True)
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return ("a lazy Conv1d that has not run yet: its weight does not exist", True)
    if conv.groups != 1 and conv.groups == conv.in_channels:
        return ("depthwise already (groups == in_channels): nothing to separate", False)
    if conv.groups != 1:
        return (
            f"grouped (groups={conv.groups}): each input channel reaches only its group's outputs, which "
            "the dense pointwise conv of a depthwise-separable conv would not respect; only groups=1 converts",
            True,
        )
    if conv.kernel_size[0] == 1:
        return ("kernel_size 1: already pointwise, nothing to separate", False)
    return None


def to_depthwise_separable_(
    model: nn.Module,
    rank: Optional[int] = None,
    filter_fn: Optional[FilterFn] = None,
    example_inputs: Any = None,
) -> ConversionReport:
    """Replace dense Conv1d layers of `model` by depthwise-separable ones, in place; return the report.

    Args:
        model: any ``nn.Module`` holding ``nn.Conv1d`` layers (``x: (batch, channels, length)``).
        rank: depthwise filters per input channel, an integer >= 1; None converts exactly
            (rank min(out_channels, kernel_size) per layer: a lossless check that costs parameters).
            Savings need rank < kernel_size * out / (kernel_size + out), in practice rank < kernel_size.
        filter_fn: ``filter_fn(conv, fqn) -> bool`` chooses among the ``nn.Conv1d`` modules; default
            all. Which are converted: NOTE [Which convs are converted].
        example_inputs: a tensor or tuple of the model's positional arguments. When given, the
            report has the model's output SQNR and the estimated memory of a training step before
            and after (NOTE [Lossy strategies measure before they report]).

    Returns:
        a `ConversionReport`; the model is modified in place (keep a ``copy.deepcopy`` to compare).
        Converted layers get new state_dict keys (``<name>.depthwise.weight``,
        ``<name>.pointwise.weight``, ``<name>.pointwise.bias``).

    Raises TypeError/ValueError for bad arguments, before anything changes; if the converted model
    fails on `example_inputs`, every layer is put back before the error propagates.

    Warning: below the exact rank the model's outputs change (lossy, opt-in): read the report's
    SQNR and fine-tune. Depthwise-separable layers keep an extra activation for backward (NOTE
    [Depthwise-separable kept memory]), and stock PyTorch depthwise convs are slow on GPUs.

    Example::

        >>> model = nn.Sequential(nn.Conv1d(1, 64, 15, padding=7), nn.GELU(), nn.Conv1d(64, 64, 15, padding=7))
        >>> report = convmem.to_depthwise_separable_(model, rank=3, example_inputs=torch.randn(2, 1, 4000))
        >>> print(report.table())
    """
    check_model(model, _STRATEGY)
    config = DepthwiseSeparableConfig(rank)
    check_filter_fn(filter_fn, _STRATEGY)
    inputs = as_inputs(example_inputs, _STRATEGY)

    chosen: Dict[str, nn.Conv1d] = {}
    skipped: Dict[str, str] = {}
    to_warn: Dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv1d) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if not name:
            raise ValueError(
                f"{_STRATEGY}: the model itself is a {type(module).__name__} and cannot be replaced in place; "
                "use convmem.nn.DepthwiseSeparableConv1d.from_conv1d(conv, rank)"
            )
        skip = _skip_reason(module)
        if skip is None:
            chosen[name] = module
            continue
        skipped[name] = skip[0]
        if skip[1] or filter_fn is not None:
            to_warn[name] = skip[0]
    params_before = _count(model)
    if not chosen:
        warn_skipped(_STRATEGY, to_warn)
        detail = f" ({len(skipped)} Conv1d left alone: see the report's skipped)" if skipped else ""
        warn_nothing_selected(model, _STRATEGY, filter_fn is not None, detail)
        return ConversionReport(type(model).__name__, config, [], skipped, params_before, params_before)

    before = eval_forward(model, inputs, {}) if inputs is not None else None
    memory_before = estimate_memory(model, inputs, _STRATEGY) if inputs is not None else None
    warn_skipped(_STRATEGY, to_warn)

    replacements: Dict[str, nn.Module] = {}
    rows: List[ConversionRow] = []
    for name, conv in chosen.items():
        new = DepthwiseSeparableConv1d.from_conv1d(conv, config.rank)
        out_channels, in_channels, kernel_size = conv.weight.shape
        dense = new.dense_weight()
        rows.append(
            ConversionRow(
                name=name, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                rank=new.depth_multiplier, full_rank=min(out_channels, kernel_size),
                params_before=_count(conv), params_after=_count(new),
                flops_before=_flops_per_position(in_channels, out_channels, kernel_size, None),
                flops_after=_flops_per_position(in_channels, out_channels, kernel_size, new.depth_multiplier),
                weight_rel_error=relative_error(dense, conv.weight), weight_sqnr_db=sqnr_db(dense, conv.weight),
            )
        )
        replacements[name] = new

    undo = swap_modules(model, replacements)
    report = ConversionReport(type(model).__name__, config, rows, skipped, params_before, _count(model))
    if inputs is None:
        return report
    try:
        after = eval_forward(model, inputs, {})
    except Exception:
        undo()
        raise
    report.output_sqnr_db = output_sqnr_db(after.outputs, before.outputs)
    _add_memory(report, memory_before, estimate_memory(model, inputs, _STRATEGY))
    return report


def _add_memory(report: ConversionReport, before: Optional[MemoryEstimate], after: Optional[MemoryEstimate]) -> None:
    if before is None or after is None:
        return
    report.saved_bytes_before, report.saved_bytes_after = before.saved_bytes, after.saved_bytes
    report.peak_bytes_before, report.peak_bytes_after = before.peak_bytes, after.peak_bytes
    for row in report.rows:
        row.kept_bytes_before = before.kept_by_module.get(row.name, 0)
        row.kept_bytes_after = after.kept_by_module.get(row.name, 0)
