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
                 repeats: int = 3, warmup: int = 1, autocast: Optional[torch.dtype] = None,
                 gpu_only: bool = False) -> float:
    """Median seconds of one training step (forward, loss, backward; no optimizer), under
    ``torch.autocast`` in `autocast` when given.

    `gpu_only` (CUDA): the GPU's time alone, without the gaps where it waits for the host to queue
    the next kernel (NOTE [GPU time alone]); the default is the step as a training loop sees it.
    The model comes back as it was (parameters, gradients, buffers, modes: `preserved`).
    """
    device = model_device(model, inputs)
    cuda = device.type == "cuda"
    loss_fn = loss_fn or default_loss
    times = []
    host = 0.0  # seconds the host took to queue the last step
    with preserved(model):
        for index in range(warmup + repeats):
            model.zero_grad(set_to_none=True)
            if cuda:
                if gpu_only and index >= warmup:
                    torch.cuda._sleep(_sleep_cycles(device, host))
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            began = time.perf_counter()
            with contextlib.nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast):
                loss = loss_fn(model(*inputs))
            loss.backward()
            host = time.perf_counter() - began
            if cuda:
                end.record()
                torch.cuda.synchronize(device)
                elapsed = start.elapsed_time(end) / 1e3
            else:
                elapsed = host
            if index >= warmup:
                times.append(elapsed)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


# NOTE [GPU time alone]
# A step whose host queues kernels more slowly than the GPU runs them is timed by its host: the
# GPU idles between kernels. Inside a bigger step (one convolution of a model), or replayed from a
# CUDA graph, that host time is hidden behind other kernels or gone, so the planner compares such
# parts by their GPU time alone. To measure it the GPU is first kept busy by a spin kernel
# (`torch.cuda._sleep`) long enough for the host to queue the whole step behind it; the events
# around the step then see the kernels back to back. The spin lasts four times the host's queueing
# time of the step before, at least a millisecond.


def _sleep_cycles(device: torch.device, host_seconds: float) -> int:
    rate_khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 2_000_000
    return int(max(4 * host_seconds, 1e-3) * rate_khz * 1e3)
