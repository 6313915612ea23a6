"""Which input positions every output position of a module depends on, from its aten ops.

The module runs on the ``meta`` device (shapes only, no memory, any length) under a
``TorchDispatchMode`` that follows the input's time axis through every op: each tensor derived from
the input carries a `Track` that says where its time axis is and which input positions each of its
positions needs. Known ops (convolutions, transposed convolutions, pads, pools, pointwise ops,
views, per-time-step norms, matrix products over channels, ...) update the track analytically; an
op that mixes the whole time axis (a norm or a pooling over time, attention, a recurrence, circular
padding, a random op) stops the trace with the reason and the module that ran it.

# NOTE [Validity ranges]
# A track maps position ``i`` of a tensor to the continuous range of base-input positions
# ``R(i) = [i * stride + lo, i * stride + hi]``. The contract: when the module runs on a window
# ``x[..., w0 : w0 + W]`` whose start ``w0`` is a multiple of the alignment period, position ``i``
# of the tensor in the window run equals position ``i + w0 / stride`` of the untiled run whenever
# ``ceil(lower end) >= 0`` (or the window starts at the sequence's start) and
# ``floor(upper end) <= W - 1`` (or the window ends at the sequence's end). That is more than a
# dependency range, in two ways that the pitfalls of DESIGN.md "Exact length tiling" demand:
#   * existence: a transposed conv's padding trims the end and strided convs floor, so an output
#     may be missing from a window's result although its inputs are there; `hi` covers the input
#     positions that must exist for the output position to exist;
#   * padding at window edges: a position that is padding in the window but data in the untiled run
#     (or the reverse) must never count as correct. The left end is kept honest by the invariant
#     ``lo <= stride - 1`` (then ``R(-1)`` always reaches below 0), enforced after every op.
# A consumer reading positions ``[j * s_op + l, j * s_op + h]`` of a tensor composes to
# ``stride' = s_op * stride, lo' = l * stride + lo, hi' = h * stride + hi``; continuous bounds only
# widen the ranges (ceil/floor of the exact index sets lie inside them), so they stay sufficient.

# NOTE [Edge reads]
# Reflect and replicate padding read data where zero padding reads none: at the sequence's start,
# the padding region of a reflect pad of width p mirrors positions 1..p of its input (replicate
# repeats position 0), and likewise at the end. Inside a window those regions are cropped halo, but
# at the sequence's true ends they are real and their reads fall outside the affine ranges above
# (position 0 of a reflect-padded conv reads up to p, not only up to its window). Each such pad is
# recorded (`EdgeRead`); a window that starts at the sequence's start must reach past every mirrored
# position's range, and one that ends at the sequence's end must start before them
# (`ReceptiveField.edge_stop`/`edge_start`). Found by the property tests: a reflect-padded conv with
# padding 87 and dilation 7 made output 0 depend on inputs 3..87.

# NOTE [Alignment period]
# A window may start at base position ``w0`` only if every tensor's grid lines up: ``w0 / stride``
# must be an integer for every tensor, and a multiple of every strided op's step where it is
# applied (a stride-2 conv followed by a stride-2 transposed conv has overall stride 1 and period
# 2). The period is the lcm of the numerators of ``stride`` and of ``step * stride`` over the trace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

LengthFn = Callable[[int], int]


@dataclasses.dataclass(frozen=True)
class Track:
    """Where a tensor's time axis is and which base-input positions each position needs.

    `outer`/`inner`: the time axis may be merged with other dims in one tensor dim (``(B, T, C)``
    viewed as ``(B * T, C)`` for a matmul): that dim has size ``outer * length * inner`` and the
    time index sits between them. `length(L)` is the axis length for a module input of length L.
    """

    axis: int
    stride: Fraction
    lo: Fraction
    hi: Fraction
    length: LengthFn
    outer: int = 1
    inner: int = 1

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def moved(self, axis: int) -> "Track":
        return dataclasses.replace(self, axis=axis)

    def then(self, step: Fraction, low: Fraction, high: Fraction, length: LengthFn) -> "Track":
        """The track of an op whose output j reads positions [j * step + low, j * step + high] of this one."""
        stride = step * self.stride
        lo = min(low * self.stride + self.lo, stride - 1)  # NOTE [Validity ranges]: left invariant
        hi = high * self.stride + self.hi
        return Track(self.axis, stride, lo, hi, length)


@dataclasses.dataclass(frozen=True)
class EdgeRead:
    """A reflect or replicate pad of a tensor with `track`: at the sequence's start it reads that
    tensor's position `first` (None: no left padding), at its end position ``length - 1 - last``."""

    track: Track
    first: Optional[int]
    last: Optional[int]


class NotLocal(Exception):
    """Raised inside the trace when an op makes the module non-local (or cannot be analysed)."""

    def __init__(self, reason: str, module: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.module = module


@dataclasses.dataclass
class TraceResult:
    """The tracks of the module's tensor outputs (in pytree order) and what the trace learned."""

    outputs: List[Optional[Track]]
    period: int
    requirements: List[Callable[[int], bool]]
    edges: List["EdgeRead"]


def _bind(func, args, kwargs) -> Dict[str, Any]:
    """Arguments of an aten call by schema name, defaults filled in."""
    bound: Dict[str, Any] = {}
    schema = func._schema.arguments
    for i, argument in enumerate(schema):
        if i < len(args) and not argument.kwarg_only:
            bound[argument.name] = args[i]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def _ops(*names: str) -> set:
    """The aten op packets of these names that this PyTorch has (the set differs across versions)."""
    return {getattr(aten, name) for name in names if hasattr(aten, name)}


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# Ops that change no position: the output's time axis is the input's.
_IDENTITY = _ops(
    "clone", "_to_copy", "alias", "detach", "lift_fresh", "lift_fresh_copy", "contiguous", "fill_", "zero_",
    "empty_like", "zeros_like", "ones_like", "full_like", "resolve_conj", "resolve_neg",
)
# Pointwise ops that PyTorch does not tag as such.
# Pointwise ops beyond those tagged ``pointwise``: some activations lack the tag in older releases
# (leaky_relu in PyTorch 2.11), and a missing tag must not refuse an exact tiling.
_POINTWISE = _ops(
    "_prelu_kernel", "where", "masked_fill", "masked_fill_", "leaky_relu", "leaky_relu_", "gelu", "gelu_",
    "silu", "silu_", "elu", "elu_", "celu", "selu", "hardtanh", "hardtanh_", "relu", "relu_", "relu6",
    "threshold", "sigmoid", "tanh", "softplus", "mish", "hardswish", "hardsigmoid", "clamp", "clamp_min",
    "clamp_max", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "erf", "square", "reciprocal",
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "logaddexp",
)
_TIME_REDUCTIONS = _ops(
    "sum", "mean", "amax", "amin", "var", "std", "var_mean", "std_mean", "prod", "logsumexp",
    "linalg_vector_norm", "norm", "max", "min", "argmax", "argmin", "any", "all", "nansum", "count_nonzero",
    "median", "nanmedian",
)
_ALONG_DIM = _ops(  # ops that work along one dim and keep the shape otherwise
    "_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "topk",
    "glu", "flip", "roll", "kthvalue",
)
_REASON_ALONG = {
    aten._softmax: "a softmax over the time axis", aten._log_softmax: "a log-softmax over the time axis",
    aten.cumsum: "a cumulative sum over time (every output depends on all earlier inputs)",
    aten.glu: "a GLU that splits the time axis in halves", aten.flip: "a flip of the time axis",
    aten.roll: "a roll of the time axis (wraps the ends onto each other)",
}
_POOLS = {
    getattr(aten, name): (kind, dims)
    for name, kind, dims in (
        ("max_pool1d_with_indices", "max", 1), ("max_pool2d_with_indices", "max", 2),
        ("max_pool3d_with_indices", "max", 3), ("max_pool1d", "max", 1), ("max_pool2d", "max", 2),
        ("avg_pool1d", "avg", 1), ("avg_pool2d", "avg", 2), ("avg_pool3d", "avg", 3),
    )
    if hasattr(aten, name)
}
_PADS = {
    getattr(aten, f"{kind}_pad{dims}d"): kind
    for kind in ("reflection", "replication") for dims in (1, 2, 3) if hasattr(aten, f"{kind}_pad{dims}d")
}
_VIEWS = _ops("view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy")
_SPLITS = _ops("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk", "tensor_split")
_NEW_LIKE = _ops("new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided")
_SHAPE = _ops(
    "unsqueeze", "squeeze", "transpose", "permute", "t", "expand", "select", "slice", "narrow", "index_select",
    "unbind", "movedim",
)
_BATCH_NORMS = _ops(
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "cudnn_batch_norm",
    "miopen_batch_norm", "_batch_norm_with_update", "_batch_norm_no_update",
)
_MATMULS = _ops("mm", "bmm", "addmm", "baddbmm")
_ADAPTIVE_POOLS = _ops(
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_avg_pool1d", "adaptive_max_pool1d",
)
_RECURRENT = _ops("lstm", "gru", "rnn_tanh", "rnn_relu", "_cudnn_rnn", "mkldnn_rnn_layer")
_ATTENTION = _ops(
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
)


class LengthTracer(TorchDispatchMode):
    """Follows the time axis of one input through every aten op (see module docstring)."""

    def __init__(self, names: Dict[int, str], trace_length: int):
        super().__init__()
        self._trace_length = trace_length  # the traced input's length: checks each op's predicted length
        self.tracks = WeakIdKeyDictionary()
        self.time_views = WeakIdKeyDictionary()  # views that cut the time axis of a tracked tensor
        self.period = 1
        self.requirements: List[Callable[[int], bool]] = []
        self.edges: List[EdgeRead] = []
        self.module_stack: List[str] = []
        self._names = names
        # (stride, traced length) -> the tracks of the tensors that had it, in the order they were made
        self._lengths: Dict[Tuple[Fraction, int], List[Track]] = {}

    # -- module attribution -----------------------------------------------------------------
    def push(self, module: nn.Module) -> None:
        self.module_stack.append(self._names.get(id(module), "?"))

    def pop(self) -> None:
        if self.module_stack:
            self.module_stack.pop()

    def fail(self, reason: str) -> NotLocal:
        """The refusal, blamed on the innermost module running (NOTE [Refusals name the module])."""
        return NotLocal(reason, self.module_stack[-1] if self.module_stack else "")

    # -- bookkeeping ------------------------------------------------------------------------
    def track_of(self, value: Any) -> Optional[Track]:
        return self.tracks.get(value) if isinstance(value, torch.Tensor) else None

    def _align(self, *steps: Fraction) -> None:
        for step in steps:
            self.period = math.lcm(self.period, Fraction(step).numerator)

    def assign(self, tensor: torch.Tensor, track: Track, func) -> None:
        if track.axis >= tensor.ndim:
            raise self.fail(f"the analysis lost the time axis at {func}")
        size = tensor.shape[track.axis]
        if track.plain:
            expected = track.length(self._trace_length)
            if expected != size:
                raise self.fail(
                    f"the analysis of {func} predicts a time axis of {expected} samples, the op made {size}: "
                    "an op the analysis does not model correctly",
                )
            self.requirements.append(lambda n, f=track.length: f(n) >= 1)
            self._lengths.setdefault((track.stride, size), []).append(track)
        self._align(track.stride)
        self.tracks[tensor] = track

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        if not any(isinstance(t, torch.Tensor) and t in self.tracks for t in flat):
            return out  # parameters, buffers, constants: nothing to follow
        if _has_tag(func, "nondeterministic_seeded"):
            raise self.fail(f"a random op ({func}, dropout or noise) on the sequence")
        self._rule(func, func.overloadpacket, args, kwargs, out)
        return out

    def _rule(self, func, packet, args, kwargs, out) -> None:  # noqa: C901 - a dispatch table
        if packet is aten.copy_:
            return self._copy(func, args, out)
        if _is_inplace(func):
            self._check_inplace(func, args[0])
        if packet in _IDENTITY:
            first = args[0]
            track = self.track_of(first)
            if track is not None and isinstance(out, torch.Tensor):
                self.assign(out, track, func)
            return
        if packet in _NEW_LIKE:
            # x.new_zeros(x.shape): a constant with the input's time axis; any other size: unrelated.
            track = self.track_of(args[0])
            if isinstance(out, torch.Tensor) and track is not None and out.shape == args[0].shape:
                self.assign(out, track, func)
            return
        if _has_tag(func, "pointwise") or packet in _POINTWISE:
            return self._pointwise(func, args, kwargs, out)
        if packet is aten.convolution:
            return self._convolution(func, _bind(func, args, kwargs), out)
        if packet is aten.constant_pad_nd:
            b = _bind(func, args, kwargs)
            return self._pad(func, b["self"], list(b["pad"]), out)
        if packet in _PADS:
            b = _bind(func, args, kwargs)
            return self._pad(func, b["self"], list(b["padding"]), out, mode=_PADS[packet])
        if packet in _POOLS:
            return self._pool(func, _POOLS[packet], _bind(func, args, kwargs), out)
        if packet in (aten.upsample_nearest1d, aten.upsample_linear1d):
            return self._upsample(func, packet, _bind(func, args, kwargs), out)
        if packet in _VIEWS:
            return self._view(func, args[0], out)
        if packet in _SHAPE:
            return self._shape(func, packet, _bind(func, args, kwargs), out)
        if packet in _SPLITS:
            return self._split(func, _bind(func, args, kwargs), out)
        if packet in (aten.cat, aten.stack):
            return self._cat(func, packet, _bind(func, args, kwargs), out)
        if packet in _TIME_REDUCTIONS:
            return self._reduce(func, _bind(func, args, kwargs), out)
        if packet in _ALONG_DIM:
            return self._along(func, packet, _bind(func, args, kwargs), out)
        if packet is aten.native_layer_norm:
            b = _bind(func, args, kwargs)
            track = self._input(b["input"], func)
            normalized = range(b["input"].ndim - len(b["normalized_shape"]), b["input"].ndim)
            if track.axis in normalized:
                raise self.fail("a LayerNorm over the time axis (it normalizes over the whole sequence)")
            return self._same(func, track, out)
        if packet in _BATCH_NORMS:
            return self._batch_norm(func, packet, _bind(func, args, kwargs), out)
        if packet is aten.native_group_norm:
            raise self.fail("a GroupNorm: it normalizes each group of channels over the whole time axis")
        if packet in _MATMULS:
            return self._matmul(func, packet, _bind(func, args, kwargs), out)
        if packet in _ADAPTIVE_POOLS:
            raise self.fail("an adaptive (global) pooling over the time axis")
        if packet in _RECURRENT:
            raise self.fail("a recurrent layer: every output depends on every earlier input")
        if packet in _ATTENTION:
            raise self.fail("attention: every output depends on every input")
        raise self.fail(f"{func} is not understood by the length analysis, so tiling cannot be proven exact")

    # -- rules ------------------------------------------------------------------------------
    def _input(self, tensor, func) -> Track:
        track = self.track_of(tensor)
        if track is None:
            raise self.fail(f"{func} uses a time-varying tensor in a role the analysis does not model")
        return track

    def _same(self, func, track: Track, out) -> None:
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.ndim > track.axis and t.shape[track.axis] == self._size(track):
                self.assign(t, track, func)

    def _size(self, track: Track) -> int:
        return track.outer * track.length(self._trace_length) * track.inner

    def _copy(self, func, args, out) -> None:
        dst, src = args[0], args[1]
        src_track, dst_track = self.track_of(src), self.track_of(dst)
        if dst in self.time_views or (dst._base is not None and dst.shape != dst._base.shape and src_track is not None):
            raise self.fail("an in-place write of the sequence into part of another tensor "
                            "(as circular padding does: it wraps the sequence's ends onto each other)")
        track = src_track or dst_track
        if src_track is not None and dst_track is not None:
            track = self._union([dst_track, src_track], func)
        if src_track is not None and src.shape != dst.shape:
            raise self.fail(f"{func} broadcasts the sequence into a tensor of another shape")
        self.assign(out, track, func)

    def _check_inplace(self, func, target) -> None:
        if isinstance(target, torch.Tensor) and target in self.time_views:
            raise self.fail(f"an in-place write ({func}) into part of the time axis")

    def _union(self, tracks: Sequence[Track], func) -> Track:
        first = tracks[0]
        for t in tracks[1:]:
            if t.stride != first.stride or t.axis != first.axis or (t.outer, t.inner) != (first.outer, first.inner):
                raise self.fail(f"{func} combines sequences at different rates or layouts")
        if len(tracks) > 1 and first.plain:
            fns = [t.length for t in tracks]
            self.requirements.append(lambda n, fns=fns: len({f(n) for f in fns}) == 1)
        return dataclasses.replace(
            first, lo=min(t.lo for t in tracks), hi=max(t.hi for t in tracks)
        )

    def _pointwise(self, func, args, kwargs, out) -> None:
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        if not outputs:
            return
        ndim = outputs[0].ndim
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tracks = []
        for t in flat:
            track = self.track_of(t)
            if track is not None:
                tracks.append(track.moved(track.axis + ndim - t.ndim))
        track = self._union(tracks, func)
        for t in flat:
            if t in self.tracks or t.ndim == 0:
                continue
            dim = track.axis - (ndim - t.ndim)
            if dim >= 0 and t.shape[dim] != 1 and t.stride(dim) != 0:
                raise self.fail(
                    f"{func} combines the sequence with a tensor of the same length that does not come from "
                    "the input (a fixed-length buffer, positional encoding or mask)",
                )
        for t in outputs:
            self.assign(t, track, func)

    def _convolution(self, func, b, out) -> None:
        track = self._input(b["input"], func)
        if self.track_of(b["weight"]) is not None or self.track_of(b["bias"]) is not None:
            raise self.fail("a convolution whose weights are computed from the sequence")
        spatial = track.axis - 2
        if not track.plain or spatial < 0:
            raise self.fail("a convolution over channels or batch rather than time")
        pick = lambda v: int(v[spatial] if len(v) > 1 else v[0])  # noqa: E731 - per-dim parameter
        stride, padding, dilation = pick(b["stride"]), pick(b["padding"]), pick(b["dilation"])
        kernel = b["weight"].shape[2 + spatial]
        extent = dilation * (kernel - 1)
        parent = track.length
        if b["transposed"]:
            out_pad = pick(b["output_padding"])
            low = Fraction(padding - extent, stride)
            high = Fraction(max(padding, 2 * padding - extent - out_pad + stride - 1), stride)
            length = lambda n: (parent(n) - 1) * stride - 2 * padding + extent + out_pad + 1  # noqa: E731
            new = track.then(Fraction(1, stride), low, high, length)
        else:
            length = lambda n: (parent(n) + 2 * padding - extent - 1) // stride + 1  # noqa: E731
            new = track.then(Fraction(stride), Fraction(-padding), Fraction(extent - padding), length)
            self._align(stride * track.stride)
            self.requirements.append(lambda n: parent(n) + 2 * padding >= extent + 1)
        self.assign(out, new, func)

    def _pad(self, func, x, pad: List[int], out, mode: str = "constant") -> None:
        track = self._input(x, func)
        index = x.ndim - 1 - track.axis  # pads are listed from the last dim backwards
        if 2 * index + 1 >= len(pad):
            return self._same(func, track, out)
        if not track.plain:
            raise self.fail(f"{func} on a time axis merged with other dims")
        left, right = int(pad[2 * index]), int(pad[2 * index + 1])
        parent = track.length
        new = track.then(Fraction(1), Fraction(-left), Fraction(max(-left, -left - right)),
                         lambda n: parent(n) + left + right)
        if mode == "reflection":
            self.requirements.append(lambda n: parent(n) > max(left, right))
        if mode != "constant":
            # NOTE [Edge reads]: the padding reads positions near the ends (mirrored or repeated).
            reach = (left, right) if mode == "reflection" else (0, 0)
            self.edges.append(EdgeRead(track, reach[0] if left > 0 else None, reach[1] if right > 0 else None))
        self.assign(out, new, func)

    def _pool(self, func, kind, b, out) -> None:
        track = self._input(b["self"], func)
        ndim = b["self"].ndim
        spatial = track.axis - (ndim - kind[1])
        if not track.plain or spatial < 0:
            raise self.fail(f"{func} over a dim that is not spatial")
        pick = lambda v, default: int((v[spatial] if len(v) > 1 else v[0]) if v else default)  # noqa: E731
        kernel = pick(b["kernel_size"], 1)
        stride = pick(b["stride"], kernel)
        padding = pick(b["padding"], 0)
        dilation = pick(b.get("dilation") or [1], 1)
        ceil_mode = bool(b["ceil_mode"])
        extent = dilation * (kernel - 1)
        parent = track.length

        def length(n: int) -> int:
            span = parent(n) + 2 * padding - extent - 1
            size = (_ceil_div(span, stride) if ceil_mode else span // stride) + 1
            if ceil_mode and (size - 1) * stride >= parent(n) + padding:
                size -= 1
            return size

        new = track.then(Fraction(stride), Fraction(-padding), Fraction(extent - padding), length)
        self._align(stride * track.stride)
        self.requirements.append(lambda n: parent(n) + 2 * padding >= extent + 1)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self.assign(t, new, func)

    def _upsample(self, func, packet, b, out) -> None:
        x = b["self"] if "self" in b else b["input"]  # the .vec overloads name it input
        track = self._input(x, func)
        scales = b.get("scales") if "scales" in b else (b.get("scale_factors") or [None])[0]
        if scales is None or not track.plain or track.axis != x.ndim - 1:
            raise self.fail("an interpolation to a fixed output size (it depends on the whole length)")
        if packet is aten.upsample_linear1d and b["align_corners"]:
            raise self.fail("a linear interpolation with align_corners=True (its grid depends on the length)")
        factor = Fraction(scales).limit_denominator(1000)
        if factor.denominator != 1 or factor < 1:
            raise self.fail(f"an interpolation by the non-integer factor {scales}")
        factor = int(factor)
        parent = track.length
        length = lambda n: parent(n) * factor  # noqa: E731
        if packet is aten.upsample_nearest1d:
            new = track.then(Fraction(1, factor), Fraction(-1), Fraction(0), length)
        else:
            half = Fraction(1, 2 * factor)
            new = track.then(Fraction(1, factor), half - Fraction(3, 2), half + Fraction(1, 2), length)
        self.assign(out, new, func)

    def _view(self, func, x, out) -> None:
        track = self._input(x, func)
        n = track.length(self._trace_length)
        element = track.inner * math.prod(x.shape[track.axis + 1:])  # elements per time step
        shape = list(out.shape)
        for k in range(len(shape)):
            step = math.prod(shape[k + 1:])
            if element % step == 0 and (step * shape[k]) % (element * n) == 0:
                inner = element // step
                outer = shape[k] * step // (element * n)
                self.assign(out, dataclasses.replace(track, axis=k, outer=outer, inner=inner), func)
                return
        raise self.fail(f"a reshape that splits the time axis ({tuple(x.shape)} -> {tuple(out.shape)})")

    def _shape(self, func, packet, b, out) -> None:  # noqa: C901 - one branch per view op
        x = b["self"]
        track = self._input(x, func)
        axis, ndim = track.axis, x.ndim
        if packet is aten.unsqueeze:
            dim = _norm_dim(b["dim"], ndim + 1)
            return self.assign(out, track.moved(axis + (dim <= axis)), func)
        if packet is aten.squeeze:
            dims = b.get("dim")
            if dims is None:
                dims = [d for d in range(ndim) if x.shape[d] == 1]
            dims = [_norm_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            dims = [d for d in dims if x.shape[d] == 1]
            if axis in dims:
                raise self.fail("a squeeze of the time axis (a sequence of length one)")
            return self.assign(out, track.moved(axis - sum(d < axis for d in dims)), func)
        if packet is aten.transpose:
            d0, d1 = _norm_dim(b["dim0"], ndim), _norm_dim(b["dim1"], ndim)
            return self.assign(out, track.moved(d1 if axis == d0 else d0 if axis == d1 else axis), func)
        if packet is aten.t:
            return self.assign(out, track.moved(ndim - 1 - axis if ndim == 2 else axis), func)
        if packet is aten.permute:
            dims = [_norm_dim(d, ndim) for d in b["dims"]]
            return self.assign(out, track.moved(dims.index(axis)), func)
        if packet is aten.movedim:
            perm = list(range(ndim))
            sources = b["source"] if isinstance(b["source"], (list, tuple)) else [b["source"]]
            dests = b["destination"] if isinstance(b["destination"], (list, tuple)) else [b["destination"]]
            order = [None] * ndim
            for s, d in zip(sources, dests):
                order[_norm_dim(d, ndim)] = _norm_dim(s, ndim)
            rest = iter(d for d in perm if d not in order)
            order = [o if o is not None else next(rest) for o in order]
            return self.assign(out, track.moved(order.index(axis)), func)
        if packet is aten.expand:
            new_axis = axis + len(b["size"]) - ndim
            if out.shape[new_axis] != x.shape[axis]:
                raise self.fail("an expand of the time axis")
            return self.assign(out, track.moved(new_axis), func)
        if packet in (aten.select, aten.index_select, aten.unbind):
            dim = _norm_dim(b.get("dim", 0) or 0, ndim)
            if dim == axis:
                raise self.fail("picks single time steps (select/index along time)")
            removed = packet is not aten.index_select
            new = track.moved(axis - (removed and dim < axis))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                self.assign(t, new, func)
            return
        # slice / narrow
        dim = _norm_dim(b["dim"], ndim)
        if dim != axis:
            return self.assign(out, track, func)
        if not track.plain:
            raise self.fail("a slice of a time axis merged with other dims")
        n = x.shape[axis]
        if packet is aten.narrow:
            start, end, step = int(b["start"]), int(b["start"]) + int(b["length"]), 1
        else:
            start = 0 if b["start"] is None else int(b["start"])
            end = n if b["end"] is None else int(b["end"])
            step = int(b["step"])
        explicit_end = end <= n  # ``y[..., :m]`` with a length m; ``y[..., a:]`` passes a huge end
        start, end = (s + n if s < 0 else s for s in (start, end))
        start, end = max(0, min(start, n)), max(0, min(end, n))
        parent = track.length
        # The latest other sequence of that rate and length: a causal conv's chomp cuts to its own
        # input's length, not to an earlier tensor that happens to match it at the traced length
        # (a stride-2 conv's output before a stride-2 pool); `y[..., : x.shape[-1]]` still finds x.
        other = next((t for t in reversed(self._lengths.get((track.stride, end), [])) if t is not track),
                     None) if explicit_end else None
        if other is not None:
            # Cut to another sequence's length (``y[..., : x.shape[-1]]`` after an up-sampling): the
            # end follows that sequence, whose positions must then exist too.
            length = lambda m: max(0, _ceil_div(min(parent(m), other.length(m)) - start, step))  # noqa: E731
            new = track.then(Fraction(step), Fraction(start), Fraction(start), length)
            new = dataclasses.replace(new, lo=min(new.lo, other.lo), hi=max(new.hi, other.hi))
        else:
            # The start counts from the sequence's start, the end from its end (a causal conv's chomp).
            crop = n - end
            length = lambda m: max(0, _ceil_div(parent(m) - crop - start, step))  # noqa: E731
            new = track.then(Fraction(step), Fraction(start), Fraction(start + crop), length)
        self._align(step * track.stride)
        self.time_views[out] = True
        self.assign(out, new, func)

    def _split(self, func, b, out) -> None:
        x = b["self"]
        track = self._input(x, func)
        if _norm_dim(b.get("dim", 0) or 0, x.ndim) == track.axis:
            raise self.fail("a split of the time axis into pieces")
        for t in out:
            self.assign(t, track, func)

    def _cat(self, func, packet, b, out) -> None:
        tensors = [t for t in b["tensors"] if not (packet is aten.cat and t.ndim == 1 and t.numel() == 0)]
        ndim = out.ndim
        dim = _norm_dim(b["dim"], ndim)
        tracks = [(i, self.tracks[t]) for i, t in enumerate(tensors) if t in self.tracks]
        if packet is aten.stack:
            tracks = [(i, t.moved(t.axis + (dim <= t.axis))) for i, t in tracks]
        track = self._union([t for _, t in tracks], func)
        if packet is aten.cat and dim == track.axis:
            if len(tracks) != 1 or not track.plain:
                raise self.fail("a concatenation of sequences along the time axis")
            index = tracks[0][0]
            left = sum(t.shape[dim] for t in tensors[:index])
            right = sum(t.shape[dim] for t in tensors[index + 1:])
            parent = track.length
            new = track.then(Fraction(1), Fraction(-left), Fraction(-left), lambda n: parent(n) + left + right)
            return self.assign(out, new, func)
        for t in tensors:
            if t in self.tracks:
                continue
            aligned = track.axis - (packet is aten.stack and dim < track.axis)
            if 0 <= aligned < t.ndim and t.shape[aligned] != 1 and t.stride(aligned) != 0:
                raise self.fail(f"{func} joins the sequence with a fixed tensor of the same length")
        self.assign(out, track, func)

    def _reduce(self, func, b, out) -> None:
        x = b.get("self", b.get("input"))
        track = self._input(x, func)
        dims = b.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise self.fail("a reduction over the whole tensor, time axis included (global pooling)")
        dims = [_norm_dim(d, x.ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if track.axis in dims:
            raise self.fail("a reduction over the time axis (global pooling, a mean or a norm over time)")
        keep = bool(b.get("keepdim"))
        new = track if keep else track.moved(track.axis - sum(d < track.axis for d in dims))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self.assign(t, new, func)

    def _along(self, func, packet, b, out) -> None:
        x = b["self"]
        track = self._input(x, func)
        dims = b["dims"] if "dims" in b else b.get("dim")
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        if packet is aten.roll and not dims:  # roll without dims rolls the flattened tensor
            dims = [track.axis]
        dims = [_norm_dim(d, x.ndim) for d in dims if d is not None]
        if track.axis in dims:
            raise self.fail(_REASON_ALONG.get(packet, f"{func} along the time axis"))
        self._same(func, track, out)

    def _batch_norm(self, func, packet, b, out) -> None:
        x = b["input"]
        track = self._input(x, func)
        training = b.get("training")
        if training or func.__name__.startswith("_batch_norm_with_update"):
            raise self.fail(
                "a BatchNorm in train mode: it normalizes with statistics over the batch and the whole time "
                "axis (in eval mode it is local: call .eval())",
            )
        if track.axis == 1:
            raise self.fail("a BatchNorm whose channel axis is the time axis")
        self._same(func, track, out)

    def _matmul(self, func, packet, b, out) -> None:
        batched = packet in (aten.bmm, aten.baddbmm)
        if packet in (aten.mm, aten.bmm):
            a, m, bias = b["self"], b["mat2"], None
        elif packet is aten.addmm:
            a, m, bias = b["mat1"], b["mat2"], b["self"]
        else:
            a, m, bias = b["batch1"], b["batch2"], b["self"]
        ta, tm = self.track_of(a), self.track_of(m)
        rows, cols = (1, 2) if batched else (0, 1)  # a: (..., rows, k), m: (..., k, cols)
        if ta is not None and tm is not None:
            if not (batched and ta.axis == 0 and tm.axis == 0):
                raise self.fail("a product of two time-varying tensors (attention: every output depends on every input)")
            track = self._union([ta, tm], func)
        elif ta is not None:
            if ta.axis == cols:
                raise self.fail("a matrix product that sums over the time axis")
            track, other = ta, m
        else:
            if tm.axis == rows:
                raise self.fail("a matrix product that sums over the time axis")
            track, other = tm, a
        if batched and track.axis == 0 and (ta is None or tm is None) and other.shape[0] > 1 and other.stride(0) != 0:
            raise self.fail(f"{func} pairs each time step with a fixed tensor of the same length")
        bias_track = self.track_of(bias)
        if bias_track is not None:
            track = self._union([track, bias_track.moved(bias_track.axis + out.ndim - bias.ndim)], func)
        self.assign(out, track, func)



_STATE = threading.local()


@contextlib.contextmanager
def active():
    """Mark a length trace as running: convmem wrappers inside then run their module plainly."""
    previous = getattr(_STATE, "active", False)
    _STATE.active = True
    try:
        yield
    finally:
        _STATE.active = previous


def is_active() -> bool:
    return getattr(_STATE, "active", False)


# NOTE [The trace is not part of the step]
# A length trace runs the module at full length (and twice that, NOTE [Two trace lengths] in
# receptive_field.py) on the meta device. On a GPU those meta tensors take no device memory, but
# the no-GPU estimate runs the step itself on meta under modes of its own: the simulated CUDA
# allocator (a dispatch mode that counts every meta storage) and simulated autocast (a function
# mode that casts and caches weights). Seen by them, the trace of a `Tiled` module's first call
# counted as a forward at twice the whole input's length: 2.8 GiB estimated for tcn in tiles of
# 4096 against 1.03 GiB measured on an H200. So the trace runs outside every mode its caller
# entered, and `is_active()` tells module hooks (the profile's recorder) that these calls are not
# the step's.


@contextlib.contextmanager
def isolated():
    """An analysis, not the caller's computation: the caller's torch-function and dispatch modes are
    popped, and `is_active()` is true (NOTE [The trace is not part of the step])."""
    from torch.utils._python_dispatch import _disable_current_modes

    function_modes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    try:
        with _disable_current_modes(), active():
            yield
    finally:
        for mode in reversed(function_modes):
            torch._C._push_on_torch_function_stack(mode)


def trace(module: nn.Module, x: torch.Tensor, args: Sequence[Any], kwargs: Dict[str, Any], axis: int) -> TraceResult:
    """Run `module` (already on the meta device) on meta `x` and follow its time axis `axis`.

    Runs `isolated()` from the caller (NOTE [The trace is not part of the step]). Raises
    `NotLocal` with the reason and the submodule at fault.
    """
    names = {id(m): name for name, m in module.named_modules()}
    tracer = LengthTracer(names, x.shape[axis])
    handles = []
    for m in module.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, inp: tracer.push(mod)))
        handles.append(m.register_forward_hook(lambda mod, inp, out: tracer.pop()))
    identity = lambda n: n  # noqa: E731
    try:
        with isolated(), torch.no_grad(), tracer:
            tracer.assign(x, Track(axis, Fraction(1), Fraction(0), Fraction(0), identity), "the input")
            output = module(x, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    return TraceResult([tracer.tracks.get(t) for t in leaves], tracer.period, tracer.requirements, tracer.edges)


def _has_tag(func, name: str) -> bool:
    # Op tags differ between PyTorch releases (``torch.Tag.inplace`` is newer than 2.11): a tag
    # this release does not define is a tag no op carries.
    tag = getattr(torch.Tag, name, None)
    return tag is not None and tag in func.tags


def _is_inplace(func) -> bool:
    """Whether `func` writes into its first argument (``add_``, ``relu_``, ...)."""
    if _has_tag(func, "inplace"):
        return True
    schema = func._schema
    return bool(schema.arguments) and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write \
        and not func._opname.endswith("_out") and func.overloadpacket.__name__.endswith("_")
