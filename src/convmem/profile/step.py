"""One training step (forward, loss, backward, optimizer), the unit every profile measures."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .recorder import tensors_in

LossFn = Callable[[Any], torch.Tensor]


def default_loss(output: Any) -> torch.Tensor:
    """Mean of squares of every floating output: a dense gradient, like a real regression loss.

    (``output.sum()`` would be cheaper than any real loss: its gradient is a broadcast scalar that
    takes no memory.)
    """
    floats = [t for t in tensors_in(output) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise ValueError(
            "the model's output has no floating tensor that requires grad; pass loss_fn=... "
            "that turns the output into a scalar loss"
        )
    return sum(t.float().pow(2).mean() for t in floats)


def check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss


def run_step(
    model: nn.Module,
    inputs: Sequence[Any],
    loss_fn: Optional[LossFn],
    optimizer: Optional[torch.optim.Optimizer],
    autocast: contextlib.AbstractContextManager,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> torch.Tensor:
    """Forward and loss under `autocast`, then backward and the optimizer step."""
    on_phase("forward")
    with autocast:
        output = model(*inputs)
        on_phase("loss")
        loss = check_loss((loss_fn or default_loss)(output))
    del output
    on_phase("backward")
    loss.backward()
    if optimizer is not None:
        on_phase("optimizer")
        optimizer.step()
    on_phase("end")
    return loss.detach()


def model_device(model: nn.Module, inputs: Sequence[Any]) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()) + tensors_in(list(inputs)):
        return t.device
    return torch.device("cpu")
