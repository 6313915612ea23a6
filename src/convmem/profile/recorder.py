"""Per-module bookkeeping of one training step: calls, kept bytes, output bytes, times.

The same recorder serves the no-GPU estimate (meta tensors) and the measured run (CUDA or CPU):
module hooks keep a stack of calls, a ``saved_tensors_hooks`` pack hook charges every tensor that
autograd saves to the innermost call that is running, and autograd-node hooks time the backward.

# NOTE [Kept bytes]
# "Kept" is what autograd holds between forward and backward: the storages of saved tensors,
# counted once per storage (a tensor saved by two ops, or two views of one buffer, count once) and
# charged to the first module call that saved them. Storages the step did not create -- parameters,
# buffers and the inputs -- are resident, not kept, even when autograd saves them (a conv saves
# its weight and, for the first layer, the input). Meta storages have no address, so identity is
# the storage object itself (PyTorch keeps one Python object per live storage).

# Modules that run again *during* backward -- the recompute of a checkpointed or tiled module --
# keep nothing between forward and backward: their calls are marked `in_backward`, what they save
# is not kept (it lives only while their backward runs, and the live set counts it as transient),
# and the report leaves their rows out. Calls made by a length analysis (the meta trace of a tiled
# module's first call) are not the step's and are not recorded at all (NOTE [The trace is not part
# of the step] in analysis/trace.py).

# NOTE [Backward time per module]
# Full backward hooks (``register_full_backward_hook``) wrap a module's inputs and outputs in an
# extra autograd function, which breaks in-place ops on those outputs in third-party models. We
# leave the graph alone instead: when a call ends, the autograd nodes it created are the nodes
# reachable from its outputs whose sequence number is above a watermark taken when it started;
# the innermost call claims them first. Hooks on those nodes time the backward.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

LOSS_ROW = "<loss>"


@dataclasses.dataclass
class ModuleCall:
    """One call of one module during the step (a module called twice has two)."""

    name: str
    module_type: str
    call_index: int
    depth: int
    parent: Optional["ModuleCall"]
    param_bytes: int = 0
    grad_bytes: int = 0
    kept_bytes: int = 0
    output_bytes: int = 0
    forward_s: Optional[float] = None
    backward_s: Optional[float] = None
    children: List["ModuleCall"] = dataclasses.field(default_factory=list)
    in_backward: bool = False
    grad_enabled: bool = True
    input_shapes: List[tuple] = dataclasses.field(default_factory=list, repr=False)
    module: Optional[nn.Module] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.name if self.call_index == 0 else f"{self.name}#{self.call_index + 1}"


def inclusive_kept(call: ModuleCall) -> int:
    """Bytes `call` and every call nested in it keep for backward."""
    return call.kept_bytes + sum(inclusive_kept(child) for child in call.children)


def tensors_in(value: Any) -> List[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: Set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total


def _param_bytes(module: nn.Module) -> tuple:
    params = list(module.parameters())
    n = sum(p.numel() * p.element_size() for p in params)
    g = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return n, g


class _Timer:
    """Wall-clock timestamps on the CPU; CUDA events (read after a synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1e3
        return end - start


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def _next_sequence_nr() -> int:
    # The autograd sequence counter is thread-local and not exposed; a throw-away node reads it.
    probe = torch.ones((), requires_grad=True).expand(())
    return probe.grad_fn._sequence_nr()


class StepRecorder:
    """Records module calls, kept bytes and (optionally) times while a step runs under it.

    Use as a context manager around forward, loss and backward; `calls` then lists every module
    call in order. `excluded` holds tensors whose storages are resident (parameters, buffers,
    inputs): saving them costs nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        excluded: Iterable[torch.Tensor],
        timer_device: Optional[torch.device] = None,
        on_saved: Optional[Callable[[Any], None]] = None,
        backward_times: bool = True,
    ):
        self.model = model
        self.backward_times = backward_times
        self.on_saved = on_saved
        self.calls: List[ModuleCall] = []
        self.loss_call = ModuleCall(LOSS_ROW, "loss", 0, 0, None)
        self._stack: List[ModuleCall] = []
        self._call_counts: Dict[str, int] = {}
        self._saved = WeakIdKeyDictionary()  # storage -> ModuleCall it is charged to
        self._excluded = WeakIdKeyDictionary()
        for t in excluded:
            self._excluded[t.untyped_storage()] = True
        self._timer = _Timer(timer_device) if timer_device is not None else None
        self._fwd_marks: Dict[int, Any] = {}
        self._watermarks: Dict[int, int] = {}
        self._claimed: Set[int] = set()
        self._node_marks: List[tuple] = []  # (call, start mark holder)
        self._handles: List[Any] = []
        self._saved_hooks = None
        self._tracing: Callable[[], bool] = lambda: False

    # -- kept bytes -------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        if _in_backward():
            return tensor  # a recompute inside backward: NOTE [Kept bytes]
        storage = tensor.untyped_storage()
        if storage not in self._excluded and storage not in self._saved:
            owner = self._stack[-1] if self._stack else self.loss_call
            self._saved[storage] = owner
            owner.kept_bytes += storage.nbytes()
            if self.on_saved is not None:
                self.on_saved(storage)
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor):
        return tensor

    @property
    def saved_total_bytes(self) -> int:
        return sum(c.kept_bytes for c in self.calls) + self.loss_call.kept_bytes

    # -- module hooks ----------------------------------------------------------------------
    def _pre_hook(self, name: str):
        def hook(module, args):
            if self._tracing():
                return  # a length analysis, not the step (NOTE [The trace is not part of the step])
            index = self._call_counts.get(name, 0)
            self._call_counts[name] = index + 1
            parent = self._stack[-1] if self._stack else None
            call = ModuleCall(name, type(module).__name__, index, len(self._stack), parent, in_backward=_in_backward(),
                              grad_enabled=torch.is_grad_enabled())
            call.param_bytes, call.grad_bytes = _param_bytes(module)
            call.input_shapes = [tuple(t.shape) for t in tensors_in(args)]
            if parent is not None:
                parent.children.append(call)
            self.calls.append(call)
            self._stack.append(call)
            if self._timer is not None:
                if call.grad_enabled and self.backward_times:
                    self._watermarks[id(call)] = _next_sequence_nr()
                self._fwd_marks[id(call)] = self._timer.mark()

        hook.convmem_observer = True  # a fused path may run without it (NOTE [Norm-activation-conv chains])
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            if self._tracing():
                return
            call = self._stack.pop()
            outputs = tensors_in(output)
            call.output_bytes = unique_storage_bytes(outputs)
            if self._timer is not None:
                call.forward_s = self._fwd_marks.pop(id(call)), self._timer.mark()
                if call.grad_enabled and self.backward_times:
                    self._claim_nodes(call, outputs)

        hook.convmem_observer = True
        return hook

    def _claim_nodes(self, call: ModuleCall, outputs: List[torch.Tensor]) -> None:
        # See NOTE [Backward time per module].
        watermark = self._watermarks.pop(id(call))
        pending = [t.grad_fn for t in outputs if t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or id(node) in self._claimed:
                continue
            if type(node).__name__ == "AccumulateGrad" or node._sequence_nr() <= watermark:
                continue
            self._claimed.add(id(node))
            self._time_node(call, node)
            pending.extend(next_node for next_node, _ in node.next_functions)

    def _time_node(self, call: ModuleCall, node) -> None:
        record = [call, None, None]
        self._node_marks.append(record)

        def pre(grad_outputs):
            record[1] = self._timer.mark()

        def post(grad_inputs, grad_outputs):
            record[2] = self._timer.mark()

        self._handles.append(node.register_prehook(pre))
        self._handles.append(node.register_hook(post))

    def finish_times(self) -> None:
        """Turn the recorded marks into seconds (after the step and a device synchronize)."""
        if self._timer is None:
            return
        for call in self.calls:
            if isinstance(call.forward_s, tuple):
                call.forward_s = self._timer.seconds(*call.forward_s)
        if not self.backward_times:
            return
        for call in self.calls:
            call.backward_s = 0.0
        for call, start, end in self._node_marks:
            if start is not None and end is not None:
                call.backward_s += self._timer.seconds(start, end)
        # Inclusive backward time: children's nodes were claimed by the children.
        for call in reversed(self.calls):
            if call.parent is not None:
                call.parent.backward_s += call.backward_s
        self._node_marks.clear()

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> "StepRecorder":
        from ..analysis.trace import is_active  # analysis imports profile: not at module level

        self._tracing = is_active
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        return self

    def failing_call(self) -> Optional[ModuleCall]:
        """The innermost module call still running (after forward raised), if any."""
        return self._stack[-1] if self._stack else None

    def __exit__(self, *exc) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(*exc)
            self._saved_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._claimed.clear()

