"""Where a Conv1d model's GPU memory goes during a training step.

``convmem.profile(model, x)`` runs one step (forward, loss, backward, optional optimizer step) and
returns a `MemoryProfile`: per module call the parameter, gradient, kept and output bytes and the
forward/backward time; for the step the peak split into resident, kept and transient memory,
from a no-GPU estimate and, on a GPU, from the CUDA allocator.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .._units import parse_bytes
from .capacity import max_input_length
from .estimate import StepEstimate, estimate_step
from .measure import StepMeasurement, measure_step, preserved
from .report import MaxLength, MemoryProfile, ModuleRow, build_rows
from .step import default_loss, model_device
from .workspace import CudaModel

__all__ = [
    "profile", "MemoryProfile", "ModuleRow", "MaxLength", "StepEstimate", "StepMeasurement",
    "estimate_step", "measure_step", "max_input_length", "preserved", "CudaModel", "default_loss",
]


def profile(
    model: nn.Module,
    *inputs: Any,
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    autocast: Optional[torch.dtype] = None,
    measure: Optional[bool] = None,
    gpu_memory: Union[int, str, None] = None,
    sample_rate: Optional[float] = None,
    length_axis: int = -1,
    backward_times: Optional[bool] = None,
) -> MemoryProfile:
    """Profile one training step of `model` on `inputs`; the model is left exactly as it was.

    Args:
        model: any ``nn.Module``; typically convolutions over ``x: (batch, channels, length)``.
        inputs: positional arguments of ``model``.
        loss_fn: ``loss_fn(output) -> scalar``; default: mean of squares of the outputs.
        optimizer: when given, its ``step()`` is part of the step (its state counts).
        autocast: ``torch.bfloat16`` or ``torch.float16`` to profile under autocast.
        measure: run the real step on the model's device too (default: when it is a GPU).
            On a CPU this gives times only.
        gpu_memory: bytes or ``"80GiB"``: also compute the longest input that fits this much
            (default on a GPU: the card's memory).
        sample_rate: samples per second of the length axis, to say the longest input in seconds.
        length_axis: the axis of the inputs that is the sequence length.
        backward_times: time each module's backward (hooks and a CUDA event pair on every autograd
            node). Default: on, except under autocast on CUDA, where on an H200 the hooked bf16
            step of hifigan ran for minutes instead of 35 ms (cause not found yet; fp32 costs
            +200% there). Memory figures do not depend on it.

    Example::

        prof = convmem.profile(model, torch.randn(8, 1, 160_000))
        print(prof.table())
        prof.plot("memory.png")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inputs:
        raise ValueError("profile needs at least one example input: convmem.profile(model, x)")
    device = model_device(model, inputs)
    if measure is None:
        measure = device.type == "cuda"
    memory = parse_bytes(gpu_memory) if gpu_memory is not None else None
    if memory is None and device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory

    estimate = estimate_step(model, inputs, loss_fn, optimizer, autocast)
    if backward_times is None:
        backward_times = not (autocast is not None and device.type == "cuda")
    measured = (
        measure_step(model, inputs, loss_fn, optimizer, autocast, device, backward_times=backward_times)
        if measure else None
    )
    max_length = None
    if memory is not None:
        max_length = max_input_length(
            model, inputs, memory, loss_fn=loss_fn, optimizer=optimizer, autocast=autocast,
            length_axis=length_axis, sample_rate=sample_rate,
        )
    return MemoryProfile(
        model=type(model).__name__,
        inputs=[
            {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""), "device": str(x.device)}
            for x in inputs
            if isinstance(x, torch.Tensor)
        ],
        autocast=str(autocast).replace("torch.", "") if autocast is not None else None,
        rows=build_rows(estimate, measured),
        estimate=estimate,
        measured=measured,
        max_length=max_length,
    )
