"""Dilated residual temporal convolutional network: the `tcn` workload.

The generic TCN of shared/WORKLOADS.md, in the family of Bai et al. 2018 ("An Empirical Evaluation
of Generic Convolutional and Recurrent Networks for Sequence Modeling") but non-causal: a 1x1 stem
to 256 channels, 16 residual blocks ``x + Conv1d_1x1(GELU(Conv1d_k3(x)))`` whose dilation cycles
through 1, 2, ..., 128 with same padding, and a 1x1 head to one channel.

Input (batch, 1, length) waveform at 16 kHz, output (batch, 1, length); any length >= 1.
"""
from __future__ import annotations

import torch
from torch import nn

from convmem.zoo._workload import Workload, mean_square, normal

__all__ = ["TCN", "TCNBlock", "WORKLOAD"]


class TCNBlock(nn.Module):
    """``x + pointwise(GELU(dilated(x)))``; x: (batch, channels, length), length preserved."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.dilated = nn.Conv1d(
            channels, channels, kernel_size, dilation=dilation, padding=dilation * (kernel_size - 1) // 2
        )
        self.activation = nn.GELU()
        self.pointwise = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(self.activation(self.dilated(x)))


class TCN(nn.Module):
    """x: (batch, 1, length) -> (batch, 1, length).

    Example::

        >>> TCN()(torch.randn(2, 1, 100)).shape
        torch.Size([2, 1, 100])
    """

    def __init__(
        self, channels: int = 256, num_blocks: int = 16, kernel_size: int = 3, dilation_cycle: int = 8
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for same padding, got {kernel_size}")
        self.stem = nn.Conv1d(1, channels, 1)
        self.blocks = nn.Sequential(
            *(TCNBlock(channels, kernel_size, 2 ** (i % dilation_cycle)) for i in range(num_blocks))
        )
        self.head = nn.Conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


WORKLOAD = Workload(
    name="tcn",
    model_cls=TCN,
    default_shape=(4, 1, 65536),
    small_shape=(2, 1, 512),
    make_input=normal,
    loss_fn=mean_square,
    blocks="blocks",
    description="non-causal TCN: 16 residual GELU blocks of 256 channels, k=3, dilations 1..128 cycled",
    sample_rate=16000,
)
