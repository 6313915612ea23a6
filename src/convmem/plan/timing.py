"""Step times for the planner: the median of a few training steps, CUDA events on a GPU.

The planner times the whole model with one option applied to every block (NOTE [Measured option
costs] in plan/costs.py); this is the one timing loop it uses. Memory is not read here: the
planner's bytes come from the estimate, and `convmem.profile.measure_step` measures peaks.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..profile.measure import preserved
from ..profile.step import LossFn, default_loss, model_device


def step_seconds(model: nn.Module, inputs: Sequence[Any], loss_fn: Optional[LossFn] = None,
                 repeats: int = 3, warmup: int = 1, autocast: Optional[torch.dtype] = None) -> float:
    """Median seconds of one training step (forward, loss, backward; no optimizer), under
    ``torch.autocast`` in `autocast` when given.

    The model comes back as it was (parameters, gradients, buffers, modes: `preserved`).
    """
    device = model_device(model, inputs)
    cuda = device.type == "cuda"
    loss_fn = loss_fn or default_loss
    times = []
    with preserved(model):
        for index in range(warmup + repeats):
            model.zero_grad(set_to_none=True)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            began = time.perf_counter()
            with contextlib.nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast):
                loss = loss_fn(model(*inputs))
            loss.backward()
            if cuda:
                end.record()
                torch.cuda.synchronize(device)
                elapsed = start.elapsed_time(end) / 1e3
            else:
                elapsed = time.perf_counter() - began
            if index >= warmup:
                times.append(elapsed)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)
