"""A stack of Conformer convolution modules (Gulati et al. 2020, "Conformer: Convolution-augmented
Transformer for Speech Recognition", Figure 2): the `conformer_conv` workload.

16 modules of width d=256 (Conformer-M has 16 layers of d=256), each
``x + Dropout(Pointwise(SiLU(BatchNorm(Depthwise_k31(GLU(Pointwise_2d(LayerNorm(x))))))))``. The
depthwise kernel is 31 with symmetric padding 15, as in ESPnet's ``ConvolutionModule`` and
torchaudio's Conformer (the paper's ablation picks 32, which cannot be centred); convolutions carry
biases as in ESPnet. Attention and feed-forward modules are left out: this isolates the Conv1d part.

``dropout`` defaults to 0 so that the zoo's forward is deterministic (ESPnet trains with 0.1).

Input (batch, 256, frames) channels-first features, output the same shape; any frames >= 1.
BatchNorm makes the stack length-local in eval mode only.
"""
from __future__ import annotations

import torch
from torch import nn

from convmem.zoo._workload import Workload, mean_square, normal

__all__ = ["ConformerConvModule", "ConformerConvStack", "WORKLOAD"]


class ConformerConvModule(nn.Module):
    """Residual convolution module; x: (batch, channels, frames), shape preserved."""

    def __init__(self, channels: int, kernel_size: int = 31, dropout: float = 0.0) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for symmetric padding, got {kernel_size}")
        self.layer_norm = nn.LayerNorm(channels)
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.glu = nn.GLU(dim=1)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels
        )
        self.batch_norm = nn.BatchNorm1d(channels)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        y = self.glu(self.pointwise_conv1(y))
        y = self.activation(self.batch_norm(self.depthwise_conv(y)))
        return x + self.dropout(self.pointwise_conv2(y))


class ConformerConvStack(nn.Module):
    """x: (batch, channels, frames) -> same shape, through ``num_layers`` modules in sequence.

    Example::

        >>> ConformerConvStack()(torch.randn(2, 256, 50)).shape
        torch.Size([2, 256, 50])
    """

    def __init__(
        self, channels: int = 256, num_layers: int = 16, kernel_size: int = 31, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(ConformerConvModule(channels, kernel_size, dropout) for _ in range(num_layers))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


WORKLOAD = Workload(
    name="conformer_conv",
    model_cls=ConformerConvStack,
    default_shape=(8, 256, 4096),
    small_shape=(2, 256, 128),
    make_input=normal,
    loss_fn=mean_square,
    blocks="layers",
    description="16 Conformer convolution modules (d=256, depthwise k=31, BatchNorm, SiLU)",
    channels_kwarg="channels",
)
