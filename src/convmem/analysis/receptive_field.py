"""`receptive_field`: halo, stride, alignment period and locality verdict of a module.

The analysis is analytic (a trace of the module's aten ops on the meta device, see `trace.py`) and
then confirmed by probing the real module with gradients: back-propagating from single output
positions must reach no input outside the analysed range.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..profile.estimate import meta_clone, to_meta
from . import trace as _trace
from .trace import EdgeRead, LengthFn, NotLocal

__all__ = ["ReceptiveField", "OutputMap", "receptive_field"]

# Shorter inputs are traced at a multiple of their length: length-one axes make shapes ambiguous.
_MIN_TRACE_LENGTH = 64


@dataclasses.dataclass(frozen=True)
class OutputMap:
    """How one tensor output lines up with the input (NOTE [Validity ranges] in trace.py).

    Output position ``j`` needs input positions ``ceil(j * stride + lo) .. floor(j * stride + hi)``;
    its time axis is `axis`; `length(L)` is its length for an input of length L.
    """

    axis: int
    stride: Fraction
    lo: Fraction
    hi: Fraction
    length: LengthFn = dataclasses.field(compare=False, repr=False)

    def needs(self, j: int) -> Tuple[int, int]:
        """The input positions ``[first, last]`` output `j` needs (before clamping to the input)."""
        return math.ceil(j * self.stride + self.lo), math.floor(j * self.stride + self.hi)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """What `receptive_field` found. Lengths are in input samples.

    local: whether every output position depends only on a bounded window of inputs around it.
    reason, module, module_type: why not, and the submodule (qualified name, "" for the module
        itself) that breaks locality; empty when local.
    left, right: the halo: output j depends on inputs in ``[j * stride - left, j * stride + right]``.
    stride: input samples per output sample (``Fraction(320)`` for wav2vec 2.0's encoder,
        ``Fraction(1, 256)`` for HiFi-GAN's x256 upsampling). For several outputs, the first's.
    period: tile windows must start on multiples of this many input samples (NOTE [Alignment
        period] in trace.py); a multiple of the stride's numerator, not always equal to it.
    size: the receptive field of one output sample (the largest over upsampling phases).
    probed: whether gradient probing on real values confirmed the analysis.
    """

    local: bool
    reason: str = ""
    module: Optional[str] = None
    module_type: Optional[str] = None
    left: int = 0
    right: int = 0
    stride: Fraction = Fraction(1)
    period: int = 1
    size: int = 1
    probed: bool = False
    outputs: Tuple[OutputMap, ...] = dataclasses.field(default=(), repr=False)
    # What an input length must satisfy for the module to run, one set per trace: any set may hold
    # (a crop that is a no-op at one length is absent from that trace; NOTE [Two trace lengths]).
    requirements: Tuple[Tuple[Callable[[int], bool], ...], ...] = dataclasses.field(default=(), repr=False, compare=False)
    edges: Tuple[EdgeRead, ...] = dataclasses.field(default=(), repr=False, compare=False)
    _valid: Dict[int, bool] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def explain(self) -> str:
        """One sentence: the verdict and its reason, or the halo and stride."""
        if not self.local:
            where = f"'{self.module}'" if self.module else "the module itself"
            kind = f" ({self.module_type})" if self.module_type else ""
            return f"not length-local: {where}{kind}: {self.reason}"
        return (
            f"length-local: halo {self.left} left + {self.right} right input samples, stride {self.stride}, "
            f"alignment period {self.period}, receptive field {self.size} samples"
        )

    def valid_length(self, length: int) -> bool:
        """Whether the module runs on an input of `length` samples (kernels fit, pads fit, shapes agree)."""
        if length not in self._valid:
            try:
                self._valid[length] = length >= 1 and (
                    not self.requirements or any(all(r(length) for r in rs) for rs in self.requirements)
                )
            except (ArithmeticError, ValueError):
                self._valid[length] = False
        return self._valid[length]

    def output_lengths(self, length: int) -> List[int]:
        return [o.length(length) for o in self.outputs]

    def edge_stop(self, length: int) -> int:
        """A window starting at the sequence's start must stop at least here (NOTE [Edge reads])."""
        stops = [math.floor(e.first * e.track.stride + e.track.hi) + 1 for e in self.edges if e.first is not None]
        return min(length, max(stops, default=0))

    def edge_start(self, length: int) -> int:
        """A window stopping at the sequence's end must start at most here (NOTE [Edge reads])."""
        starts = [
            math.ceil((e.track.length(length) - 1 - e.last) * e.track.stride + e.track.lo)
            for e in self.edges if e.last is not None
        ]
        return max(0, min(starts, default=length))


def _module_reason(module: nn.Module, op_reason: str) -> str:
    """The reason a known non-local layer gives, in the words of the layer; else the op's."""
    # Checked against the module type that ran the offending op (NOTE [Refusals name the module]).
    if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode == "circular":
        return ("padding_mode='circular' wraps the sequence's ends onto each other: its first outputs depend "
                "on its last inputs")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats:
            return "BatchNorm without running statistics normalizes over the batch and the whole time axis"
        return ("BatchNorm in train mode normalizes with statistics over the batch and the whole time axis "
                "(in eval mode it is local: call .eval())")
    if isinstance(module, nn.GroupNorm):
        gln = " (with one group: the global layer norm, gLN)" if module.num_groups == 1 else ""
        return f"GroupNorm normalizes each group of channels over the whole time axis{gln}"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "InstanceNorm normalizes each channel over the whole time axis"
    if isinstance(module, nn.RNNBase):
        return "a recurrent layer: every output depends on every earlier (or, bidirectional, later) input"
    if isinstance(module, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "attention: every output depends on every input"
    if isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return "adaptive (global) pooling mixes the whole time axis into a fixed number of outputs"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return ("Dropout in train mode draws a random mask per position; tiles and their recomputation cannot "
                "reproduce the untiled masks, and convmem refuses rather than approximate (see docs/tiling.md; "
                "call .eval() or use p=0)")
    return op_reason


def known_refusal(module: nn.Module) -> Optional[Tuple[str, str, str]]:
    """``(qualified name, type, reason)`` of the first submodule that is non-local by its type and mode.

    A check without an input, for `Tiled` and `tile_` to refuse early; `receptive_field` decides.
    """
    for name, sub in module.named_modules():
        conv_circular = isinstance(sub, nn.modules.conv._ConvNd) and sub.padding_mode == "circular"
        batch_norm = isinstance(sub, nn.modules.batchnorm._BatchNorm) and (sub.training or not sub.track_running_stats)
        instance_norm = isinstance(sub, nn.modules.instancenorm._InstanceNorm) and (
            sub.training or not sub.track_running_stats
        )
        dropout = isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0
        global_mix = isinstance(sub, (
            nn.GroupNorm, nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
        ))
        if conv_circular or batch_norm or instance_norm or dropout or global_mix:
            return name, type(sub).__name__, _module_reason(sub, "")
    return None


# NOTE [Refusals name the module]
# The trace stops at the first op that breaks locality and blames the innermost module that was
# running. Known layers explain themselves in their own terms (GroupNorm, BatchNorm in train mode,
# circular padding, ...); a functional call in a custom forward gets the op's reason, e.g. "a
# reduction over the time axis" for ``x.mean(-1)``.


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Give `module` its buffers back after probe runs (a probe must not update running stats)."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _trace_length(length: int) -> int:
    return length * math.ceil(_MIN_TRACE_LENGTH / length) if length < _MIN_TRACE_LENGTH else length


def analyse(module: nn.Module, x: torch.Tensor, args: Sequence[Any], kwargs: Dict[str, Any], axis: int) -> ReceptiveField:
    """The analytic verdict (no probing): trace a meta copy of `module` on meta inputs like `x`.

    # NOTE [Two trace lengths]
    # Python code sees concrete lengths: ``x[..., -1:]`` or a buffer cut to ``x.shape[-1]`` look like
    # fixed offsets at one length. The module is traced at two lengths (the second twice the first,
    # which keeps any divisibility the model needs); ranges that move by a share of the length are
    # not local, small differences (parity effects of crops) are merged (`_merge`).
    """
    with _trace.isolated():  # NOTE [The trace is not part of the step] in trace.py
        return _analyse(module, x, args, kwargs, axis % x.ndim)


def _analyse(module: nn.Module, x: torch.Tensor, args: Sequence[Any], kwargs: Dict[str, Any], axis: int) -> ReceptiveField:
    clone = meta_clone(module) if _has_real_tensors(module) else module
    last_error: Optional[Exception] = None
    for length in dict.fromkeys((_trace_length(x.shape[axis]), x.shape[axis])):
        try:
            rf = _trace_at(module, clone, x, length, args, kwargs, axis)
        except Exception as error:  # the module rejected the traced length or reads values
            last_error = error
            continue
        if not rf.local:
            return rf
        try:
            again = _trace_at(module, clone, x, 2 * length, args, kwargs, axis)
        except Exception as error:
            return ReceptiveField(False, f"it fails on an input of {2 * length} samples after running on {length}: "
                                  f"{_first_line(error)}", "", type(module).__name__)
        merged = _merge(rf, again, length) if again.local else None
        if merged is None:
            return ReceptiveField(
                False,
                f"its dependence on the input changes with the length (traced at {length} and {2 * length} samples): "
                "it indexes the time axis from its end, or builds tensors from the input's length",
                "", type(module).__name__,
            )
        return merged
    return ReceptiveField(
        False,
        f"the length analysis runs the module on the meta device (shapes only) and it failed there: "
        f"{_first_line(last_error)}",
        "", type(module).__name__,
    )


def _first_line(error: Optional[Exception]) -> str:
    return str(error).splitlines()[0] if error is not None and str(error) else type(error).__name__


def _merge(first: ReceptiveField, second: ReceptiveField, length: int) -> Optional[ReceptiveField]:
    """Both traces' ranges, or None where they differ by a share of the length (NOTE [Two trace lengths]).

    Small differences are parity effects of a length-dependent crop (a U-Net's
    ``up(down(x))[..., : x.shape[-1]]`` trims one sample at odd lengths only): the union covers both.
    """
    if [(o.axis, o.stride) for o in first.outputs] != [(o.axis, o.stride) for o in second.outputs]:
        return None
    outputs = []
    for a, b in zip(first.outputs, second.outputs):
        if max(abs(a.lo - b.lo), abs(a.hi - b.hi)) * 2 > length:
            return None
        if a.length(2 * length) != b.length(2 * length) or b.length(length) != a.length(length):
            return None  # the output lengths follow the input in a way neither trace predicts
        outputs.append(dataclasses.replace(a, lo=min(a.lo, b.lo), hi=max(a.hi, b.hi)))
    return _summary(tuple(outputs), math.lcm(first.period, second.period), first.requirements + second.requirements,
                    first.edges + tuple(e for e in second.edges if e not in first.edges))


def _trace_at(module: nn.Module, clone: nn.Module, x: torch.Tensor, length: int, args, kwargs, axis: int) -> ReceptiveField:
    shape = list(x.shape)
    shape[axis] = length
    meta_x = torch.empty(shape, dtype=analysis_dtype(clone, x), device="meta")
    # The sequence passed again (self-attention's mha(x, x, x)) is the traced sequence, not a constant.
    leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
    meta_args, meta_kwargs = tree_unflatten([meta_x if v is x else to_meta(v) for v in leaves], spec)
    try:
        result = _trace.trace(clone, meta_x, meta_args, meta_kwargs, axis)
    except NotLocal as refusal:
        culprit = dict(module.named_modules()).get(refusal.module)
        reason = _module_reason(culprit, refusal.reason) if culprit is not None else refusal.reason
        return ReceptiveField(False, reason, refusal.module, type(culprit).__name__ if culprit is not None else None)
    return _verdict(result, axis)


def analysis_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype to analyse `module` in: x's, or its parameters' where x is of another float dtype.

    Under autocast a module's input can be bfloat16 while its weights are float32; autocast is no
    part of the analysis (which positions depend on which does not depend on precision), and without
    it a convolution rejects the mix.
    """
    if x.is_floating_point():
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return x.dtype


def _has_real_tensors(module: nn.Module) -> bool:
    return any(t.device.type != "meta" for t in list(module.parameters()) + list(module.buffers()))


def _verdict(result: _trace.TraceResult, axis: int) -> ReceptiveField:
    if not result.outputs:
        return ReceptiveField(False, "the module returns no tensor", "", None)
    for i, track in enumerate(result.outputs):
        if track is None:
            return ReceptiveField(False, f"output {i} does not depend on the input's time axis", "", None)
        if not track.plain:
            return ReceptiveField(False, f"output {i} has its time axis merged with another dim", "", None)
    outputs = tuple(OutputMap(t.axis, t.stride, t.lo, t.hi, t.length) for t in result.outputs)
    return _summary(outputs, result.period, (tuple(result.requirements),), tuple(result.edges))


def _summary(outputs: Tuple[OutputMap, ...], period: int, requirements: tuple, edges: tuple) -> ReceptiveField:
    first = outputs[0]
    left = max(0, max(math.ceil(-o.lo) for o in outputs))
    right = max(0, max(math.ceil(o.hi) for o in outputs))
    size = max(
        o.needs(j)[1] - o.needs(j)[0] + 1 for o in outputs for j in range(o.stride.denominator)
    )
    return ReceptiveField(
        True, left=left, right=right, stride=first.stride, period=period, size=size,
        outputs=outputs, requirements=requirements, edges=edges,
    )


def smallest_valid_length(rf: ReceptiveField, upper: int) -> int:
    """The shortest input the module accepts, by bisection below a length known to work."""
    low, high = 1, max(upper, 1)
    if not rf.valid_length(high):
        return high
    while low < high:
        mid = (low + high) // 2
        if rf.valid_length(mid):
            high = mid
        else:
            low = mid + 1
    # Validity need not be monotone (a model may take even lengths only): step up to a valid one.
    while not rf.valid_length(low) and low < upper:
        low += 1
    return low


def probe_length(rf: ReceptiveField, length: int) -> int:
    """How much of a `length`-sample input `probe` uses: a few receptive fields, at least a valid input."""
    return min(length, max(4 * (rf.size + rf.period), _MIN_TRACE_LENGTH, smallest_valid_length(rf, length)))


def batch_of_one(x: torch.Tensor, axis: int, args: Sequence[Any], kwargs: Dict[str, Any]) -> torch.Tensor:
    """``x[:1]`` when dim 0 is a batch that no other argument has to match, else `x`."""
    others = any(isinstance(v, torch.Tensor) for v in tree_flatten((tuple(args), dict(kwargs)))[0])
    return x[:1] if x.ndim > 1 and axis % x.ndim != 0 and not others else x


def probe(module: nn.Module, x: torch.Tensor, args: Sequence[Any], kwargs: Dict[str, Any], axis: int,
          rf: ReceptiveField) -> ReceptiveField:
    """Confirm `rf` on real values: outputs' gradients must not reach inputs outside their ranges.

    Probes the first, middle and last positions of every output on `x` cut to a few receptive
    fields (`probe_length`). A gradient can only be non-zero where a path exists, so a violation is
    never noise.
    """
    if not x.is_floating_point():
        return rf
    axis = axis % x.ndim
    length = x.shape[axis]
    xp = x.detach().narrow(axis, 0, min(length, probe_length(rf, length))).clone().requires_grad_(True)
    with buffers_kept(module), torch.enable_grad():
        outputs = [t for t in tree_flatten(module(xp, *args, **kwargs))[0] if isinstance(t, torch.Tensor)]
        checks = [(o, m, j) for o, m in zip(outputs, rf.outputs) if o.requires_grad
                  for j in sorted({0, o.shape[m.axis] // 2, o.shape[m.axis] - 1}) if o.shape[m.axis] > 0]
        for k, (out, omap, j) in enumerate(checks):
            seed = torch.zeros_like(out)
            seed.narrow(omap.axis, j, 1).fill_(1)
            (grad,) = torch.autograd.grad(out, xp, seed, retain_graph=k < len(checks) - 1, allow_unused=True)
            if grad is None:
                continue
            reduce = [d for d in range(grad.ndim) if d != axis]
            hit = (grad.abs().sum(dim=reduce) if reduce else grad.abs()).nonzero().flatten()
            if hit.numel() == 0:
                continue
            first, last = omap.needs(j)
            if first < 0:  # reflect/replicate padding at the start reads inwards (NOTE [Edge reads])
                last = max(last, rf.edge_stop(xp.shape[axis]) - 1)
            if last > xp.shape[axis] - 1:
                first = min(first, rf.edge_start(xp.shape[axis]))
            if hit.min().item() < first or hit.max().item() > last:
                return dataclasses.replace(
                    rf, local=False, module="", module_type=type(module).__name__,
                    reason=(f"probing found output position {j} depending on input positions "
                            f"{hit.min().item()}..{hit.max().item()}, outside the analysed range {first}..{last}: "
                            "the module does something the length analysis does not model"),
                )
    return dataclasses.replace(rf, probed=True)


def receptive_field(module: nn.Module, x: torch.Tensor, *args: Any, length_axis: int = -1,
                    probe_values: bool = True, **kwargs: Any) -> ReceptiveField:
    """Halo, stride, alignment period and locality verdict of `module` on inputs like `x`.

    Args:
        module: any ``nn.Module``; analysed in its current train/eval mode.
        x: an example input, ``(batch, channels, length)`` or ``(batch, length)``; only its shape,
            dtype and (for probing) a short prefix of its values are used.
        *args, **kwargs: further arguments of ``module``, passed through unchanged.
        length_axis: the time axis of `x`.
        probe_values: confirm the analysis by back-propagating from single outputs of the real
            module (a few receptive fields long, batch of one).

    The module is left as it was (parameters, buffers, gradients).

    Example::

        >>> rf = convmem.receptive_field(convmem.zoo.get("w2v2_fe", norm="layer").model, torch.randn(1, 16000))
        >>> rf.size, rf.stride
        (400, Fraction(320, 1))
        >>> convmem.receptive_field(nn.GroupNorm(1, 8), torch.randn(1, 8, 100)).explain()
        "not length-local: the module itself (GroupNorm): GroupNorm normalizes each group ... (gLN)"
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    rf = analyse(module, x, args, kwargs, length_axis)
    if rf.local and probe_values and x.device.type != "meta":
        rf = probe(module, batch_of_one(x, length_axis, args, kwargs), args, kwargs, length_axis, rf)
    return rf
