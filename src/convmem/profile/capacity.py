"""The longest input that fits a memory size.

# NOTE [Peak is affine in length]
# Every activation of a Conv1d model is batch x channels x (length / stride), so kept and
# transient bytes grow linearly with the input length while parameters, gradients and optimizer
# state do not: peak(L) = fixed + per_sample * L, up to the allocator's 512-byte rounding and
# integer division by strides. Two estimates (no GPU needed) give the line; one more at the
# answer checks it, and the answer steps down until the estimate fits.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .estimate import estimate_step
from .report import MaxLength


def resize_length(inputs: Sequence[Any], length: int, axis: int = -1) -> tuple:
    """Meta copies of `inputs` whose length axis (the first input's) is `length`."""
    reference = next(x for x in inputs if isinstance(x, torch.Tensor))
    old = reference.shape[axis]
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[axis] == old:
            shape = list(x.shape)
            shape[axis] = length
            x = torch.empty(shape, dtype=x.dtype, device="meta").requires_grad_(x.requires_grad)
        out.append(x)
    return tuple(out)


def max_input_length(
    model: nn.Module,
    inputs: Sequence[Any],
    memory_bytes: int,
    loss_fn: Optional[Callable] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    autocast: Optional[torch.dtype] = None,
    length_axis: int = -1,
    sample_rate: Optional[float] = None,
) -> MaxLength:
    """The longest input (along `length_axis`) whose estimated CUDA peak fits `memory_bytes`."""
    length = next(x for x in inputs if isinstance(x, torch.Tensor)).shape[length_axis]

    def peak(n: int) -> int:
        return estimate_step(model, resize_length(inputs, n, length_axis), loss_fn, optimizer, autocast).peak_bytes

    short = max(length // 2, 1)
    long = length if length > short else 2 * length
    p_short, p_long = peak(short), peak(long)
    per_sample = (p_long - p_short) / (long - short)
    fixed = p_long - per_sample * long
    if per_sample <= 0:
        raise ValueError("the estimated peak does not grow with the input length along axis "
                         f"{length_axis}; is that the sequence axis?")
    best = int((memory_bytes - fixed) // per_sample)
    if best < 1:
        best = 0
    else:
        # Step down from the linear answer until the estimate itself fits (rounding, strides).
        for _ in range(8):
            if peak(best) <= memory_bytes:
                break
            best = int(best * 0.999) - 1
    return MaxLength(
        memory_bytes=memory_bytes,
        samples=max(best, 0),
        seconds=best / sample_rate if sample_rate else None,
        bytes_per_sample=per_sample,
        fixed_bytes=fixed,
    )
