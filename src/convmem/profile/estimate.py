"""The memory of a CUDA training step, estimated on any machine (no GPU needed).

A copy of the model and inputs on the ``meta`` device runs the step: shapes, dtypes, the ops
autograd records and the tensors it saves are exactly those of the CUDA run, and `LiveSet`
follows every storage from allocation to release (NOTE [Simulated CUDA allocator]).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .autocast_sim import SimulatedAutocast
from .ledger import GRAD, KEPT, OPTIMIZER, RESIDENT, LiveSet
from .recorder import ModuleCall, StepRecorder, tensors_in
from .step import LossFn, run_step
from .workspace import DEFAULT_CUDA_MODEL, CudaModel


@dataclasses.dataclass
class StepEstimate:
    """The estimated CUDA memory of one step. Bytes; the parts add up to `peak_bytes`."""

    peak_bytes: int
    resident_bytes: int  # parameters, buffers, inputs (and existing optimizer state)
    kept_bytes: int  # saved for backward, live at the peak
    grad_bytes: int  # parameter gradients live at the peak
    optimizer_bytes: int  # optimizer state created by the step, live at the peak
    transient_bytes: int  # everything else live at the peak: outputs in flight, grads of activations
    workspace_bytes: int  # library scratch space at the peak (modelled)
    saved_bytes: int  # all bytes autograd saved during the step (deduplicated by storage)
    peak_phase: str
    peak_op: str
    timeline: List[int]
    phase_starts: Dict[str, int]
    calls: List[ModuleCall]
    loss_call: ModuleCall


def meta_clone(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory)."""
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # a module holding something that cannot be copied (a lock, a file)
        raise RuntimeError(
            f"the estimate needs a copy of the model on the meta device, and {type(model).__name__} "
            f"cannot be deep-copied: {error}"
        ) from error


def to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta").requires_grad_(
            value.requires_grad
        )
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def _meta_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, clone: nn.Module):
    lookup = {id(p): q for p, q in zip(model.parameters(), clone.parameters())}
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in lookup]
        if missing:
            raise ValueError("the optimizer holds parameters that are not the model's")
        meta_group = {k: v for k, v in group.items() if k != "params"}
        meta_group["params"] = [lookup[id(p)] for p in group["params"]]
        # foreach/fused kernels have no meta implementation in older PyTorch; the bytes are the same.
        for flag in ("foreach", "fused"):
            if flag in meta_group:
                meta_group[flag] = False
        groups.append(meta_group)
    meta_opt = type(optimizer)(groups)
    for p, state in optimizer.state.items():
        if id(p) in lookup:
            meta_opt.state[lookup[id(p)]] = {k: to_meta(v) for k, v in state.items()}
    return meta_opt


def estimate_step(
    model: nn.Module,
    inputs: Sequence[Any],
    loss_fn: Optional[LossFn] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    cuda_model: CudaModel = DEFAULT_CUDA_MODEL,
) -> StepEstimate:
    """Run one step of a meta copy of `model` and return its simulated CUDA memory."""
    clone = meta_clone(model)
    meta_inputs = to_meta(tuple(inputs))
    meta_opt = _meta_optimizer(optimizer, model, clone) if optimizer is not None else None

    live = LiveSet("meta", cuda_model)
    resident = list(clone.parameters()) + list(clone.buffers()) + tensors_in(list(meta_inputs))
    if meta_opt is not None:
        resident += [t for state in meta_opt.state.values() for t in tensors_in(list(state.values()))]
    for t in resident:
        live.add(t.untyped_storage(), RESIDENT)

    recorder = StepRecorder(clone, excluded=resident, on_saved=lambda storage: live.tag(storage, KEPT))
    autocast = SimulatedAutocast(autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        with live, recorder:
            run_step(clone, meta_inputs, loss_fn, meta_opt, autocast, live.mark_phase)
    except Exception as error:
        raise _explain(error, recorder.failing_call(), model) from error

    # Kinds known only at the end: gradients and optimizer state.
    for p in clone.parameters():
        if p.grad is not None:
            live.tag(p.grad.untyped_storage(), GRAD)
    if meta_opt is not None:
        for state in meta_opt.state.values():
            for t in tensors_in(list(state.values())):
                if live.kinds.get(live.serial(t.untyped_storage())) != RESIDENT:
                    live.tag(t.untyped_storage(), OPTIMIZER)
    parts = live.breakdown_at_peak()
    return StepEstimate(
        peak_bytes=live.peak_bytes,
        resident_bytes=parts[RESIDENT],
        kept_bytes=parts[KEPT],
        grad_bytes=parts[GRAD],
        optimizer_bytes=parts[OPTIMIZER],
        transient_bytes=parts["transient"],
        workspace_bytes=parts["workspace"],
        saved_bytes=recorder.saved_total_bytes,
        peak_phase=_phase_at(live.phase_starts, live.peak_index),
        peak_op=live.peak_op,
        timeline=live.timeline,
        phase_starts=dict(live.phase_starts),
        calls=recorder.calls,
        loss_call=recorder.loss_call,
    )


def _phase_at(phase_starts: Dict[str, int], index: int) -> str:
    current = "forward"
    for name, start in sorted(phase_starts.items(), key=lambda item: item[1]):
        if start <= index:
            current = name
    return current


def _explain(error: Exception, call: Optional[ModuleCall], model: nn.Module) -> Exception:
    """A clear message for a step that failed on the meta device: which module, which input."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if call is None:
        return type(error)(text) if isinstance(error, (ValueError, TypeError)) else RuntimeError(text)
    module = model.get_submodule(call.name) if call.name else model
    where = f"module '{call.name or type(model).__name__}' ({type(module).__name__})"
    shapes = ", ".join(str(s) for s in call.input_shapes)
    expected = ""
    if hasattr(module, "in_channels"):
        expected = f" expects {module.in_channels} input channels, as (batch, {module.in_channels}, length), and"
    message = f"{where}{expected} rejected its input of shape {shapes}: {text}"
    if "meta" in text and ("item" in text or "data-dependent" in text):
        message += (" (the no-GPU estimate runs on the meta device, where tensors have no values; "
                    "a forward that reads one cannot be estimated)")
    return ValueError(message)
