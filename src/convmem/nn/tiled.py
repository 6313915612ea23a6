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
# backward, as torch.utils.checkpoint does; on the meta device of the no-GPU estimate, where CUDA
# autocast is simulated by a function mode (profile/autocast_sim.py), that mode is re-entered, so
# the estimate's recompute runs in the low dtype as the GPU's does.

# NOTE [Forward windows]
# Forward keeps nothing, so its windows need not be as small as backward's: under no_grad only a few
# activations of one window are alive at a time, while backward's recomputation keeps all of them.
# Forward (and inference) therefore runs over windows of `forward_tile_length` input samples, by
# default a multiple of `tile_length` that grows with the module's depth (one per four layers with
# parameters, at most 8: a deep stack keeps ~2 activations per layer for backward and ~3 in all
# under no_grad), scaled by the batch chunk's share of the batch when backward splits the batch.
# Fewer forward windows mean less halo recomputed and fewer kernel launches; an input shorter than
# one forward window runs its forward untiled. Backward plans its own windows of `tile_length`.
# Both plans are exact (the same analysis) and cached per input length and batch.

# NOTE [Batch chunks]
# Backward memory is one window's activations times the batch. With `batch_chunk`, backward
# recomputes and back-propagates each window `batch_chunk` samples at a time: memory falls by the
# number of chunks at the same tile length, so a longer tile (less halo) fits the same memory.
# This is exact for modules that treat samples independently: the batch is dim 0 of the input and
# of every output (the time axis elsewhere), no other tensor argument (which might have to match the
# batch) is passed, and the module does not couple samples (train-mode BatchNorm is already refused
# as non-local). Verification (NOTE [Verify before use]) also runs two different samples together
# and one at a time and refuses the chunking if they differ. Forward is not chunked: it keeps
# nothing, and its windows are sized for the whole batch (NOTE [Forward windows]).

# NOTE [Verify before use]
# The first call with a new input signature (shape without batch and length, dtype, device,
# train/eval modes, extra arguments) analyses the module (`receptive_field`: the analytic trace,
# then the gradient probe) and verifies the tiling: a prefix of the real input (batch of one when
# no other tensor is passed) runs tiled, in at least two tiles where the prefix allows, and untiled;
# the outputs must agree to within floating-point reassociation (`_TOLERANCE`). With batch chunks
# a batch of two different samples (the first two of the input, or the first and its time reversal)
# runs together and sample by sample and must agree as well (NOTE [Batch chunks]). A module that is
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
import copy
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..analysis import trace as _trace
from ..analysis.receptive_field import (
    ReceptiveField, analyse, analysis_dtype, batch_of_one, buffers_kept, known_refusal, probe, probe_length,
)
from ..analysis.windows import Window, plan_windows
from ..profile.autocast_sim import autocast_region, autocast_state
from ._window_graphs import WindowGraphs, module_addresses
from ._wrapper import ModuleWrapper

__all__ = ["Tiled", "check_batch_chunk", "check_forward_tile_length", "check_tile_length", "check_tiling"]

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


def check_forward_tile_length(forward_tile_length: Any, tile_length: int) -> Optional[int]:
    """`forward_tile_length` (None or an int >= `tile_length`), or a ValueError saying what is wrong."""
    if forward_tile_length is None:
        return None
    if isinstance(forward_tile_length, bool) or not isinstance(forward_tile_length, int) or forward_tile_length < 1:
        raise ValueError(
            f"forward_tile_length must be None or a positive integer number of input samples, got {forward_tile_length!r}"
        )
    if forward_tile_length < tile_length:
        raise ValueError(
            f"forward_tile_length {forward_tile_length} is shorter than tile_length {tile_length}: forward keeps "
            "nothing, so windows shorter than backward's save no memory (NOTE [Forward windows])"
        )
    return forward_tile_length


def check_batch_chunk(batch_chunk: Any) -> Optional[int]:
    """`batch_chunk` (None or a positive int), or a ValueError saying what is wrong with it."""
    if batch_chunk is not None and (isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int) or batch_chunk < 1):
        raise ValueError(f"batch_chunk must be None or a positive integer number of samples, got {batch_chunk!r}")
    return batch_chunk


# Forward windows hold at most this many times a backward window's samples (NOTE [Forward windows]).
_FORWARD_MULTIPLE = 8
_PLANS_KEPT = 256  # window plans cached per Tiled module (by signature, length and batch)


def _parameter_layers(module: nn.Module) -> int:
    """Leaf modules with parameters: the layers whose activations backward keeps."""
    return sum(1 for m in module.modules() if not list(m.children()) and next(m.parameters(), None) is not None)


def _forward_multiple(module: nn.Module) -> int:
    """How many backward windows' worth of samples a default forward window holds (NOTE [Forward windows])."""
    return min(_FORWARD_MULTIPLE, max(1, _parameter_layers(module) // 4))


def _batch_chunk_problem(x: torch.Tensor, axis: int, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """Why the batch of `x` cannot be split for backward (NOTE [Batch chunks]), or None."""
    if x.ndim < 2 or axis == 0:
        return f"the input of shape {tuple(x.shape)} with time on axis {axis} has no batch axis 0"
    if any(isinstance(v, torch.Tensor) for v in tree_flatten((tuple(args), dict(kwargs)))[0]):
        return "the module takes other tensor arguments, which may have to match the batch"
    return None


class _Runner:
    """One call of the wrapped module over a list of windows (no autograd here).

    The module's extra arguments are flattened; those tensors that need a gradient are replaced per
    call (the Function's inputs in forward, fresh leaves in backward).
    """

    def __init__(self, module: nn.Module, rf: ReceptiveField, windows: List[Window], axis: int,
                 args: Sequence[Any], kwargs: Dict[str, Any], forward_windows: Optional[List[Window]] = None,
                 batch_chunk: Optional[int] = None, graphs: Optional[WindowGraphs] = None, key: Any = None):
        self.module, self.rf, self.windows, self.axis = module, rf, windows, axis
        self.forward_windows = windows if forward_windows is None else forward_windows  # NOTE [Forward windows]
        self.batch_chunk = batch_chunk  # samples per backward call, None for the whole batch (NOTE [Batch chunks])
        self.leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.grad_index = [i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor) and v.requires_grad]
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.out_spec = None
        self.out_constants: List[Any] = []
        # NOTE [Graphed windows]: only where a window's call reads nothing but its input and the module
        tensor_leaves = any(isinstance(v, torch.Tensor) for v in self.leaves)
        self.graphs = None if tensor_leaves or torch.compiler.is_compiling() else graphs
        self.key = key
        self.addresses = module_addresses(module) if self.graphs is not None else ()

    @property
    def grad_leaves(self) -> List[torch.Tensor]:
        return [self.leaves[i] for i in self.grad_index]

    def call(self, window_input: torch.Tensor, grad_leaves: Sequence[torch.Tensor],
             parameters: Optional[Dict[str, torch.Tensor]] = None) -> List[torch.Tensor]:
        """The module on one window; `parameters` (by name) stand in for its own where given."""
        leaves = list(self.leaves)
        for i, t in zip(self.grad_index, grad_leaves):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        if parameters is None:
            result = self.module(window_input, *args, **kwargs)
        else:
            result = torch.func.functional_call(self.module, parameters, (window_input, *args), kwargs)
        flat, spec = tree_flatten(result)
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.rf.outputs):
            raise RuntimeError(
                f"the module returned {len(tensors)} tensors on a tile and {len(self.rf.outputs)} when analysed"
            )
        if self.out_spec is None:
            self.out_spec = spec
            self.out_constants = [None if isinstance(v, torch.Tensor) else v for v in flat]
        return tensors

    def _graphed(self, x: torch.Tensor) -> bool:
        return self.graphs is not None and x.device.type == self.graphs.device_type

    def call_window(self, window_input: torch.Tensor, grad_leaves: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """`call` on one forward window; replayed from a CUDA graph where enabled (the outputs are
        then overwritten by the next window of the same shape)."""
        if not self._graphed(window_input):
            return self.call(window_input, grad_leaves)
        key = ("forward", self.key, tuple(window_input.shape), window_input.dtype, _autocast_key())
        structure = self.graphs.output_structure

        def forward(xw: torch.Tensor) -> List[torch.Tensor]:
            tensors = self.call(xw, ())
            structure[key] = (self.out_spec, self.out_constants)
            return tensors

        outputs, _ = self.graphs.run(key, self.addresses, forward, [window_input])
        if self.out_spec is None:  # a replay does not run `call`
            self.out_spec, self.out_constants = structure[key]
        return outputs

    def window_gradients(self, w: Window, wanted: Sequence[int], xw: torch.Tensor, seeds: Sequence[torch.Tensor],
                         extras: Sequence[torch.Tensor], need_x: bool, extra_wrt: Sequence[int],
                         param_wrt: Sequence[int]) -> Tuple[List[Optional[torch.Tensor]], bool]:
        """One backward window: recompute it with autograd and back-propagate `seeds`, the output
        gradient's slices for the outputs `wanted`, to the window's input (if `need_x`), the extra
        tensors `extra_wrt` and the parameters `param_wrt`, in that order ([] if nothing needs it).

        Returns the gradients and whether they are a CUDA graph's static outputs, which the next
        window of the same shape overwrites (NOTE [Graphed windows])."""

        graphed = self._graphed(xw)

        def step(xw: torch.Tensor, *seeds: torch.Tensor) -> List[Optional[torch.Tensor]]:
            xw = xw.detach().requires_grad_(need_x)
            leaves = [e.detach().requires_grad_(i in extra_wrt) for i, e in enumerate(extras)]
            params = self.params
            if graphed:  # NOTE [Graphed windows]: leaves of the capture's own, the same memory
                params = [p.detach().requires_grad_() for p in self.params]
                tensors = self.call(xw, leaves, dict(zip(self.param_names, params)))
            else:
                tensors = self.call(xw, leaves)
            outs, used = [], []
            for k, seed in zip(wanted, seeds):
                offset, _, count = w.crops[k]
                if tensors[k].requires_grad:
                    outs.append(tensors[k].narrow(self.rf.outputs[k].axis, offset, count))
                    used.append(seed)
            inputs = ([xw] if need_x else []) + [leaves[i] for i in extra_wrt] + [params[i] for i in param_wrt]
            if not outs or not inputs:
                return []
            return list(torch.autograd.grad(outs, inputs, used, allow_unused=True))

        if not graphed:
            return step(xw, *seeds), False
        crops = tuple((k, w.crops[k][0], w.crops[k][2]) for k in wanted)
        key = ("backward", self.key, tuple(xw.shape), xw.dtype, crops, need_x, tuple(param_wrt), _autocast_key())
        return self.graphs.run(key, self.addresses, step, [xw, *seeds])

    def window(self, x: torch.Tensor, w: Window) -> torch.Tensor:
        return x.narrow(self.axis, w.start, w.stop - w.start)

    def forward(self, x: torch.Tensor, grad_leaves: Sequence[torch.Tensor],
                outs: Optional[Sequence[torch.Tensor]] = None, move=None, allocate=None,
                progress=None) -> Tuple[torch.Tensor, ...]:
        """Every forward window in turn; each tile's own outputs are copied into full-length `outs`.

        `move(window)` brings a window to the module's device (infer_tiled streams from the CPU);
        `outs` may be given (preallocated, on any device, checked against the first tile), else
        ``allocate(shape, dtype)`` makes them (default: on the module's output device).
        `progress(stop)` is told the input position each window ends at.
        """
        lengths = self.rf.output_lengths(x.shape[self.axis])
        windows = self.forward_windows
        for w in windows:
            window = self.window(x, w)
            tensors = self.call_window(move(window) if move is not None else window, grad_leaves)
            if outs is None or w is windows[0]:
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
                if self.batch_chunk is not None:
                    for i, (t, omap) in enumerate(zip(tensors, self.rf.outputs)):
                        if t.ndim < 2 or omap.axis == 0 or t.shape[0] != x.shape[0]:
                            raise ValueError(
                                f"batch_chunk needs the batch on axis 0 of every output; output {i} has shape "
                                f"{tuple(t.shape)} (time on axis {omap.axis}) for a batch of {x.shape[0]}"
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
                    dst = out.narrow(omap.axis, first, count)
                    dst.copy_(t.narrow(omap.axis, offset, count), non_blocking=_may_copy_async(dst, t))
            if progress is not None:
                progress(w.stop)
        return tuple(outs)

    def unflatten(self, outs: Sequence[torch.Tensor]) -> Any:
        tensors = iter(outs)
        return tree_unflatten([next(tensors) if v is None else v for v in self.out_constants], self.out_spec)


def _autocast_key() -> tuple:
    """What a captured window baked in of CUDA autocast."""
    if not torch.is_autocast_enabled("cuda"):
        return ()
    return (torch.get_autocast_dtype("cuda"),)


def _may_copy_async(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """A GPU tile's output copied into pinned CPU memory need not hold the CPU until the GPU is done
    (NOTE [Streaming inference] in strategies/infer.py): the CPU queues the next tile meanwhile, and
    infer_tiled synchronizes once at the end. Only into a contiguous destination: a strided one goes
    through a temporary that the CPU would read before the copy lands."""
    return src.is_cuda and dst.device.type == "cpu" and dst.is_pinned() and dst.is_contiguous()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _TiledFunction(torch.autograd.Function):
    """See NOTE [Tiled autograd]. Inputs: runner, x, tensor arguments needing grad, parameters."""

    @staticmethod
    def forward(ctx, runner: _Runner, x: torch.Tensor, *tensors: torch.Tensor):
        extra = len(runner.grad_index)
        ctx.runner = runner
        ctx.autocast = autocast_state(x.device.type)
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
        batch = x.shape[0]
        chunk = batch if runner.batch_chunk is None else min(runner.batch_chunk, batch)
        autocast = autocast_region(ctx.autocast)
        with torch.enable_grad(), autocast:
            starts = range(0, batch, chunk) if chunk < batch else (0,)
            for w, b in ((w, b) for w in runner.windows for b in starts):
                wanted = [k for k, (g, crop) in enumerate(zip(grads, w.crops)) if g is not None and crop[2]]
                if not wanted:
                    continue
                rows = batch if chunk == batch else min(chunk, batch - b)  # NOTE [Batch chunks]
                xb = x if chunk == batch else x.narrow(0, b, rows)
                seeds = []
                for k in wanted:
                    _, first, count = w.crops[k]
                    seed = grads[k] if chunk == batch else grads[k].narrow(0, b, rows)
                    seeds.append(seed.narrow(runner.rf.outputs[k].axis, first, count))
                got, static = runner.window_gradients(w, wanted, runner.window(xb, w), seeds, extras, need_x,
                                                      extra_wrt, param_wrt)
                if not got:
                    continue
                got = iter(got)
                if need_x:
                    g = next(got)
                    if g is not None:
                        gb = grad_x if chunk == batch else grad_x.narrow(0, b, rows)
                        gb.narrow(runner.axis, w.start, w.stop - w.start).add_(g)
                sums, terms = [], []
                for store, index in ((grad_extras, extra_wrt), (grad_params, param_wrt)):
                    for i in index:
                        g = next(got)
                        if g is None:
                            continue
                        if store[i] is None:
                            store[i] = g.clone() if static else g  # a graph's output is overwritten
                        else:
                            sums.append(store[i])
                            terms.append(g)
                if sums:  # a few launches for all the parameters' sums, not one per parameter and window
                    torch._foreach_add_(sums, terms)
        return (None, grad_x, *grad_extras, *grad_params)


class Tiled(ModuleWrapper):
    """Runs a length-local `module` in tiles of `tile_length` input samples; exact outputs and gradients.

    Args:
        module: the module to tile. Its first argument is the sequence, ``x: (batch, channels,
            length)`` or ``(batch, length)`` (time on `length_axis`); other arguments pass through
            to every tile unchanged (tensors among them must not have a time axis).
        tile_length: input samples per tile; rounded down to a multiple of the module's alignment
            period (its total stride for a downsampling stack: 320 for wav2vec 2.0's encoder).
            An input shorter than a tile runs untiled, as one tile. This is backward's window, which
            sets the memory.
        forward_tile_length: input samples per window of the forward pass (and of inference), which
            keeps nothing (NOTE [Forward windows]); at least `tile_length`. Default: `tile_length`
            times one per four layers with parameters (1 to 8), times the batch chunk's share of the
            batch (``max(1, multiple * batch_chunk // batch)``). ``forward_tile_length=tile_length``
            runs forward in backward's windows.
        batch_chunk: samples per backward recomputation (NOTE [Batch chunks]); None (default)
            recomputes the whole batch at once. Backward memory falls by the number of chunks, so a
            longer tile fits the same memory. Needs the batch on axis 0 of the input and outputs, no
            other tensor argument, and samples the module treats independently (verified, unless
            ``verify=False``; a module that couples them is refused like a non-local one).
        length_axis: the time axis of the input.
        verify: check the tiling against the untiled module on a prefix of the first input of every
            new signature (NOTE [Verify before use]).
        on_refuse: ``"raise"`` a ValueError when the module turns out not to be length-local (or
            the tiling fails verification), or ``"warn"`` and run it untiled (what `tile_` uses).
        name: how messages name the module (default: its class name).
        cuda_graphs: capture each window shape of a CUDA input once in a CUDA graph and replay it
            for every window of that shape (NOTE [Graphed windows] in nn/_window_graphs.py): the
            CPU no longer issues every kernel of every window, which is most of a launch-bound
            window's time. The graphs' memory pool (about one window's activations) stays
            reserved between steps until `release_graphs()`. Needs parameters updated in place
            (torch.optim does) and no tensor argument besides the sequence; otherwise, and off
            CUDA or under torch.compile, windows run as without it.

    Raises ValueError at construction for a bad `tile_length` or a module whose layers make it
    non-local in the current mode (BatchNorm in train mode, GroupNorm, circular padding, an active
    Dropout, ...); at the first call for a non-local forward, or a tile shorter than the period.

    Memory: training keeps the input and output at full length; everything inside the module
    exists for one window at a time (forward and backward; for backward, one batch chunk of it).
    Time: about one extra forward of the module, plus the halos (``(left + right) / tile_length`` of
    backward's work, ``/ forward_tile_length`` of forward's), plus a one-off analysis and
    verification at the first call of each input signature.

    Numerics: the same ops on shorter inputs; results differ from the untiled module only by
    floating-point reassociation (kernels may block sums differently for other shapes).

    Example::

        >>> block = nn.Sequential(nn.Conv1d(64, 64, 3, padding=1), nn.GELU(), nn.Conv1d(64, 64, 3, padding=1))
        >>> tiled = convmem.nn.Tiled(block, tile_length=4096)
        >>> y = tiled(torch.randn(8, 64, 1_000_000))      # same numbers as block(x), bounded memory
    """

    def __init__(self, module: nn.Module, tile_length: int, *, forward_tile_length: Optional[int] = None,
                 batch_chunk: Optional[int] = None, length_axis: int = -1, verify: bool = True,
                 on_refuse: str = "raise", name: Optional[str] = None, cuda_graphs: bool = False):
        tile_length = check_tile_length(tile_length)
        forward_tile_length = check_forward_tile_length(forward_tile_length, tile_length)
        batch_chunk = check_batch_chunk(batch_chunk)
        if on_refuse not in ("raise", "warn"):
            raise ValueError(f"on_refuse must be 'raise' or 'warn', got {on_refuse!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
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
        self.forward_tile_length = forward_tile_length
        self.batch_chunk = batch_chunk
        self.length_axis = length_axis
        self.verify = verify
        self.on_refuse = on_refuse
        self.name = name
        self.last_windows = 0  # backward windows of the last call: 1 means it ran untiled
        self.last_forward_windows = 0  # forward windows of the last call (NOTE [Forward windows])
        self._fields: Dict[Any, Optional[ReceptiveField]] = {}
        self._plans: Dict[Any, Tuple[List[Window], List[Window], Optional[int]]] = {}
        self._multiple = _forward_multiple(module)
        self.graphs: Optional[WindowGraphs] = WindowGraphs(name) if cuda_graphs else None

    def __getstate__(self) -> Dict[str, Any]:
        """Pickled (``torch.save(model)``) without the per-signature analyses and window plans: they
        hold closures of the length analysis, and the first call after loading makes them again."""
        state = self.__dict__.copy()
        state["_fields"], state["_plans"] = {}, {}
        return state

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Tiled":
        """A deep copy keeps the analyses (copied like everything else), unlike a pickle."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def release_graphs(self) -> None:
        """Free the CUDA graphs of `cuda_graphs=True` and their memory pool; the next steps capture anew."""
        if self.graphs is not None:
            self.graphs.release()

    def extra_repr(self) -> str:
        extra = f", forward_tile_length={self.forward_tile_length}" if self.forward_tile_length is not None else ""
        extra += f", batch_chunk={self.batch_chunk}" if self.batch_chunk is not None else ""
        extra += ", cuda_graphs=True" if self.graphs is not None else ""
        return f"tile_length={self.tile_length}{extra}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _trace.is_active():
            return self.wrapped(x, *args, **kwargs)
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise TypeError(f"{self.name}: the first argument must be a sequence tensor, got {type(x).__name__}")
        axis = self.length_axis % x.ndim
        signature, rf, windows, forward_windows, chunk = self._plan(x, axis, args, kwargs)
        if rf is None:
            return self.wrapped(x, *args, **kwargs)
        runner = _Runner(self.wrapped, rf, windows, axis, args, kwargs, forward_windows, chunk, self.graphs,
                         key=signature)
        if runner.graphs is not None:
            runner.graphs.begin_call()
        if torch.is_grad_enabled() and (x.requires_grad or runner.params or runner.grad_index):
            if len(windows) == 1 and chunk is None:
                return self.wrapped(x, *args, **kwargs)
            outs = _TiledFunction.apply(runner, x, *runner.grad_leaves, *runner.params)
        elif len(forward_windows) == 1:
            return self.wrapped(x, *args, **kwargs)
        else:
            outs = runner.forward(x, runner.grad_leaves)
        return runner.unflatten(outs)

    @torch.compiler.disable
    def _plan(self, x: torch.Tensor, axis: int, args,
              kwargs) -> Tuple[tuple, Optional[ReceptiveField], List[Window], List[Window], Optional[int]]:
        """The input's signature, the analysis (once per signature), this input's backward and forward
        windows, and the batch chunk (None: the whole batch at once). Cached per signature, length and
        batch.

        # NOTE [Tiling under torch.compile]
        # Analysis, probe and verification (a dispatch-mode trace, deep copies, autograd probes) and
        # window planning (exact fractions) are plain Python that runs eagerly: torch.compile breaks
        # the graph here and compiles the module calls of the tiles around it.
        """
        key = self._signature(x, axis, args, kwargs)
        rf = self._receptive_field(key, x, axis, args, kwargs)
        if rf is None:
            self.last_windows = self.last_forward_windows = 1
            return key, None, [], [], None
        batch = x.shape[0] if x.ndim > 1 and axis != 0 else 1
        plan_key = (key, x.shape[axis], batch)
        if plan_key not in self._plans:
            if len(self._plans) >= _PLANS_KEPT:  # lengths that vary every step: keep the cache bounded
                self._plans.clear()
            chunk = self._chunk(x, axis, args, kwargs)
            length, period = x.shape[axis], rf.period
            tile = self.tile_length // period * period
            if self.forward_tile_length is not None:
                forward_tile = max(tile, self.forward_tile_length // period * period)
            else:  # NOTE [Forward windows]: about `multiple` backward windows' worth of samples
                forward_tile = tile * max(1, self._multiple * (chunk or batch) // max(batch, 1))
            windows = plan_windows(rf, length, tile)
            forward_windows = windows if forward_tile == tile else plan_windows(rf, length, forward_tile)
            self._plans[plan_key] = (windows, forward_windows, chunk)
        windows, forward_windows, chunk = self._plans[plan_key]
        self.last_windows, self.last_forward_windows = max(1, len(windows)), max(1, len(forward_windows))
        return key, rf, windows, forward_windows, chunk

    def _chunk(self, x: torch.Tensor, axis: int, args, kwargs) -> Optional[int]:
        """`batch_chunk` where it splits this input's batch, else None (NOTE [Batch chunks])."""
        if self.batch_chunk is None:
            return None
        problem = _batch_chunk_problem(x, axis, args, kwargs)
        if problem is not None:
            message = f"{self.name}: batch_chunk={self.batch_chunk} cannot split the batch: {problem}"
            if self.on_refuse == "raise":
                raise ValueError(message)
            warnings.warn(message + "; backward recomputes the whole batch", stacklevel=3)
            return None
        return self.batch_chunk if self.batch_chunk < x.shape[0] else None

    def receptive_field(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Optional[ReceptiveField]:
        """The verified analysis for inputs like `x` (cached per signature); None if refused with a warning."""
        axis = self.length_axis % x.ndim
        return self._receptive_field(self._signature(x, axis, args, kwargs), x, axis, args, kwargs)

    def _receptive_field(self, key: tuple, x: torch.Tensor, axis: int, args, kwargs) -> Optional[ReceptiveField]:
        if key in self._fields:
            return self._fields[key]
        batches = self.batch_chunk is not None and _batch_chunk_problem(x, axis, args, kwargs) is None
        rf, problem = check_tiling(self.wrapped, x, args, kwargs, axis, self.tile_length, self.verify,
                                   batch_chunks=batches)
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
                 tile_length: int, verify: bool = True, device: Optional[torch.device] = None,
                 batch_chunks: bool = False) -> Tuple[ReceptiveField, Optional[str]]:
    """Analyse, probe and verify tiling `module` in tiles of `tile_length` (NOTE [Verify before use]).

    Returns the analysis and None, or the analysis and why the tiling is refused. Probe and
    verification run on a prefix of `x` (batch of one where possible) moved to `device`. With
    `batch_chunks`, verification also checks that samples are independent (NOTE [Batch chunks]).
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
    prefix = prefix.to(device=device, dtype=analysis_dtype(module, prefix))
    # The probe's own autograd graph is no business of an enclosing checkpoint or profiler:
    # identity hooks shadow theirs (the innermost saved-tensor hooks apply). Autocast is off: the
    # checks are about which positions agree, in the parameters' precision (`analysis_dtype`: a
    # bfloat16 input under autocast is checked in float32).
    kind = prefix.device.type
    autocast_off = torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(_same, _same), autocast_off:
        rf = probe(module, prefix, args, kwargs, axis, rf)
        if not rf.local:
            return rf, rf.explain()
        if not verify:
            return rf, None
        problem = _verify(module, rf, prefix, axis, args, kwargs, tile)
        if problem is None and batch_chunks:
            pair = x.detach().narrow(axis, 0, prefix.shape[axis])
            pair = pair[:2] if pair.shape[0] >= 2 else torch.cat([pair[:1], pair[:1].flip(axis)])
            problem = _verify_batch(module, rf, pair.to(prefix.device, prefix.dtype), args, kwargs)
        return rf, problem


def _tolerance(t: torch.Tensor) -> float:
    return _TOLERANCE_CUDA_FLOAT32 if (t.dtype == torch.float32 and t.is_cuda) else _TOLERANCE.get(t.dtype, 1e-2)


def _verify_batch(module: nn.Module, rf: ReceptiveField, x: torch.Tensor, args, kwargs) -> Optional[str]:
    """None if running the samples of `x` one at a time equals running them together (NOTE [Batch chunks])."""
    problem = samples_coupled(module, x, args, kwargs, time_axes=[omap.axis for omap in rf.outputs])
    return None if problem is None else f"batch_chunk: {problem}; backward cannot split it (leave batch_chunk=None)"


def samples_coupled(module: nn.Module, x: torch.Tensor, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    time_axes: Optional[Sequence[int]] = None) -> Optional[str]:
    """None if `module` run on the samples of `x` (batch on axis 0) one at a time gives what it gives
    on them together, within floating-point reassociation (`_tolerance`); else what differs.

    The check behind batch chunks, Tiled's (NOTE [Batch chunks]) and BatchChunked's: every output
    must carry the batch on axis 0 (`time_axes`, where given, are the outputs' time axes), and a
    module that couples the samples (batch statistics, ``x - x.mean(0)``) is found by the values.
    """
    kwargs = kwargs or {}
    with torch.no_grad(), buffers_kept(module):
        together = [t for t in tree_flatten(module(x, *args, **kwargs))[0] if isinstance(t, torch.Tensor)]
        apart = [[t for t in tree_flatten(module(x[i:i + 1], *args, **kwargs))[0] if isinstance(t, torch.Tensor)]
                 for i in range(x.shape[0])]
    for k, t in enumerate(together):
        time_axis = None if time_axes is None else time_axes[k]
        if t.ndim < 2 or time_axis == 0 or t.shape[0] != x.shape[0]:
            return f"output {k} of shape {tuple(t.shape)} has no batch axis 0"
        expected = torch.cat([a[k] for a in apart])
        if not t.is_floating_point():
            differs = not torch.equal(t, expected)
        else:
            tolerance = _tolerance(t)
            scale = expected.double().abs().max().item() if expected.numel() else 0.0
            differs = bool(expected.numel()) and (t.double() - expected.double()).abs().max().item() > tolerance * max(scale, 1e-30)
        if differs:
            return (f"output {k} for a batch of {x.shape[0]} differs from running the samples one at a time: "
                    "the module couples the samples of a batch")
    return None


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
        tolerance = _tolerance(e)
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
