"""`Checkpointed`: a module that keeps less for backward and recomputes the rest, with the same numbers.

``Checkpointed(block)`` runs ``block`` under non-reentrant ``torch.utils.checkpoint``. With
``policy="full"`` only the block's inputs are kept between forward and backward; everything else is
recomputed in backward (one extra forward of the block). With ``policy="selective"`` the outputs of
the convolutions (and matmuls) that backward needs are kept too, and only the cheap ops between
them are recomputed (NOTE [Selective recompute]). Wrapping an ``nn.Sequential`` with ``segments``
checkpoints consecutive runs of its items, one run at a time.

Gradients, outputs and buffers are those of the unwrapped module: BatchNorm running statistics are
updated once per step (NOTE [Buffers are updated once]), dropout draws the same masks in the
recompute (the RNG state is replayed), and autocast is re-entered as it was.

# NOTE [Buffers are updated once]
# Plain `torch.utils.checkpoint` runs the forward twice, so every buffer the forward updates in
# place -- BatchNorm's running_mean, running_var and num_batches_tracked, a spectral-norm power
# iteration vector -- is updated twice per step (pytorch issue 96136). The recompute must compute
# exactly what the first forward computed and must leave the buffers as it found them, and (the
# memory being the point) nothing should live from forward to backward that plain checkpointing
# does not keep. Two kinds of buffer, per checkpoint call:
#   * BatchNorm's running statistics (PyTorch's own BatchNorm forward, not an override). In train
#     mode it normalises with the batch's statistics: its output does not depend on the running
#     ones, which it only updates (with momentum=None, by a cumulative average that reads
#     num_batches_tracked: also only for the update). So the first forward needs no copy of them,
#     and the recompute only has to undo its own update: a forward pre-hook, present during the
#     recompute only, copies the statistics of the BatchNorm about to run, and a forward hook
#     (called even if the forward raises) copies them back and drops the copy. The copy lives for
#     one BatchNorm call (2 x channels numbers and a counter); it is made outside dispatch modes,
#     as it is no op of the block (selective checkpointing replays those by count; the estimate's
#     simulated allocator does not see it either). A BatchNorm called twice, in a nested
#     checkpoint or also outside the block, is undone call by call. In eval mode the forward reads
#     the running statistics and writes none: nothing to do.
#   * Every other buffer (a spectral-norm vector: the weight is computed from it, then it is
#     updated). Entering the first forward, each is copied; on leaving it, the copies of buffers
#     the forward did not change (same tensor, equal values) are dropped, and those of changed
#     ones stay until backward: the recompute needs the values the first forward read. Entering
#     the recompute, each changed buffer is swapped for a fresh copy of that value; on leaving
#     (normally, by early stop, or by error) the buffers the first forward produced are swapped
#     back, the same tensor objects, untouched.
# The recompute therefore computes exactly what the first forward computed, and buffers advance
# once. For BatchNorm, what is kept until backward is what plain checkpointing keeps: every block
# of conformer_conv, basenji and resnet1d checkpointed has the peak of torch.utils.checkpoint around
# the same blocks, byte for byte on an H200 (an earlier version held copies of the pre-forward
# statistics until backward: 42 KiB more on conformer_conv); guarded without a GPU in
# tests/nn/test_checkpointed_batchnorm.py. The contexts are `context_fn` contexts of
# `torch.utils.checkpoint`, which enters them around the first forward and the recompute.
#
# NOTE [Selective recompute]
# Full checkpointing recomputes every op, the convolutions included, which is where the time goes.
# Selective checkpointing keeps the outputs of the expensive ops (convolutions and matmuls) and
# recomputes only the cheap ops between them: activations, norms, adds, pads, casts. It uses
# PyTorch's selective activation checkpointing (`create_selective_checkpoint_contexts`, public
# since PyTorch 2.5; on older versions "selective" falls back to "full" with a warning).
#
# Keeping *every* convolution output would be wrong for Conv1d blocks: the last conv of a residual
# block feeds only an add, which saves nothing, so keeping its output costs a full activation that
# the untouched model never keeps (WaveNet's skip and residual 1x1 convs, a TCN block's pointwise
# conv: selective would then keep more than no checkpointing at all). So the first time a block runs
# with gradients, a probe runs it once more on the meta device (no memory, no values) and finds out
# which convolution outputs backward needs: following every tensor back through the cheap ops to
# the convolutions it was computed from, a convolution output is kept when some tensor that
# autograd saves depends on it -- the GELU input after a conv, BatchNorm's input, the tanh and
# sigmoid gates of a WaveNet layer. A convolution output that nothing saved depends on is not
# kept and, thanks to checkpoint's early stop, usually not recomputed either: the recompute ends
# once the last tensor backward needs exists, before the block's final conv runs. A convolution
# output that the forward later modifies in place (``relu_``) cannot be kept (it would no longer be
# the conv's output) and is recomputed. The result keeps a subset of what the untouched model
# keeps, and recomputes no convolution whose output is kept.
#
# The decisions are cached per segment and per train/eval mode; they only steer memory and time,
# never values: any choice of kept ops gives exact gradients. A block the meta probe cannot run
# (it reads tensor values, or makes tensors on a fixed device) is checkpointed in full, with a
# warning.
#
# NOTE [Selective recompute under autocast]
# Autocast casts a float32 weight to the low dtype once per autocast region and caches the cast.
# The recompute runs in a fresh region, so a weight whose cast the first forward found in the
# cache (a module called twice, a weight shared by two layers) is cast again there, and selective
# checkpointing, which replays ops by their count, fails in backward. So inside a selectively
# checkpointed block the cache is off, in the first forward and in the recompute alike: both cast
# every time, the same ops on the same values. The one number this changes: a parameter used more
# than once in an autocast region gets one cast per use instead of a shared one, so its gradient
# contributions are summed in float32 instead of in the low dtype -- a rounding difference at the
# low dtype's precision (about 1e-3 for bfloat16), towards the more accurate sum. Parameters used
# once, and policy="full", are bitwise unchanged.
#
# NOTE [Checkpointing under torch.compile]
# Compiled graphs are functional: AOTAutograd applies a buffer mutation once, at the end of the
# forward graph, and its recompute in the backward graph mutates nothing. So under torch.compile the
# buffer contexts of NOTE [Buffers are updated once] are neither needed nor allowed (dynamo accepts
# only TorchDispatchMode contexts), and the meta probe cannot run either. "full" compiles to plain
# checkpointing; "selective" marks convolutions and matmuls PREFER_SAVE and everything else
# PREFER_RECOMPUTE, and the compiler's min-cut partitioner saves only the conv outputs backward
# needs -- the decision the probe makes in eager mode.
#
# NOTE [Block outputs under torch.compile]
# In eager mode a checkpointed block's outputs are never recomputed: they leave the block, and
# whatever consumes them (the next block's convolution, which keeps its input) keeps them as the
# untouched model does. The compiler's partitioner sees one graph instead, and treats every op
# tagged PREFER_RECOMPUTE as must-recompute, the op that makes the block's output included; it
# saves a block's output only where the next op is in another checkpointed region and itself
# recomputed (torch/_functorch/partitioners.py, cleanup_recompute_tags). Behind a selective block
# the next op is a convolution, tagged PREFER_SAVE, so the output is recomputed in backward, from
# the block's kept convolution output and everything between. On wav2vec 2.0's feature encoder
# (first layer conv -> GroupNorm -> GELU over 8 x 512 x 64,000 floats) that backward held one more
# such 1000 MiB buffer than compile alone: 5.924 GiB, above eager's 5.909. So under compile each
# floating-point tensor a selective block returns passes through a mark, -(-t), whose negations
# the policy tags MUST_SAVE: the partitioner saves the output when backward needs it, as eager mode
# keeps it, and nothing otherwise (a MUST_SAVE tensor that backward does not read is not saved).
# A block's own negations are tagged MUST_SAVE too: such a tensor is then kept when backward reads
# it, which is what eager mode keeps, never more.
# The mark is exact to the bit, and Inductor computes it in the kernel that computes the output
# (pointwise ops); behind an extern kernel (a block ending in a convolution) it is one pass over
# the output. A ``clone`` would not do: Inductor's joint-graph passes remove it as a no-op before
# partitioning, tag and all (measured: no change). An H200, commit 6060c0a, against the same
# models with the outputs left to the partitioner, same run: w2v2_fe 4.948 GiB at 22.2 ms (from
# 5.924 at 23.9; eager 5.909 at 22.8), basenji 1.619 GiB (1.662), hifigan 1.058 GiB at 26.4 ms
# (1.075 at 32.4), resnet1d 0.840 GiB at 10.6 ms (0.783 at 11.9: its block outputs are kept now,
# as in eager mode), the other four within 0.01 GiB (docs/BENCHMARKS.md, "Block outputs under
# torch.compile").
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import checkpoint, noop_context_fn
from torch.utils.weak import WeakIdKeyDictionary

from ..profile.autocast_sim import SimulatedAutocast, autocast_region, autocast_state
from ..profile.estimate import meta_clone, to_meta
from ..profile.recorder import tensors_in
from ._conv_replay import CallKey, KeepConvOutputs, ReplayConvOutputs, next_call, replayable
from ._wrapper import ModuleWrapper

try:  # public since PyTorch 2.5
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
except ImportError:  # pragma: no cover - depends on the installed torch
    CheckpointPolicy = None
    create_selective_checkpoint_contexts = None

__all__ = ["Checkpointed", "POLICIES", "selective_available"]

POLICIES = ("full", "selective")

_aten = torch.ops.aten
# The ops whose outputs selective checkpointing keeps: what dispatch sees of Conv1d,
# ConvTranspose1d, F.conv1d (all aten.convolution) and of Linear and matmul.
_EXPENSIVE_OPS = frozenset(
    {_aten.convolution.default, _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
)


def selective_available() -> bool:
    """Whether this PyTorch has selective activation checkpointing (PyTorch >= 2.5)."""
    return create_selective_checkpoint_contexts is not None


def resolve_policy(policy: str) -> str:
    """`policy` if it is valid and runs on this PyTorch; "selective" falls back to "full" with a warning."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "selective" and not selective_available():
        warnings.warn(
            "policy='selective' needs torch.utils.checkpoint.create_selective_checkpoint_contexts "
            f"(PyTorch >= 2.5; this is {torch.__version__}); using policy='full', which recomputes "
            "every op including the convolutions",
            stacklevel=3,
        )
        return "full"
    return policy


class Checkpointed(ModuleWrapper):
    """Run ``wrapped`` under non-reentrant activation checkpointing; same outputs, gradients and buffers.

    Args:
        wrapped: any module; typically a block ``x: (batch, channels, length) -> same``.
        policy: "full" keeps only the inputs and recomputes everything in backward; "selective"
            keeps the convolution outputs backward needs and recomputes the cheap ops between them
            (NOTE [Selective recompute]).
        segments: only for an ``nn.Sequential``: sizes of consecutive runs of its items, each run
            checkpointed on its own (``(1, 2, 4)`` for 7 items: [0], [1, 2], [3..6]). Only each
            run's input is kept; backward recomputes one run at a time. Default: the whole module
            is one run.
        recompute: with `segments`, one flag per run: False runs that run as it is (its items keep
            what they keep, or do what their own wrappers do), so a plan can checkpoint some runs
            of a chain and not others (`convmem.optimize_`). Default: every run is checkpointed.

    `state_dict()` keys are those of `wrapped`. Under ``torch.no_grad()`` it runs `wrapped` directly.

    Example::

        >>> block = Checkpointed(nn.Sequential(nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.GELU()))
        >>> block(torch.randn(8, 64, 16000)).shape
        torch.Size([8, 64, 16000])

    .. warning:: A module's forward hooks may fire again during the recompute, and backward can run
        once per forward (no ``retain_graph`` double backward with ``policy="selective"``).
    """

    # NOTE [Selective recompute by module]: False forces the dispatch-mode version (benchmarks compare them).
    _by_module = True
    # NOTE [Block outputs under torch.compile]: False leaves them to the partitioner (benchmarks compare).
    _save_outputs_compiled = True

    def __init__(self, wrapped: nn.Module, policy: str = "full", segments: Optional[Sequence[int]] = None,
                 recompute: Optional[Sequence[bool]] = None):
        policy = resolve_policy(policy)
        if segments is not None:
            segments = _check_segments(wrapped, segments)
        if recompute is not None:
            recompute = tuple(bool(r) for r in recompute)
            if segments is None or len(recompute) != len(segments):
                raise ValueError(f"recompute needs one flag per segment, got {recompute} for segments {segments}")
        super().__init__(wrapped)
        self.policy = policy
        self.segments: Optional[Tuple[int, ...]] = segments
        self.recompute: Optional[Tuple[bool, ...]] = recompute
        # (segment index, training) -> which expensive ops to keep, or None: see NOTE [Selective recompute].
        self._keep: Dict[Tuple[int, bool], Optional[_KeptOps]] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.segments is None:
            return self._run(self.wrapped, 0, args, kwargs)
        items = list(self.wrapped)
        if sum(self.segments) != len(items):
            raise RuntimeError(
                f"Checkpointed: segments {self.segments} cover {sum(self.segments)} items, but the wrapped "
                f"Sequential now has {len(items)}"
            )
        start = 0
        for index, size in enumerate(self.segments):
            run = nn.Sequential(*items[start : start + size])
            if self.recompute is not None and not self.recompute[index]:
                args = (run(*args, **kwargs),)
            else:
                args = (self._run(run, index, args, kwargs),)
            kwargs = {}
            start += size
        return args[0]

    def extra_repr(self) -> str:
        text = f"policy={self.policy!r}"
        if self.segments is not None:
            text += f", segments={self.segments}"
        return text if self.recompute is None else f"{text}, recompute={self.recompute}"

    def _run(self, module: nn.Module, index: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if not torch.is_grad_enabled():
            return module(*args, **kwargs)
        if torch.compiler.is_compiling():
            # NOTE [Checkpointing under torch.compile]. Dynamo reads context_fn only as a partial
            # it can see being built, so "full" passes none at all.
            if self.policy == "selective":
                context_fn = functools.partial(create_selective_checkpoint_contexts, _compiled_policy)
                run = _OutputsSaved(module) if self._save_outputs_compiled else module
                return checkpoint(run, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
        kept = self._kept_ops(module, index, args, kwargs) if self.policy == "selective" else None
        modules = list(module.modules())
        has_buffers = any(b is not None for m in modules for b in m._buffers.values())
        autocast = autocast_state(_device_type(args))
        # torch.utils.checkpoint re-enters a real autocast region in the recompute, never the
        # estimate's simulated one (NOTE [Simulated autocast]): that one is re-entered here.
        simulated = autocast if autocast is not None and "simulated" in autocast else None
        replay = None
        if (kept is not None and kept.conv_calls is not None and self._by_module
                and (autocast is None or autocast.get("enabled") is False)):
            replay = (module, kept.conv_calls)  # NOTE [Selective recompute by module]: not under autocast
        if kept is None and not has_buffers and simulated is None:
            context_fn = noop_context_fn
        else:
            keep = kept.keep if kept is not None and replay is None else None
            context_fn = functools.partial(_contexts, modules if has_buffers else None, keep, simulated, replay)
        return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **kwargs)

    def _kept_ops(self, module: nn.Module, index: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        key = (index, self.training)
        if key not in self._keep:
            kept = _probe_kept_ops(module, args, kwargs)
            self._keep[key] = kept if kept is not None and any(kept.keep) else None
        return self._keep[key]


def _check_segments(wrapped: nn.Module, segments: Sequence[int]) -> Tuple[int, ...]:
    if not isinstance(wrapped, nn.Sequential) or type(wrapped).forward is not nn.Sequential.forward:
        raise ValueError(
            f"segments need an nn.Sequential with its own forward unchanged, got {type(wrapped).__name__}"
        )
    sizes = tuple(segments)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"segments must be positive ints (sizes of consecutive runs of items), got {segments!r}")
    if sum(sizes) != len(wrapped):
        raise ValueError(f"segments {sizes} cover {sum(sizes)} items, but the Sequential has {len(wrapped)}")
    return sizes


# ------------------------------------------------------------------------------ buffers, once


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# Forwards that read BatchNorm's running statistics only in eval mode (NOTE [Buffers are updated once]).
_STOCK_NORM_FORWARDS = frozenset({nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward})


def _running_statistics(module: nn.Module) -> bool:
    """Whether `module` is a BatchNorm whose running statistics its forward writes (train mode) or
    only reads (eval mode), but never both: PyTorch's own forward, not an override."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module).forward in _STOCK_NORM_FORWARDS


class _FirstForward:
    """Entered around the first forward: notes the buffers it changes, as they were before it.

    BatchNorm's running statistics are left out: the recompute does not need their old values
    (NOTE [Buffers are updated once]).
    """

    def __init__(self, modules: List[nn.Module]):
        self.modules = modules
        self.before: List[Tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self.changed: List[Tuple[nn.Module, str, torch.Tensor]] = []  # (module, name, value before the forward)

    def __enter__(self) -> None:
        self.before = [
            (m, name, b, b.detach().clone()) for m in self.modules for name, b in m._buffers.items()
            if b is not None and not (name in _STATISTICS and _running_statistics(m))
        ]

    def __exit__(self, *exc) -> None:
        self.changed = [(m, name, copy) for m, name, b, copy in self.before if _changed(m._buffers.get(name), b, copy)]
        self.before = []


class _Recompute:
    """Entered around each recompute (one per backward through it): the buffers as the first forward
    found them; BatchNorm statistics put back after each BatchNorm call (NOTE [Buffers are updated once])."""

    def __init__(self, first_forward: _FirstForward):
        self.first_forward = first_forward
        self.after: List[Tuple[nn.Module, str, torch.Tensor]] = []
        self.handles: List[Any] = []
        # Per BatchNorm call running: (statistic, its value before the call).
        self.pending: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []

    def __enter__(self) -> None:
        changed = self.first_forward.changed
        self.after = [(m, name, m._buffers[name]) for m, name, _ in changed]
        for m, name, copy in changed:
            # A fresh copy each time: a second backward (retain_graph) recomputes from the same values.
            m._buffers[name] = copy.clone()
        self.handles = []
        for m in self.first_forward.modules:
            if _running_statistics(m):
                self.handles.append(m.register_forward_pre_hook(self._note))
                self.handles.append(m.register_forward_hook(self._put_back, always_call=True))

    def _note(self, module: nn.Module, args: Any) -> None:
        updated = module.training and module.track_running_stats
        statistics = [module._buffers.get(name) for name in _STATISTICS] if updated else []
        with _disable_current_modes():  # not an op of the block: selective checkpointing replays those by count
            self.pending.append([(b, b.detach().clone()) for b in statistics if b is not None])

    def _put_back(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.pending:
            _restore(self.pending.pop())

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        while self.pending:  # a recompute that raised inside a BatchNorm
            _restore(self.pending.pop())
        for m, name, tensor in self.after:
            m._buffers[name] = tensor
        self.after = []


def _restore(statistics: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    with _disable_current_modes(), torch.no_grad():
        for b, value in statistics:
            b.copy_(value)


def _changed(now: Optional[torch.Tensor], before: torch.Tensor, copy: torch.Tensor) -> bool:
    # Values, not version counters: kernels such as native_batch_norm write running statistics
    # without bumping the version. Meta tensors (the no-GPU estimate) have no values to compare.
    return now is not before or before.is_meta or not torch.equal(before, copy)


def _device_type(args: Tuple[Any, ...]) -> str:
    tensors = tensors_in(args)
    return tensors[0].device.type if tensors else "cpu"


def _contexts(modules: Optional[List[nn.Module]], keep: Optional[Tuple[bool, ...]],
              simulated: Optional[Dict[str, Any]] = None,
              replay: Optional[Tuple[nn.Module, Tuple[CallKey, ...]]] = None):
    """checkpoint's ``context_fn``: the contexts of the first forward and of the recompute."""
    forward: List[ContextManager] = []
    recompute: List[ContextManager] = [autocast_region(simulated)] if simulated is not None else []
    if modules is not None:
        first_forward = _FirstForward(modules)
        forward.append(first_forward)
        recompute.append(_Recompute(first_forward))
    if replay is not None:
        block, calls = replay
        kept = KeepConvOutputs({name: block.get_submodule(name) for name, _ in calls}, calls)
        forward.append(kept)
        recompute.append(ReplayConvOutputs(kept))
    if keep is not None:
        # Entered after the buffer contexts, so that copying buffers is not an op the policy counts.
        selective_forward, selective_recompute = create_selective_checkpoint_contexts(_KeepPolicy(keep))
        forward += [_NoAutocastCache(), selective_forward]
        recompute += [_NoAutocastCache(), selective_recompute]
    return _Stacked(forward), _Stacked(recompute)


class _NoAutocastCache:
    """See NOTE [Selective recompute under autocast]."""

    def __enter__(self) -> None:
        self.enabled = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)

    def __exit__(self, *exc) -> None:
        torch.set_autocast_cache_enabled(self.enabled)


class _Stacked:
    """Several contexts as one; unlike a generator context manager it can be entered again."""

    def __init__(self, managers: List[ContextManager]):
        self.managers = managers
        self.stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            for manager in self.managers:
                stack.enter_context(manager)
            self.stack = stack.pop_all()

    def __exit__(self, *exc) -> bool:
        stack, self.stack = self.stack, None
        return stack.__exit__(*exc)


# --------------------------------------------------------------------------- selective policy


class _KeepPolicy:
    """Selective-checkpoint policy: keep the i-th expensive op's output iff ``keep[i]``.

    Counts expensive ops separately in the forward and the recompute (PyTorch 2.5 consults the
    policy in both, later versions only in the forward).
    """

    def __init__(self, keep: Tuple[bool, ...]):
        self.keep = keep
        self.count = {False: 0, True: 0}

    def __call__(self, ctx, op, *args, **kwargs):
        if op in _EXPENSIVE_OPS:
            index = self.count[ctx.is_recompute]
            self.count[ctx.is_recompute] = index + 1
            if index < len(self.keep) and self.keep[index]:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def _compiled_policy(ctx, op, *args, **kwargs):
    # NOTE [Checkpointing under torch.compile]: PREFER_SAVE leaves the choice to the partitioner.
    if op is _aten.neg.default:
        return CheckpointPolicy.MUST_SAVE  # a block's output: NOTE [Block outputs under torch.compile]
    return CheckpointPolicy.PREFER_SAVE if op in _EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _marked(t: torch.Tensor) -> torch.Tensor:
    # -(-t) is t to the bit (NaNs included); unlike a clone, no compiler pass removes it.
    return t.neg().neg() if t.is_floating_point() else t


class _OutputsSaved:
    """Runs `module` and marks its tensor outputs as saved: NOTE [Block outputs under torch.compile]."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        return tree_map_only(torch.Tensor, _marked, out)


class _Lineage(TorchDispatchMode):
    """Follows each tensor back to the expensive ops it is computed from: NOTE [Selective recompute].

    Storages identify tensors (views share their base's); meta storages are distinct Python objects.
    """

    def __init__(self) -> None:
        super().__init__()
        self.needed: List[bool] = []  # per expensive op call, in order: does a saved tensor depend on it?
        self.issuers: List[Optional[CallKey]] = []  # per expensive op call: the module call running it
        self.running: List[CallKey] = []  # module calls under way, innermost last (kept by `enter`/`leave`)
        self._calls: Dict[str, int] = {}
        self.mutated: Set[int] = set()  # expensive op calls whose output is later written in place
        self._sources = WeakIdKeyDictionary()  # storage -> indices of the expensive ops it depends on
        self._producer = WeakIdKeyDictionary()  # storage -> index of the expensive op that made it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in _written_tensors(func, args, kwargs):
            producer = self._producer.get(tensor.untyped_storage())
            if producer is not None:
                self.mutated.add(producer)
        out = func(*args, **kwargs)
        if func in _EXPENSIVE_OPS:
            index = len(self.needed)
            self.needed.append(False)
            self.issuers.append(self.running[-1] if self.running else None)
            sources = frozenset({index})
            for t in tensors_in(out):
                self._producer[t.untyped_storage()] = index
        else:
            inputs = tensors_in((args, kwargs))
            sources = frozenset().union(*(self._sources.get(t.untyped_storage(), ()) for t in inputs))
        for t in tensors_in(out):
            storage = t.untyped_storage()
            self._sources[storage] = self._sources.get(storage, frozenset()) | sources
        return out

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for index in self._sources.get(tensor.untyped_storage(), ()):
            self.needed[index] = True
        return tensor

    def enter(self, name: str, module: nn.Module, args: Any) -> None:
        self.running.append(next_call(self._calls, name))

    def leave(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.running.pop()


def _written_tensors(func, args, kwargs) -> List[torch.Tensor]:
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            written.extend(tensors_in(value))
    return written


class _KeptOps(NamedTuple):
    """What the probe found: per expensive op call, keep its output? And, when every kept output
    comes from a replayable Conv1d call, those calls (NOTE [Selective recompute by module])."""

    keep: Tuple[bool, ...]
    conv_calls: Optional[Tuple[CallKey, ...]]


def _probe_kept_ops(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[_KeptOps]:
    """Per expensive op call of ``module(*args, **kwargs)``: keep its output? None if the probe cannot run."""
    lineage = _Lineage()
    try:
        # The probe is invisible to the caller: dispatch modes already running (a memory estimate's
        # live set, say) do not see its ops, and fork_rng keeps the RNG that the real forward's
        # dropout draws from where it was.
        with _disable_current_modes(), torch.random.fork_rng(devices=[]), torch.enable_grad():
            clone = meta_clone(module)
            for m in clone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
                    # A cumulative average reads num_batches_tracked's value, which meta tensors
                    # lack; the ops, and so the choice of kept outputs, are those of any momentum.
                    m.momentum = 0.1
            for name, m in clone.named_modules():  # the clone is the probe's own: its hooks go with it
                m.register_forward_pre_hook(functools.partial(lineage.enter, name))
                m.register_forward_hook(functools.partial(lineage.leave, name), always_call=True)
            meta_args, meta_kwargs = to_meta(args), to_meta(kwargs)
            with _autocast_like(args), torch.autograd.graph.saved_tensors_hooks(lineage.pack, _identity), lineage:
                clone(*meta_args, **meta_kwargs)
    except Exception as error:  # any failure only costs the selective part, never correctness
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(
            f"Checkpointed: cannot probe {type(module).__name__} on the meta device to choose which "
            f"convolution outputs to keep ({text}); checkpointing it with policy='full'",
            stacklevel=4,
        )
        return None
    keep = tuple(needed and index not in lineage.mutated for index, needed in enumerate(lineage.needed))
    modules = dict(clone.named_modules())
    calls = [lineage.issuers[i] for i, k in enumerate(keep) if k]
    replay = all(call is not None and replayable(modules[call[0]]) for call in calls)
    return _KeptOps(keep, tuple(calls) if replay else None)


def _autocast_like(args: Tuple[Any, ...]) -> ContextManager:
    # Real autocast does not act on meta tensors; the simulated one casts as it would, so that the
    # probe's dtypes (and the casts between its ops) match the real run's.
    device_type = _device_type(args)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return SimulatedAutocast(torch.get_autocast_dtype(device_type))
    return contextlib.nullcontext()


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
