"""The planner's step timer: a training step's median time, and the GPU's time alone.

NOTE [GPU time alone] (convmem/plan/timing.py): a launch-bound step measured with a spin kernel in
front is the time its kernels take, far below the step as a loop sees it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from convmem.plan.timing import step_seconds


def launch_bound() -> nn.Module:
    """Two hundred tiny layers: queueing their kernels takes the host far longer than running them."""
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(200)])


def test_the_model_comes_back_as_it_was_and_times_are_positive():
    model = launch_bound()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    assert step_seconds(model, [x], repeats=2) > 0
    assert step_seconds(model, [x], repeats=2, gpu_only=True) > 0  # on the CPU: the step as it is
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_time_alone_leaves_out_the_hosts_gaps():
    model = launch_bound().cuda()
    x = torch.randn(4, 8, device="cuda")
    as_a_loop_sees_it = step_seconds(model, [x], repeats=5, warmup=2)
    alone = step_seconds(model, [x], repeats=5, warmup=2, gpu_only=True)
    assert alone < 0.5 * as_a_loop_sees_it, (alone, as_a_loop_sees_it)
