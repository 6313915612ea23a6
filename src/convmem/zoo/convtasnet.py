"""Conv-TasNet (Luo & Mesgarani 2019, "Conv-TasNet: Surpassing Ideal Time-Frequency Magnitude
Masking for Speech Separation"): the `convtasnet` workload.

The paper's best non-causal configuration (Table II: N=512, L=16, B=128, Sc=128, H=512, P=3, X=8,
R=3, gLN), structured as the authors' reference implementation (github.com/naplab/Conv-TasNet,
``conv_tasnet.TasNet`` / ``utility.models.TCN``):

* encoder Conv1d(1, 512, 16, stride 8, no bias);
* separator: global layer norm (GroupNorm(1, 512)) and a 1x1 bottleneck to 128 channels, then
  3 repeats x 8 blocks of [1x1 to 512, PReLU, gLN, depthwise k=3 dilation 2**i, PReLU, gLN,
  1x1 residual and 1x1 skip to 128]; the sum of skips goes through PReLU and a 1x1 to 2 x 512
  channels, a sigmoid mask per source;
* decoder ConvTranspose1d(512, 1, 16, stride 8, no bias) on each masked source.

The input is zero-padded as in the reference (stride zeros on both sides, plus enough on the right
for whole frames) and the output cropped back, so any length >= 1 gives sources of that length.

The last block has no residual 1x1: its output would feed nothing. The reference keeps it (65,664
parameters without a gradient, which DDP rejects unless ``find_unused_parameters=True``); with it the
count is 5,050,545, the paper's 5.1M.

Every gLN normalizes over channels *and* time: the model is not length-local.

Input (batch, 1, samples) 8 kHz mixture, output (batch, 2, samples) separated sources.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from convmem.zoo._workload import Workload, mean_square, normal

__all__ = ["ConvTasNet", "TemporalConvNet", "TemporalConvBlock", "WORKLOAD"]


def _global_layer_norm(channels: int) -> nn.GroupNorm:
    # gLN: one group, i.e. mean and variance over (channels, time); eps as in the reference.
    return nn.GroupNorm(1, channels, eps=1e-8)


class TemporalConvBlock(nn.Module):
    """1x1 -> PReLU -> gLN -> depthwise dilated -> PReLU -> gLN, then residual and skip 1x1s.

    x: (batch, bottleneck, frames) -> (x + residual, skip), both (batch, bottleneck, frames).
    """

    def __init__(
        self,
        bottleneck: int,
        hidden: int,
        kernel_size: int,
        dilation: int,
        skip_channels: int,
        has_residual: bool = True,
    ) -> None:
        super().__init__()
        self.pointwise = nn.Conv1d(bottleneck, hidden, 1)
        self.activation1 = nn.PReLU()
        self.norm1 = _global_layer_norm(hidden)
        self.depthwise = nn.Conv1d(
            hidden,
            hidden,
            kernel_size,
            dilation=dilation,
            padding=dilation * (kernel_size - 1) // 2,
            groups=hidden,
        )
        self.activation2 = nn.PReLU()
        self.norm2 = _global_layer_norm(hidden)
        self.residual: Optional[nn.Conv1d] = nn.Conv1d(hidden, bottleneck, 1) if has_residual else None
        self.skip = nn.Conv1d(hidden, skip_channels, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.norm1(self.activation1(self.pointwise(x)))
        y = self.norm2(self.activation2(self.depthwise(y)))
        if self.residual is None:
            return x, self.skip(y)
        return x + self.residual(y), self.skip(y)


class TemporalConvNet(nn.Module):
    """Separator: encoder features (batch, N, frames) -> mask logits (batch, N * sources, frames)."""

    def __init__(
        self,
        channels: int,
        bottleneck: int,
        hidden: int,
        skip_channels: int,
        kernel_size: int,
        blocks_per_repeat: int,
        repeats: int,
        num_sources: int,
    ) -> None:
        super().__init__()
        self.norm = _global_layer_norm(channels)
        self.bottleneck = nn.Conv1d(channels, bottleneck, 1)
        num_blocks = blocks_per_repeat * repeats
        self.blocks = nn.ModuleList(
            TemporalConvBlock(
                bottleneck,
                hidden,
                kernel_size,
                dilation=2 ** (i % blocks_per_repeat),
                skip_channels=skip_channels,
                has_residual=i < num_blocks - 1,
            )
            for i in range(num_blocks)
        )
        self.output = nn.Sequential(nn.PReLU(), nn.Conv1d(skip_channels, channels * num_sources, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck(self.norm(x))
        skips = 0
        for block in self.blocks:
            x, skip = block(x)
            skips = skips + skip
        return self.output(skips)


class ConvTasNet(nn.Module):
    """mixture: (batch, 1, samples) -> sources (batch, num_sources, samples).

    Example::

        >>> ConvTasNet()(torch.randn(2, 1, 1000)).shape
        torch.Size([2, 2, 1000])
    """

    def __init__(
        self,
        num_sources: int = 2,
        channels: int = 512,
        window: int = 16,
        bottleneck: int = 128,
        hidden: int = 512,
        skip_channels: int = 128,
        kernel_size: int = 3,
        blocks_per_repeat: int = 8,
        repeats: int = 3,
    ) -> None:
        super().__init__()
        if window % 2:
            raise ValueError(f"window must be even (50% overlap), got {window}")
        self.num_sources = num_sources
        self.window = window
        self.stride = window // 2
        self.encoder = nn.Conv1d(1, channels, window, stride=self.stride, bias=False)
        self.separator = TemporalConvNet(
            channels, bottleneck, hidden, skip_channels, kernel_size, blocks_per_repeat, repeats, num_sources
        )
        self.decoder = nn.ConvTranspose1d(channels, 1, window, stride=self.stride, bias=False)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        batch, _, samples = mixture.shape
        # Pad as the reference does: whole frames on the right, and a half window of zeros on both
        # sides so that every kept sample is covered by two overlapping frames.
        rest = self.window - (self.stride + samples % self.window) % self.window
        features = self.encoder(F.pad(mixture, (self.stride, rest + self.stride)))
        masks = torch.sigmoid(self.separator(features))
        masked = features.unsqueeze(1) * masks.view(batch, self.num_sources, features.shape[1], -1)
        sources = self.decoder(masked.flatten(0, 1))
        return sources[..., self.stride : self.stride + samples].reshape(batch, self.num_sources, samples)


WORKLOAD = Workload(
    name="convtasnet",
    model_cls=ConvTasNet,
    default_shape=(4, 1, 32000),
    small_shape=(2, 1, 800),
    make_input=normal,
    loss_fn=mean_square,
    blocks="separator.blocks",
    description="Conv-TasNet (N=512, L=16, B=128, H=512, X=8, R=3, gLN): 2-source masking separation",
    sample_rate=8000,
)
