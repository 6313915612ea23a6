"""The record every zoo architecture returns."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
from torch import nn


@dataclasses.dataclass
class ZooEntry:
    """A reference Conv1d workload: model, example inputs and a training loss.

    `inputs` are positional arguments of `model`; `loss_fn(output)` returns a scalar and makes any
    target it needs on `output.device`, so the entry moves between devices with the model.
    `blocks` are the qualified names of the repeated blocks (what a user would checkpoint one by
    one); `chain` is the qualified name of the `nn.Sequential` that holds them, when they form one.
    """

    name: str
    model: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    blocks: Tuple[str, ...]
    chain: Optional[str] = None
    sample_rate: Optional[int] = None
    length_axis: int = -1
    description: str = ""

    def to(self, device=None, dtype=None) -> "ZooEntry":
        self.model.to(device=device, dtype=dtype)
        self.inputs = tuple(
            x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)
            for x in self.inputs
        )
        return self
