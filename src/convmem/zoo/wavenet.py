"""WaveNet (van den Oord et al. 2016, "WaveNet: A Generative Model for Raw Audio"): the `wavenet` workload.

An unconditional WaveNet as in shared/WORKLOADS.md: an initial causal convolution, 24 gated residual
layers with causal (left-padded) dilated convolutions whose dilation cycles 1, 2, ..., 512 (the
paper's stacks of ten), filter width 2 (the paper's Figure 3), and the output stack of the paper's
Figure 4, ReLU -> 1x1 -> ReLU -> 1x1, to 256 mu-law classes (softmax over the classes is in the loss).

Channel counts follow the PyTorch implementation r9y9/wavenet_vocoder (residual_channels=128,
gate_channels=256, skip_out_channels=128): the dilated convolution outputs 256 channels that are
split into a 128-channel tanh filter and a 128-channel sigmoid gate, as in that implementation.

The last layer has no residual 1x1: its residual output would feed nothing. Implementations that keep
it (r9y9) carry 16,512 parameters that never receive a gradient, which DDP rejects unless
``find_unused_parameters=True``.

Input (batch, 1, length) waveform at 16 kHz, output (batch, 256, length) logits; output position t
depends only on inputs <= t. Any length >= 1.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from convmem.zoo._workload import Workload, cross_entropy_cyclic_target, normal

__all__ = ["CausalConv1d", "WaveNet", "WaveNetLayer", "WORKLOAD"]


class CausalConv1d(nn.Module):
    """Conv1d left-padded by ``dilation * (kernel_size - 1)`` zeros: output t sees inputs <= t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.pad = nn.ConstantPad1d((dilation * (kernel_size - 1), 0), 0.0)
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class WaveNetLayer(nn.Module):
    """Gated residual layer: z = tanh(filter) * sigmoid(gate); returns (x + residual(z), skip(z)).

    x: (batch, residual_channels, length). Without a residual 1x1 (the last layer) x passes through.
    """

    def __init__(
        self,
        residual_channels: int,
        gate_channels: int,
        skip_channels: int,
        kernel_size: int,
        dilation: int,
        has_residual: bool = True,
    ) -> None:
        super().__init__()
        self.dilated = CausalConv1d(residual_channels, gate_channels, kernel_size, dilation)
        self.skip = nn.Conv1d(gate_channels // 2, skip_channels, 1)
        self.residual = nn.Conv1d(gate_channels // 2, residual_channels, 1) if has_residual else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        filt, gate = self.dilated(x).chunk(2, dim=1)
        z = torch.tanh(filt) * torch.sigmoid(gate)
        if self.residual is None:
            return x, self.skip(z)
        return x + self.residual(z), self.skip(z)


class WaveNet(nn.Module):
    """x: (batch, 1, length) -> logits (batch, classes, length).

    Example::

        >>> WaveNet()(torch.randn(2, 1, 100)).shape
        torch.Size([2, 256, 100])
    """

    def __init__(
        self,
        num_layers: int = 24,
        dilation_cycle: int = 10,
        residual_channels: int = 128,
        gate_channels: int = 256,
        skip_channels: int = 128,
        kernel_size: int = 2,
        classes: int = 256,
    ) -> None:
        super().__init__()
        if gate_channels % 2:
            raise ValueError(f"gate_channels splits into filter and gate halves, got {gate_channels}")
        self.input_conv = CausalConv1d(1, residual_channels, kernel_size)
        self.layers = nn.ModuleList(
            WaveNetLayer(
                residual_channels,
                gate_channels,
                skip_channels,
                kernel_size,
                dilation=2 ** (i % dilation_cycle),
                has_residual=i < num_layers - 1,
            )
            for i in range(num_layers)
        )
        self.output = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(skip_channels, skip_channels, 1),
            nn.ReLU(),
            nn.Conv1d(skip_channels, classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_conv(x)
        skips = 0
        for layer in self.layers:
            x, skip = layer(x)
            skips = skips + skip
        return self.output(skips)


WORKLOAD = Workload(
    name="wavenet",
    model_cls=WaveNet,
    default_shape=(8, 1, 16384),
    small_shape=(2, 1, 512),
    make_input=normal,
    loss_fn=cross_entropy_cyclic_target,
    blocks="layers",
    description="WaveNet: 24 causal gated layers (128/256/128), dilations 1..512, 256 classes",
    sample_rate=16000,
)
