"""Basenji2 (Kelley 2020, "Cross-species regulatory sequence activity prediction"): the `basenji` workload.

The human model of the paper's ``params_human.json`` (github.com/calico/basenji,
manuscripts/cross2020), rebuilt in PyTorch. Every convolution is a Basenji ``conv_block``:
GELU -> Conv1d (no bias) -> BatchNorm -> [Dropout] -> [MaxPool 2].

* stem: conv_block with 288 filters, width 15, max pool 2;
* conv tower: 6 conv_blocks of width 5 with max pool 2, filters 339, 399, 470, 554, 652, 768
  (``filters_init=339, filters_mult=1.1776``, rounded: geometric growth from the stem's 288 to 768);
* 11 dilated residual blocks: ``x + conv_block_1x1(conv_block_k3_dilated(x))`` with a 384-channel
  bottleneck; the dilation starts at 1 and is multiplied by 1.5 and rounded at every block
  (``rate_mult=1.5, round=true``): 1, 2, 3, 4, 6, 9, 14, 21, 32, 48, 72;
* head: conv_block 1x1 to 1536, GELU, a 1x1 (dense per bin) to the 5313 human tracks, softplus.

Total stride 128 (one output bin per 128 bp). Where this differs from the reference, and why:

* shared/WORKLOADS.md writes the stem as Conv, BatchNorm, GELU, MaxPool; Basenji2 uses the same
  conv_block (GELU first, applied to the one-hot input) for the stem as for the tower, which is
  what is built here.
* ``crop`` defaults to 0: the reference crops 64 bins from each end before the head (1024 -> 896
  bins, to match its training targets). Pass ``crop=64`` for that; it makes 129 bins (16,512 bp) the
  shortest input.
* ``dropout`` (0.3 in the reference) and ``head_dropout`` (0.05) default to 0 so that the zoo's
  forward is deterministic.
* Max pooling floors (Keras' ``padding="same"`` rounds up); the two agree on even lengths.
* Initialization is PyTorch's default; the reference starts the residual BatchNorm scales at zero,
  which would make the gradients of the convolutions in every residual branch exactly zero.

Input (batch, 4, length) one-hot DNA, output (batch, 5313, length // 128 - 2 * crop); length >= 128.
BatchNorm (eps 1e-3 as in Keras) makes the model length-local in eval mode only.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from convmem.zoo._workload import Workload, mean_square, one_hot_dna

__all__ = ["Basenji2", "ConvBlock", "DilatedResidualBlock", "WORKLOAD"]

_BN_EPS = 1e-3  # Keras' default; Keras momentum 0.9 is PyTorch's default momentum 0.1


class ConvBlock(nn.Module):
    """Basenji ``conv_block``: GELU -> Conv1d ('same', no bias) -> BatchNorm -> [Dropout] -> [MaxPool].

    x: (batch, in_channels, length) -> (batch, out_channels, length // pool).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        dilation: int = 1,
        pool: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.activation = nn.GELU()
        self.conv = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            dilation=dilation,
            padding=dilation * (kernel_size // 2),
            bias=False,
        )
        self.batch_norm = nn.BatchNorm1d(out_channels, eps=_BN_EPS)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.pool = nn.MaxPool1d(pool) if pool > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.dropout(self.batch_norm(self.conv(self.activation(x)))))


class DilatedResidualBlock(nn.Module):
    """x + project(dilated(x)): a dilated k=3 conv_block to the bottleneck and a 1x1 conv_block back.

    x: (batch, channels, length), shape preserved.
    """

    def __init__(
        self, channels: int, bottleneck: int, dilation: int, kernel_size: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.dilated = ConvBlock(channels, bottleneck, kernel_size, dilation=dilation)
        self.project = ConvBlock(bottleneck, channels, 1, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dilated(x))


def _dilations(repeat: int, rate_mult: float) -> List[int]:
    # Basenji's dilated_residual with round=True: the rate itself is rounded after each multiply
    # (Python's round, like np.round, rounds halves to even: 4.5 -> 4).
    rates, rate = [], 1.0
    for _ in range(repeat):
        rates.append(int(round(rate)))
        rate = float(round(rate * rate_mult))
    return rates


class Basenji2(nn.Module):
    """dna: (batch, 4, length) one-hot -> tracks (batch, targets, length // 128 - 2 * crop).

    ``trunk`` is the chain of stem, tower and dilated residual blocks.

    Example::

        >>> Basenji2()(torch.zeros(1, 4, 1024)).shape
        torch.Size([1, 5313, 8])
    """

    def __init__(
        self,
        targets: int = 5313,
        stem_channels: int = 288,
        tower_init: int = 339,
        tower_mult: float = 1.1776,
        tower_repeat: int = 6,
        bottleneck: int = 384,
        num_residual: int = 11,
        rate_mult: float = 1.5,
        head_channels: int = 1536,
        crop: int = 0,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks = [ConvBlock(4, stem_channels, 15, pool=2)]
        in_channels = stem_channels
        for i in range(tower_repeat):
            channels = round(tower_init * tower_mult**i)
            blocks.append(ConvBlock(in_channels, channels, 5, pool=2))
            in_channels = channels
        blocks.extend(
            DilatedResidualBlock(in_channels, bottleneck, dilation, dropout=dropout)
            for dilation in _dilations(num_residual, rate_mult)
        )
        self.trunk = nn.Sequential(*blocks)
        self.crop = crop
        self.head = nn.Sequential(
            ConvBlock(in_channels, head_channels, 1, dropout=head_dropout),
            nn.GELU(),
            nn.Conv1d(head_channels, targets, 1),
            nn.Softplus(),
        )

    def forward(self, dna: torch.Tensor) -> torch.Tensor:
        x = self.trunk(dna)
        if self.crop:
            x = x[..., self.crop : x.shape[-1] - self.crop]
        return self.head(x)


WORKLOAD = Workload(
    name="basenji",
    model_cls=Basenji2,
    default_shape=(2, 4, 131072),
    small_shape=(2, 4, 1024),
    make_input=one_hot_dna,
    loss_fn=mean_square,
    blocks="trunk",
    description="Basenji2: one-hot DNA, 7 pooled conv blocks 288->768, 11 dilated residual blocks",
    min_length=128,
)
