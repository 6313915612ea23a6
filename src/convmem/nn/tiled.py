"""`Tiled`: run a length-local module tile by tile, forward and backward, with exact results.

Memory stops growing with sequence length inside the module: only its input and output exist at
full length; everything else exists for one tile (plus halo) at a time. Outputs and gradients equal
the untiled module's up to floating-point reassociation.

# NOTE [Tiled autograd]
# Training runs the module through `_TiledFunction`. Forward runs every window under no_grad and
# copies each tile's own outputs into preallocated full-length outputs, so nothing inside the
# module is kept; only the input (and tensor arguments that need a gradient) are saved. Backward
# re-runs each window with autograd and back-propagates that tile's slice of the output gradient
# with ``torch.autograd.grad``: a window's input gradient is added into the full input gradient
# (windows overlap by the halo) and parameter gradients are summed over tiles. The parameters are
# inputs of the Function, so autograd accumulates each ``.grad`` exactly once per backward, as for
# the untiled module (gradient hooks, DDP). Autocast state is captured in forward and re-entered in
# backward, as torch.utils.checkpoint does.

# NOTE [Verify before use]
# The first call with a new input signature (shape without batch and length, dtype, device,
# train/eval modes, extra arguments) analyses the module (`receptive_field`: the analytic trace,
# then the gradient probe) and verifies the tiling: a prefix of the real input (batch of one when
# no other tensor is passed) runs tiled, in at least two tiles where the prefix allows, and untiled;
# the outputs must agree to within floating-point reassociation (`_TOLERANCE`). A module that is
# not length-local, or whose tiling disagrees, is refused with the reason; it is never approximated.
# On the meta device (convmem.profile's estimate) there are no values: the analysis alone decides.

# NOTE [Dropout is refused]
# Dropout in train mode draws one random mask per position. A tiled run draws masks per window,
# halos twice, and backward would have to replay each window's RNG state; even then the masks would
# differ from the untiled run's, so the result could not be verified equal to it. Rather than
# silently train a different model, a tiled module with an active Dropout is refused (eval mode, or
# p=0, is fine). Put dropout outside the tiled part, or tile the blocks between dropouts.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..analysis import trace as _trace
from ..analysis.receptive_field import (
    ReceptiveField, analyse, batch_of_one, buffers_kept, known_refusal, probe, probe_length,
)
from ..analysis.windows import Window, plan_windows
from ._wrapper import ModuleWrapper

__all__ = ["Tiled", "check_tile_length", "check_tiling"]

# Largest |tiled - untiled| accepted, relative to max |untiled|, by dtype (NOTE [Verify before use]).
# A window runs the same ops as the full input, but kernels may pick other algorithms and blockings
# for other shapes (cuDNN with TF32, oneDNN): float32 gets room for that. A locality error moves
# outputs by O(1) of their scale.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
_TOLERANCE_CUDA_FLOAT32 = 2e-3  # TF32 convolutions (cuDNN's default) round inputs to 10 mantissa bits


def check_tile_length(tile_length: Any) -> int:
    """`tile_length` as an int, or a ValueError saying what is wrong with it."""
    if isinstance(tile_length, bool) or not isinstance(tile_length, int) or tile_length < 1:
        raise ValueError(f"tile_length must be a positive integer number of input samples, got {tile_length!r}")
    return tile_length


class _Runner:
    """One call of the wrapped module over a list of windows (no autograd here).

    The module's extra arguments are flattened; those tensors that need a gradient are replaced per
    call (the Function's inputs in forward, fresh leaves in backward).
    """

    def __init__(self, module: nn.Module, rf: ReceptiveField, windows: List[Window], axis: int,
                 args: Sequence[Any], kwargs: Dict[str, Any]):
        self.module, self.rf, self.windows, self.axis = module, rf, windows, axis
        self.leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.grad_index = [i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor) and v.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.out_spec = None
        self.out_constants: List[Any] = []

    @property
    def grad_leaves(self) -> List[torch.Tensor]:
        return [self.leaves[i] for i in self.grad_index]

    def call(self, window_input: torch.Tensor, grad_leaves: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        leaves = list(self.leaves)
        for i, t in zip(self.grad_index, grad_leaves):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        flat, spec = tree_flatten(self.module(window_input, *args, **kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.rf.outputs):
            raise RuntimeError(
                f"the module returned {len(tensors)} tensors on a tile and {len(self.rf.outputs)} when analysed"
            )
        if self.out_spec is None:
            self.out_spec = spec
            self.out_constants = [None if isinstance(v, torch.Tensor) else v for v in flat]
        return tensors

    def window(self, x: torch.Tensor, w: Window) -> torch.Tensor:
        return x.narrow(self.axis, w.start, w.stop - w.start)

    def forward(self, x: torch.Tensor, grad_leaves: Sequence[torch.Tensor],
                outs: Optional[Sequence[torch.Tensor]] = None, move=None, allocate=None,
                progress=None) -> Tuple[torch.Tensor, ...]:
        """Every window in turn; each tile's own outputs are copied into full-length `outs`.

        `move(window)` brings a window to the module's device (infer_tiled streams from the CPU);
        `outs` may be given (preallocated, on any device, checked against the first tile), else
        ``allocate(shape, dtype)`` makes them (default: on the module's output device).
        `progress(stop)` is told the input position each window ends at.
        """
        lengths = self.rf.output_lengths(x.shape[self.axis])
        for w in self.windows:
            window = self.window(x, w)
            tensors = self.call(move(window) if move is not None else window, grad_leaves)
            if outs is None or w is self.windows[0]:
                shapes = []
                for t, omap, n in zip(tensors, self.rf.outputs, lengths):
                    shape = list(t.shape)
                    shape[omap.axis] = n
                    shapes.append(shape)
                if outs is None:
                    outs = [
                        allocate(shape, t.dtype) if allocate is not None else torch.empty(shape, dtype=t.dtype, device=t.device)
                        for shape, t in zip(shapes, tensors)
                    ]
                elif len(outs) != len(shapes) or any(list(o.shape) != s for o, s in zip(outs, shapes)):
                    raise ValueError(
                        f"out has shapes {[tuple(o.shape) for o in outs]}; the outputs have shapes "
                        f"{[tuple(s) for s in shapes]}"
                    )
            for out, t, omap, (offset, first, count) in zip(outs, tensors, self.rf.outputs, w.crops):
                produced = t.shape[omap.axis] - offset
                at_end = w.stop == x.shape[self.axis] and first + count == out.shape[omap.axis]
                if produced < count or (at_end and produced != count):
                    raise RuntimeError(
                        f"the length analysis predicted {out.shape[omap.axis]} output samples for an input of "
                        f"{x.shape[self.axis]}; the module's lengths depend on the input in a way it does not "
                        "model (padding or cropping computed from another tensor's length?)"
                    )
                if count:
                    out.narrow(omap.axis, first, count).copy_(t.narrow(omap.axis, offset, count))
            if progress is not None:
                progress(w.stop)
        return tuple(outs)

    def unflatten(self, outs: Sequence[torch.Tensor]) -> Any:
        tensors = iter(outs)
        return tree_unflatten([next(tensors) if v is None else v for v in self.out_constants], self.out_spec)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _autocast_state(device_type: str) -> Optional[Dict[str, Any]]:
    if not torch.amp.is_autocast_available(device_type):  # the meta device of convmem.profile's estimate
        return None
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


class _TiledFunction(torch.autograd.Function):
    """See NOTE [Tiled autograd]. Inputs: runner, x, tensor arguments needing grad, parameters."""

    @staticmethod
    def forward(ctx, runner: _Runner, x: torch.Tensor, *tensors: torch.Tensor):
        extra = len(runner.grad_index)
        ctx.runner = runner
        ctx.autocast = _autocast_state(x.device.type)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *tensors[:extra])
        return runner.forward(x, tensors[:extra])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        runner: _Runner = ctx.runner
        x, *extras = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        need_x = needs[0]
        extra_wrt = [i for i in range(len(extras)) if needs[1 + i]]
        param_wrt = [i for i in range(len(runner.params)) if needs[1 + len(extras) + i]]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_extras: List[Optional[torch.Tensor]] = [None] * len(extras)
        grad_params: List[Optional[torch.Tensor]] = [None] * len(runner.params)
        autocast = torch.autocast(**ctx.autocast) if ctx.autocast is not None else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            for w in runner.windows:
                wanted = [k for k, (g, crop) in enumerate(zip(grads, w.crops)) if g is not None and crop[2]]
                if not wanted:
                    continue
                xw = runner.window(x, w).detach().requires_grad_(need_x)
                leaves = [e.detach().requires_grad_(i in extra_wrt) for i, e in enumerate(extras)]
                tensors = runner.call(xw, leaves)
                outs, seeds = [], []
                for k in wanted:
                    offset, first, count = w.crops[k]
                    axis = runner.rf.outputs[k].axis
                    if tensors[k].requires_grad:
                        outs.append(tensors[k].narrow(axis, offset, count))
                        seeds.append(grads[k].narrow(axis, first, count))
                inputs = ([xw] if need_x else []) + [leaves[i] for i in extra_wrt] + [runner.params[i] for i in param_wrt]
                if not outs or not inputs:
                    continue
                got = list(torch.autograd.grad(outs, inputs, seeds, allow_unused=True))
                if need_x:
                    g = got.pop(0)
                    if g is not None:
                        grad_x.narrow(runner.axis, w.start, w.stop - w.start).add_(g)
                for store, index in ((grad_extras, extra_wrt), (grad_params, param_wrt)):
                    for i in index:
                        g = got.pop(0)
                        if g is not None:
                            store[i] = g if store[i] is None else store[i].add_(g)
        return (None, grad_x, *grad_extras, *grad_params)


class Tiled(ModuleWrapper):
    """Runs a length-local `module` in tiles of `tile_length` input samples; exact outputs and gradients.

    Args:
        module: the module to tile. Its first argument is the sequence, ``x: (batch, channels,
            length)`` or ``(batch, length)`` (time on `length_axis`); other arguments pass through
            to every tile unchanged (tensors among them must not have a time axis).
        tile_length: input samples per tile; rounded down to a multiple of the module's alignment
            period (its total stride for a downsampling stack: 320 for wav2vec 2.0's encoder).
            An input shorter than a tile runs untiled, as one tile.
        length_axis: the time axis of the input.
        verify: check the tiling against the untiled module on a prefix of the first input of every
            new signature (NOTE [Verify before use]).
        on_refuse: ``"raise"`` a ValueError when the module turns out not to be length-local (or
            the tiling fails verification), or ``"warn"`` and run it untiled (what `tile_` uses).
        name: how messages name the module (default: its class name).

    Raises ValueError at construction for a bad `tile_length` or a module whose layers make it
    non-local in the current mode (BatchNorm in train mode, GroupNorm, circular padding, an active
    Dropout, ...); at the first call for a non-local forward, or a tile shorter than the period.

    Memory: training keeps the input and output at full length; everything inside the module
    exists for one window at a time (forward and backward). Time: about one extra forward of the
    module, plus the halos (``(left + right) / tile_length`` of the work), plus a one-off analysis
    and verification at the first call of each input signature.

    Numerics: the same ops on shorter inputs; results differ from the untiled module only by
    floating-point reassociation (kernels may block sums differently for other shapes).

    Example::

        >>> block = nn.Sequential(nn.Conv1d(64, 64, 3, padding=1), nn.GELU(), nn.Conv1d(64, 64, 3, padding=1))
        >>> tiled = convmem.nn.Tiled(block, tile_length=4096)
        >>> y = tiled(torch.randn(8, 64, 1_000_000))      # same numbers as block(x), bounded memory
    """

    def __init__(self, module: nn.Module, tile_length: int, *, length_axis: int = -1, verify: bool = True,
                 on_refuse: str = "raise", name: Optional[str] = None):
        tile_length = check_tile_length(tile_length)
        if on_refuse not in ("raise", "warn"):
            raise ValueError(f"on_refuse must be 'raise' or 'warn', got {on_refuse!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        name = name or type(module).__name__
        if isinstance(module, Tiled):
            raise ValueError(f"{name} is already tiled")
        refusal = known_refusal(module)
        if refusal is not None:
            where, kind, reason = refusal
            raise ValueError(
                f"cannot tile {name}: not length-local: {repr(where) if where else 'the module itself'} ({kind}): {reason}"
            )
        super().__init__(module)
        self.tile_length = tile_length
        self.length_axis = length_axis
        self.verify = verify
        self.on_refuse = on_refuse
        self.name = name
        self.last_windows = 0  # windows of the last call: 1 means it ran untiled
        self._fields: Dict[Any, Optional[ReceptiveField]] = {}

    def extra_repr(self) -> str:
        return f"tile_length={self.tile_length}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _trace.is_active():
            return self.wrapped(x, *args, **kwargs)
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise TypeError(f"{self.name}: the first argument must be a sequence tensor, got {type(x).__name__}")
        axis = self.length_axis % x.ndim
        rf, windows = self._plan(x, axis, args, kwargs)
        if rf is None or len(windows) == 1:
            return self.wrapped(x, *args, **kwargs)
        runner = _Runner(self.wrapped, rf, windows, axis, args, kwargs)
        if torch.is_grad_enabled() and (x.requires_grad or runner.params or runner.grad_index):
            outs = _TiledFunction.apply(runner, x, *runner.grad_leaves, *runner.params)
        else:
            outs = runner.forward(x, runner.grad_leaves)
        return runner.unflatten(outs)

    @torch.compiler.disable
    def _plan(self, x: torch.Tensor, axis: int, args, kwargs) -> Tuple[Optional[ReceptiveField], List[Window]]:
        """The analysis (once per signature) and this input's windows.

        # NOTE [Tiling under torch.compile]
        # Analysis, probe and verification (a dispatch-mode trace, deep copies, autograd probes) and
        # window planning (exact fractions) are plain Python that runs eagerly: torch.compile breaks
        # the graph here and compiles the module calls of the tiles around it.
        """
        rf = self.receptive_field(x, *args, **kwargs)
        windows = [] if rf is None else plan_windows(rf, x.shape[axis], self.tile_length // rf.period * rf.period)
        self.last_windows = max(1, len(windows))
        return rf, windows

    def receptive_field(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Optional[ReceptiveField]:
        """The verified analysis for inputs like `x` (cached per signature); None if refused with a warning."""
        axis = self.length_axis % x.ndim
        key = self._signature(x, axis, args, kwargs)
        if key in self._fields:
            return self._fields[key]
        rf, problem = check_tiling(self.wrapped, x, args, kwargs, axis, self.tile_length, self.verify)
        if problem is not None:
            message = f"cannot tile {self.name}: {problem}"
            if self.on_refuse == "raise":
                raise ValueError(message)
            warnings.warn(message + "; it runs untiled", stacklevel=3)
            rf = None
        self._fields[key] = rf
        return rf

    def _signature(self, x: torch.Tensor, axis: int, args, kwargs) -> tuple:
        shape = list(x.shape)
        shape[axis] = -1
        if x.ndim > 1 and axis != 0:
            shape[0] = -1
        extra = []
        for v in tree_flatten((args, kwargs))[0]:
            if isinstance(v, torch.Tensor):
                extra.append((tuple(v.shape), v.dtype, v.device.type))
            else:
                try:
                    hash(v)
                    extra.append(v)
                except TypeError:
                    extra.append(type(v).__name__)
        modes = tuple(m.training for m in self.wrapped.modules())
        return tuple(shape), x.dtype, x.device, axis, modes, tuple(extra)


def check_tiling(module: nn.Module, x: torch.Tensor, args: Sequence[Any], kwargs: Dict[str, Any], axis: int,
                 tile_length: int, verify: bool = True,
                 device: Optional[torch.device] = None) -> Tuple[ReceptiveField, Optional[str]]:
    """Analyse, probe and verify tiling `module` in tiles of `tile_length` (NOTE [Verify before use]).

    Returns the analysis and None, or the analysis and why the tiling is refused. Probe and
    verification run on a prefix of `x` (batch of one where possible) moved to `device`.
    """
    rf = analyse(module, x, args, kwargs, axis)
    if not rf.local:
        return rf, rf.explain()
    if tile_length < rf.period:
        return rf, (
            f"tile_length {tile_length} is shorter than its alignment period of {rf.period} input samples "
            f"(stride {rf.stride}): tiles must start on multiples of it; use a tile_length of at least "
            f"{rf.period}, ideally a multiple"
        )
    if x.device.type == "meta":
        return rf, None
    length = x.shape[axis]
    tile = tile_length // rf.period * rf.period
    wanted = max(probe_length(rf, length), 2 * tile + 2 * (rf.left + rf.right + rf.period))
    prefix = batch_of_one(x.detach().narrow(axis, 0, min(length, wanted)), axis, args, kwargs)
    if device is not None:
        prefix = prefix.to(device)
    # The probe's own autograd graph is no business of an enclosing checkpoint or profiler:
    # identity hooks shadow theirs (the innermost saved-tensor hooks apply). Autocast is off: the
    # checks are about which positions agree, in the inputs' own precision.
    kind = prefix.device.type
    autocast_off = torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(_same, _same), autocast_off:
        rf = probe(module, prefix, args, kwargs, axis, rf)
        if not rf.local:
            return rf, rf.explain()
        return rf, (_verify(module, rf, prefix, axis, args, kwargs, tile) if verify else None)


def _verify(module: nn.Module, rf: ReceptiveField, x: torch.Tensor, axis: int, args, kwargs, tile: int) -> Optional[str]:
    """None if a tiled run of `x` equals the untiled run, else what differs."""
    length = x.shape[axis]
    if length < 2 * tile:  # test the tiling with at least two tiles where the prefix allows
        tile = max(rf.period, length // 3 // rf.period * rf.period)
    runner = _Runner(module, rf, plan_windows(rf, length, tile), axis, args, kwargs)
    with torch.no_grad(), buffers_kept(module):
        expected = [t for t in tree_flatten(module(x, *args, **kwargs))[0] if isinstance(t, torch.Tensor)]
        actual = runner.forward(x, runner.grad_leaves)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            return f"verification: output {i} has shape {tuple(a.shape)} tiled and {tuple(e.shape)} untiled"
        if not e.is_floating_point():
            if not torch.equal(a, e):
                return f"verification: output {i} differs between the tiled and the untiled run"
            continue
        error = (a.double() - e.double()).abs()
        scale = e.double().abs().max().item() if e.numel() else 0.0
        tolerance = _TOLERANCE_CUDA_FLOAT32 if (e.dtype == torch.float32 and e.is_cuda) else _TOLERANCE.get(e.dtype, 1e-2)
        if error.numel() and error.max().item() > tolerance * max(scale, 1e-30):
            where = error.flatten().argmax().item()
            axis_out = rf.outputs[i].axis
            position = (where // error.stride(axis_out)) % error.shape[axis_out]
            return (
                f"verification on a {length}-sample input in tiles of {tile}: output {i} differs from the untiled "
                f"run by {error.max().item():.3g} (largest |output| {scale:.3g}) at time step {position}; the "
                "module does something the length analysis does not model"
            )
    return None
