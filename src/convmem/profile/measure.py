"""The measured step: the real device, the CUDA allocator's own counters, CUDA-event times.

Memory is measured one way everywhere (STYLE.md): warm up, synchronize, collect, empty the
cache, reset the peak, run, read ``max_memory_allocated``. The model comes back as it was:
parameters, buffers, gradients, ``requires_grad``, train/eval mode and optimizer state.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .recorder import ModuleCall, StepRecorder, tensors_in
from .step import LossFn, run_step


@dataclasses.dataclass
class StepMeasurement:
    """One measured step. Memory figures are None off CUDA; times are seconds."""

    device: str
    step_s: float
    peak_bytes: Optional[int]
    start_bytes: Optional[int]  # allocated when the step began: parameters, inputs, anything else
    saved_bytes: int  # autograd's saved tensors, deduplicated by storage (parameters/inputs excluded)
    calls: List[ModuleCall]
    loss_call: ModuleCall


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[None]:
    """Give `model` (and `optimizer`) back exactly as they were, whatever runs inside.

    Copies go to the CPU so that they do not add to the GPU peak being measured.
    """
    params = [(p, p.detach().to("cpu", copy=True), p.requires_grad, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().to("cpu", copy=True)) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    opt_state = copy.deepcopy(_to_cpu(optimizer.state_dict())) if optimizer is not None else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data, requires_grad, grad in params:
                p.copy_(data)
                p.requires_grad_(requires_grad)
                p.grad = grad
            for b, data in buffers:
                b.copy_(data)
        for m, training in modes:
            m.training = training
        if optimizer is not None:
            _load_optimizer_state(optimizer, opt_state)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Put `state` (a ``state_dict()``) back; an empty one also drops state created since."""
    optimizer.load_state_dict(state)
    if not state["state"]:
        optimizer.state.clear()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_cuda_peak(device: torch.device) -> None:
    """The measuring ritual's middle: synchronize, collect, empty the cache, reset the peak."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def graph_pool_bytes(pools: Optional[Sequence[Any]] = None) -> int:
    """Bytes reserved by CUDA-graph private memory pools (`pools`, default all of them).

    A replay allocates nothing, so ``max_memory_allocated`` does not see the pool's use during one;
    a peak that is to count everything a graphed step holds adds this.
    """
    wanted = None if pools is None else {tuple(p) for p in pools}
    total = 0
    for segment in torch.cuda.memory_snapshot():
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        if pool != (0, 0) and (wanted is None or pool in wanted):
            total += segment["total_size"]
    return total


def measure_step(
    model: nn.Module,
    inputs: Sequence[Any],
    loss_fn: Optional[LossFn] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    warmup: int = 1,
    backward_times: bool = True,
) -> StepMeasurement:
    """Run one warm-up and one measured step of `model` where it lives; the model is left as found."""
    device = device or next(iter(tensors_in(list(inputs)) + list(model.parameters()))).device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    resident = list(model.parameters()) + list(model.buffers()) + tensors_in(list(inputs))
    if optimizer is not None:
        resident += [t for state in optimizer.state.values() for t in tensors_in(list(state.values()))]
    with preserved(model, optimizer):
        # The user's gradient tensors stay aside (`preserved` gives them back); a step would add
        # to them in place.
        model.zero_grad(set_to_none=True)
        opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        for _ in range(warmup):
            run_step(model, inputs, loss_fn, optimizer, autocast)
            model.zero_grad(set_to_none=True)
            if optimizer is not None:
                _load_optimizer_state(optimizer, opt_state)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            reset_cuda_peak(device)
            start_bytes = torch.cuda.memory_allocated(device)
        recorder = StepRecorder(model, excluded=resident, timer_device=device, backward_times=backward_times)
        timer = recorder._timer
        with recorder:
            begin = timer.mark()
            run_step(model, inputs, loss_fn, optimizer, autocast)
            end = timer.mark()
        _synchronize(device)
        recorder.finish_times()
        step_s = timer.seconds(begin, end)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StepMeasurement(
        device=_device_name(device),
        step_s=step_s,
        peak_bytes=peak,
        start_bytes=start_bytes if device.type == "cuda" else None,
        saved_bytes=recorder.saved_total_bytes,
        calls=recorder.calls,
        loss_call=recorder.loss_call,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
