"""`Offloaded`: keep a module's saved tensors in host memory between forward and backward, exactly.

``Offloaded(block)`` runs ``block`` under ``torch.autograd.graph.saved_tensors_hooks``: every
tensor autograd saves inside it that lives on a CUDA device and whose storage holds at least
``min_bytes`` is copied to pinned host memory on a side stream while the forward goes on, and its
GPU memory is released once the copy is done. Backward copies it back before it is needed
(NOTE [Offload prefetch]). The bytes are the same bytes: outputs, gradients and buffers are
bitwise those of the unwrapped module.

# NOTE [What is offloaded]
# A saved tensor is moved when all of these hold, else it is kept as autograd would keep it:
#   * it is a plain strided ``torch.Tensor`` on a CUDA device (not meta, not a subclass such as
#     DTensor or FakeTensor, not sparse, no conjugate/negative bit);
#   * its *storage* holds at least ``min_bytes`` (default 1 MiB): small tensors cost a copy and an
#     event each and free almost nothing;
#   * it is not a parameter: not an ``nn.Parameter``, not a leaf that requires grad, and its storage
#     is not that of a parameter or buffer of the wrapped module (``weight.t()``, BatchNorm's
#     running statistics). Those stay resident anyway; copying them would only cost PCIe time.
# Storages, not tensors, are moved: a storage saved several times (a tensor saved by two ops, a
# view and its base, ``x`` and ``x[:, :, 1:]``) is copied once and each saved tensor comes back as
# the same view (size, stride, storage offset) of one restored storage. Saves are matched to
# storages by identity (the storage's Python object, which lives exactly as long as the storage:
# an address can be reused, an object cannot) and by the tensor's version counter, so a storage
# written in place between two saves is copied again. Matching spans the whole `OffloadGroup`: a
# block's output that the block saves (a ReLU's result) and the next block saves again (its first
# conv's input) is copied once.
#
# Copies off the device: the side stream first waits for the current stream (the tensor is being
# computed there), then copies the whole storage into pinned memory with ``non_blocking=True``;
# ``record_stream`` tells the caching allocator that the side stream uses the GPU memory, so when
# the forward drops the tensor the memory is reused only after the copy has finished. Nothing else
# holds the GPU tensor: its memory goes back to the allocator as soon as forward is done with it
# and the copy has run. If PCIe is slower than the forward, freed blocks wait for their copies and
# the peak grows towards the untouched model's; it never exceeds it by more than the pinned copies'
# bookkeeping.
#
# NOTE [Offload prefetch]
# Every forward call of an Offloaded module with gradients is a *call* of its `OffloadGroup`,
# numbered in forward order and linked to the call before it. The wrappers ``offload_`` creates
# share one group, so the calls of one step form one chain across blocks; a standalone Offloaded
# has a group of its own (pass ``group=`` to share one). A hook on each output of a call fires when
# backward has computed that output's gradient, i.e. just before the call's own backward ops run.
# It starts copying back (host to device, on the side stream, into memory allocated on that
# stream) the call's storages that are not on the device yet, and those of the `prefetch`
# previous calls that offloaded anything (default 1): the call whose backward runs next. The
# unpack hook makes the current stream wait only for the event of the storage it needs, and marks
# the restored memory as used by the current stream (``record_stream``). A storage's device copy is
# dropped once every saved tensor that refers to it has been unpacked; a second backward through
# the same graph (``retain_graph=True``) copies it back again. If a copy was not started by the
# hook (a saved tensor reached from outside the module's outputs), the unpack hook starts it and
# waits: correct, only slower.
#
# On the device, during backward, an offloaded module therefore holds at most its own offloaded
# storages and those of the `prefetch` calls before it, plus what it never offloads (small
# tensors, parameters). The last call of the forward is the first of backward: its copies start
# when backward reaches it and are not overlapped with anything.
#
# The chain restarts when the first forward after a backward begins (a new step). Calls whose
# graph has been freed are skipped. A call recomputed during backward (Offloaded inside a
# checkpointed region) starts a chain of its own that nothing prefetches.
#
# NOTE [Offload and other saved-tensor hooks]
# Saved-tensor hooks nest and the innermost hooks alone see a tensor. So:
#   * an Offloaded module inside a checkpointed region (``Checkpointed(Sequential(Offloaded(a),
#     ...))``): checkpointing keeps nothing of the region anyway, and Offloaded's own hooks,
#     innermost, copy the region's tensors to the host in the first forward and again in the
#     recompute. Exact, but the copies buy nothing; ``offload_`` leaves modules inside a convmem
#     wrapper alone. Compose them the other way round.
#   * a checkpointed region inside an Offloaded module (``Offloaded(Checkpointed(block))``, or
#     non-reentrant ``torch.utils.checkpoint`` called in the module's forward): the checkpoint's
#     hooks are innermost inside the region, so its tensors are recomputed, not offloaded. The
#     checkpoint saves the region's inputs with ``save_for_backward`` before it pushes its own
#     hooks, so those go through Offloaded's: ``Offloaded(Checkpointed(block))`` keeps nothing of
#     the block on the device between forward and backward, its input waits in host memory, and
#     backward copies the input back, then recomputes. The same holds for ``Tiled``, which saves
#     its input the same way. ``offload_`` wraps such wrappers.
#   * convmem.profile's recorder hooks the whole step from outside; Offloaded's hooks are inside
#     it, so what Offloaded moves is never counted as kept.
# Under ``torch.no_grad()`` and under ``torch.compile`` (offloading is an eager-mode feature; the
# compiled graph keeps what it keeps) Offloaded runs its module directly.
#
# NOTE [Offload on the meta device]
# The no-GPU estimate runs the step on the meta device, where there is nothing to copy; Offloaded
# there does everything but the copies: a saved meta tensor that would be moved is dropped at pack
# time (its memory is released, as on the GPU once the copy is done), and an empty meta storage of
# the same size is allocated when backward reaches the call or the one after it (the prefetch) --
# so the estimate sees the same allocations at the same points as the CUDA allocator does. Which
# tensors move is decided as on CUDA, except that parameter storages are recognised by being
# leaves that require grad (meta storages have no address to compare).
#
# NOTE [Offloading CPU tensors in tests]
# Tensors already on the CPU stay as they are: there is nothing to free. The private constructor
# argument ``_offload_cpu_tensors=True`` makes the pack hook copy CPU tensors' storages into
# separate host buffers and the prefetch copy them back into fresh buffers, so that CPU-only tests
# exercise deduplication, views, exactness and the prefetch order (``OffloadGroup(record_events=
# True)``) on the same code path as CUDA, minus the streams.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ._wrapper import ModuleWrapper

__all__ = ["Offloaded", "OffloadGroup", "DEFAULT_MIN_BYTES", "check_min_bytes", "check_prefetch"]

DEFAULT_MIN_BYTES = 1 << 20  # 1 MiB: NOTE [What is offloaded]


def check_min_bytes(min_bytes: Any, who: str) -> int:
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"{who}: min_bytes must be an int >= 0 (bytes of a storage), got {min_bytes!r}")
    return min_bytes


def check_prefetch(prefetch: Any, who: str) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"{who}: prefetch must be an int >= 0 (previous calls copied back early), got {prefetch!r}")
    return prefetch


class _Stored:
    """One storage held off the device: its host copy, and its device copy while backward needs it."""

    __slots__ = ("device", "nbytes", "version", "call_index", "host", "restored", "ready", "refs", "unpacked",
                 "__weakref__")

    def __init__(self, device: torch.device, nbytes: int, version: int, call_index: int):
        self.device = device
        self.nbytes = nbytes
        self.version = version
        self.call_index = call_index
        self.host: Optional[torch.Tensor] = None  # uint8, nbytes: pinned on CUDA machines
        self.restored: Optional[torch.Tensor] = None  # uint8 on `device` once copied back
        self.ready: Optional[torch.cuda.Event] = None  # recorded on the side stream after the copy back
        self.refs = 0  # saved tensors (pack calls) that refer to this storage
        self.unpacked = 0  # of those, unpacked since the device copy was made


class _Saved:
    """What autograd holds for one offloaded saved tensor: its storage and its view of it."""

    __slots__ = ("stored", "dtype", "size", "stride", "offset")

    def __init__(self, stored: _Stored, tensor: torch.Tensor):
        self.stored = stored
        self.dtype = tensor.dtype
        self.size = tensor.size()
        self.stride = tensor.stride()
        self.offset = tensor.storage_offset()


class _Call:
    """One forward call of an Offloaded module: its storages, and the call before it in the chain."""

    __slots__ = ("index", "stored", "previous", "exclude", "offload_cpu", "min_bytes", "__weakref__")

    def __init__(self, index: int, previous: Optional["_Call"], exclude: Set[int], offload_cpu: bool, min_bytes: int):
        self.index = index
        self.stored: Dict[int, _Stored] = {}  # id -> storage; in order of first save
        self.previous = weakref.ref(previous) if previous is not None else None
        self.exclude = exclude  # data_ptr of the wrapped module's parameter and buffer storages
        self.offload_cpu = offload_cpu
        self.min_bytes = min_bytes

    def before(self) -> Optional["_Call"]:
        return self.previous() if self.previous is not None else None


class OffloadGroup:
    """The Offloaded modules of one model that prefetch for each other: NOTE [Offload prefetch].

    Args:
        prefetch: how many previous calls (in forward order) that offloaded anything to start
            copying back when backward reaches a call, besides the call itself. 0: each call is
            copied back only when backward reaches it (no overlap).
        record_events: keep a list of ``(event, call index)`` in ``events``, for tests and
            debugging: ``("prefetch", i)`` when a backward hook starts copying call i back,
            ``("fetch", i)`` when an unpack had to start a copy of call i's storage itself.

    ``bytes_offloaded`` and ``bytes_restored`` count the bytes copied each way since creation.
    """

    def __init__(self, prefetch: int = 1, record_events: bool = False):
        self.prefetch = check_prefetch(prefetch, "OffloadGroup")
        self.record_events = record_events
        self.events: List[Tuple[str, int]] = []
        self.bytes_offloaded = 0
        self.bytes_restored = 0
        self._streams: Dict[torch.device, torch.cuda.Stream] = {}
        self._storages = WeakIdKeyDictionary()  # UntypedStorage -> weakref to its _Stored
        self._last: Optional[weakref.ref] = None
        self._next_index = 0
        self._backward_seen = False

    def __repr__(self) -> str:
        return f"OffloadGroup(prefetch={self.prefetch})"

    # A copied or pickled model gets a fresh group (shared again by the wrappers copied together:
    # deepcopy's memo); streams, events and host copies belong to the step that made them.
    def __deepcopy__(self, memo) -> "OffloadGroup":
        return OffloadGroup(self.prefetch, self.record_events)

    def __getstate__(self) -> Dict[str, Any]:
        return {"prefetch": self.prefetch, "record_events": self.record_events}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)

    # -- forward --------------------------------------------------------------------------
    def _new_call(self, exclude: Set[int], offload_cpu: bool, min_bytes: int) -> _Call:
        if self._backward_seen:  # the first forward after a backward: a new step, a new chain
            self._backward_seen = False
            self._last, self._next_index = None, 0
        previous = self._last() if self._last is not None else None
        call = _Call(self._next_index, previous, exclude, offload_cpu, min_bytes)
        self._next_index += 1
        self._last = weakref.ref(call)
        return call

    def _pack(self, call: _Call, tensor: torch.Tensor) -> Any:
        if not _offloadable(tensor, call):
            return tensor
        storage = tensor.untyped_storage()
        ref = self._storages.get(storage)
        stored = ref() if ref is not None else None
        if stored is None or stored.version != tensor._version:
            stored = self._copy_off(storage, tensor, call.index)
            self._storages[storage] = weakref.ref(stored)
        call.stored.setdefault(id(stored), stored)
        stored.refs += 1
        return _Saved(stored, tensor)

    def _copy_off(self, storage: torch.UntypedStorage, tensor: torch.Tensor, index: int) -> _Stored:
        stored = _Stored(tensor.device, storage.nbytes(), tensor._version, index)
        if tensor.is_meta:  # NOTE [Offload on the meta device]: nothing to copy
            self.bytes_offloaded += stored.nbytes
            return stored
        with torch.no_grad():
            flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            if tensor.is_cuda:
                side, current = self._stream(tensor.device), torch.cuda.current_stream(tensor.device)
                side.wait_stream(current)  # the tensor is computed on the current stream
                with torch.cuda.stream(side):
                    stored.host = torch.empty(stored.nbytes, dtype=torch.uint8, pin_memory=True)
                    stored.host.copy_(flat, non_blocking=True)
                flat.record_stream(side)  # its memory is reused only after the copy: NOTE [What is offloaded]
            else:
                stored.host = flat.clone()  # NOTE [Offloading CPU tensors in tests]
        self.bytes_offloaded += stored.nbytes
        return stored

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # -- backward -------------------------------------------------------------------------
    def _reached(self, call: _Call) -> None:
        """Backward reached `call`'s outputs: copy it and the `prefetch` calls before it back."""
        self._backward_seen = True
        self._restore_call(call)
        previous, left = call.before(), self.prefetch
        while previous is not None and left > 0:
            if previous.stored:
                self._restore_call(previous)
                left -= 1
            previous = previous.before()

    def _restore_call(self, call: _Call) -> None:
        started = [self._copy_back(stored) for stored in call.stored.values()]
        if any(started) and self.record_events:
            self.events.append(("prefetch", call.index))

    def _copy_back(self, stored: _Stored) -> bool:
        """Start copying `stored` to its device unless it is there or on its way; True if started."""
        if stored.restored is not None:
            return False
        with torch.no_grad():
            if stored.device.type == "cuda":
                side = self._stream(stored.device)
                with torch.cuda.stream(side):
                    # Allocated on the side stream, which alone writes it until `ready`; the
                    # stream that reads it is recorded on unpack.
                    restored = torch.empty(stored.nbytes, dtype=torch.uint8, device=stored.device)
                    restored.copy_(stored.host, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(side)
                stored.restored, stored.ready = restored, ready
            elif stored.device.type == "meta":
                stored.restored = torch.empty(stored.nbytes, dtype=torch.uint8, device="meta")
            else:
                stored.restored = stored.host.clone()
        stored.unpacked = 0
        self.bytes_restored += stored.nbytes
        return True

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        stored = saved.stored
        if stored.restored is None and self._copy_back(stored) and self.record_events:
            self.events.append(("fetch", stored.call_index))
        restored = stored.restored
        if stored.ready is not None:
            current = torch.cuda.current_stream(stored.device)
            current.wait_event(stored.ready)  # this storage only, not the whole side stream
            restored.record_stream(current)
        with torch.no_grad():
            tensor = torch.empty(0, dtype=saved.dtype, device=restored.device).set_(
                restored.untyped_storage(), saved.offset, saved.size, saved.stride
            )
        stored.unpacked += 1
        if stored.unpacked >= stored.refs:  # every saved tensor of this storage has its copy
            stored.restored = stored.ready = None
        return tensor


def _offloadable(tensor: torch.Tensor, call: _Call) -> bool:
    if type(tensor) is not torch.Tensor or tensor.layout != torch.strided:
        return False  # nn.Parameter, subclasses (DTensor, FakeTensor), sparse: kept as they are
    if not (tensor.is_cuda or tensor.is_meta or (call.offload_cpu and tensor.device.type == "cpu")):
        return False
    if tensor.is_leaf and tensor.requires_grad:
        return False
    if tensor.is_conj() or tensor.is_neg() or tensor.is_quantized or tensor.is_nested:
        return False
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if tensor.is_meta:  # NOTE [Offload on the meta device]
        return nbytes > 0 and nbytes >= call.min_bytes
    return nbytes > 0 and nbytes >= call.min_bytes and storage.data_ptr() not in call.exclude


class Offloaded(ModuleWrapper):
    """Run ``wrapped`` with its saved tensors in pinned host memory between forward and backward.

    Exact: outputs, gradients and buffers are bitwise those of `wrapped`; the cost is PCIe time,
    partly hidden behind compute (NOTE [Offload prefetch]).

    Args:
        wrapped: any module; typically a block ``x: (batch, channels, length) -> same`` on CUDA.
        min_bytes: storages smaller than this stay on the device (NOTE [What is offloaded]).
        group: the `OffloadGroup` whose calls prefetch for each other; the wrappers ``offload_``
            makes share one. Default: a group of its own.

    Tensors on the CPU are left as they are (nothing to free). Under ``torch.no_grad()`` and
    ``torch.compile`` it runs `wrapped` directly; on the meta device it simulates the moves for the
    no-GPU estimate (NOTE [Offload on the meta device]). `state_dict()` keys are
    those of `wrapped`; ``convmem.restore_`` takes the wrapper out.

    Example::

        >>> block = Offloaded(nn.Sequential(nn.Conv1d(64, 64, 3, padding=1), nn.GELU()).cuda())
        >>> block(torch.randn(8, 64, 160_000, device="cuda")).sum().backward()

    .. warning:: Host memory: every offloaded storage takes pinned host memory until backward
        frees its graph. Nested with checkpointing, the innermost saved-tensor hooks win
        (NOTE [Offload and other saved-tensor hooks]).
    """

    def __init__(
        self,
        wrapped: nn.Module,
        *,
        min_bytes: int = DEFAULT_MIN_BYTES,
        group: Optional[OffloadGroup] = None,
        _offload_cpu_tensors: bool = False,
    ):
        check_min_bytes(min_bytes, "Offloaded")
        if group is not None and not isinstance(group, OffloadGroup):
            raise TypeError(f"Offloaded: group must be an OffloadGroup, got {type(group).__name__}")
        super().__init__(wrapped)
        self.min_bytes = min_bytes
        self.group = group if group is not None else OffloadGroup()
        self._offload_cpu_tensors = bool(_offload_cpu_tensors)

    def extra_repr(self) -> str:
        return f"min_bytes={self.min_bytes}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.wrapped(*args, **kwargs)
        group = self.group
        exclude = {
            t.untyped_storage().data_ptr()
            for t in itertools.chain(self.wrapped.parameters(), self.wrapped.buffers())
        }
        call = group._new_call(exclude, self._offload_cpu_tensors, self.min_bytes)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: group._pack(call, t), group._unpack):
            output = self.wrapped(*args, **kwargs)
        hook = _ReachedHook(group, call)
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                tensor.register_hook(hook)
        return output


class _ReachedHook:
    """Gradient hook on a call's outputs: backward has reached the call (NOTE [Offload prefetch])."""

    __slots__ = ("group", "call")

    def __init__(self, group: OffloadGroup, call: _Call):
        self.group = group
        self.call = call

    def __call__(self, grad: torch.Tensor) -> None:
        self.group._reached(self.call)

