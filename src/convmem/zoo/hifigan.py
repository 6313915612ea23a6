"""HiFi-GAN V1 generator (Kong et al. 2020, "HiFi-GAN: Generative Adversarial Networks for Efficient
and High Fidelity Speech Synthesis"): the `hifigan` workload.

The V1 configuration of the authors' implementation (github.com/jik876/hifi-gan, ``config_v1.json``,
``models.Generator`` with ``ResBlock1``): Conv1d(80, 512, 7), then four upsampling stages with rates
(8, 8, 2, 2), transposed-conv kernels (16, 16, 4, 4) and channels 512 -> 256 -> 128 -> 64 -> 32, each
followed by a multi-receptive-field fusion (MRF): the mean of three ResBlock1 with kernels (3, 7, 11)
and dilations (1, 3, 5); finally Conv1d(32, 1, 7) and tanh. Paddings are the reference's:
``(k - u) // 2`` for the transposed convs (output exactly u times longer) and
``get_padding(k, d) = (k * d - d) // 2`` for the dilated ones (length-preserving).

Plain convolutions: the reference wraps every conv in weight norm during training and removes it
for inference; without it the generator has 13,926,017 parameters (the paper's 13.92M). Like the
reference, the activation before the last conv is ``F.leaky_relu`` with its default slope 0.01,
not the 0.1 used everywhere else.

Input (batch, 80, frames) log-mel, output (batch, 1, 256 * frames) waveform at 22.05 kHz; any
frames >= 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convmem.zoo._workload import Workload, log_mel, mean_square

__all__ = ["HiFiGANGenerator", "ResBlock1", "UpsampleStage", "WORKLOAD"]

LRELU_SLOPE = 0.1


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 conv with an odd kernel, as in the reference."""
    return (kernel_size * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """For each dilation d: x = x + conv_1(lrelu(conv_d(lrelu(x)))); x: (batch, channels, length)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=get_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=get_padding(kernel_size)) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            xt = conv1(F.leaky_relu(x, LRELU_SLOPE))
            xt = conv2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class UpsampleStage(nn.Module):
    """LeakyReLU -> ConvTranspose1d (x rate) -> MRF (mean of the resblocks).

    x: (batch, in_channels, length) -> (batch, out_channels, rate * length).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rate: int,
        kernel_size: int,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilations: Sequence[Sequence[int]],
    ) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride=rate, padding=(kernel_size - rate) // 2
        )
        self.resblocks = nn.ModuleList(
            ResBlock1(out_channels, k, d) for k, d in zip(resblock_kernel_sizes, resblock_dilations)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(F.leaky_relu(x, LRELU_SLOPE))
        mrf = self.resblocks[0](x)
        for resblock in self.resblocks[1:]:
            mrf = mrf + resblock(x)
        return mrf / len(self.resblocks)


class HiFiGANGenerator(nn.Module):
    """mel: (batch, mels, frames) -> audio (batch, 1, prod(upsample_rates) * frames).

    Example::

        >>> HiFiGANGenerator()(torch.randn(2, 80, 4)).shape
        torch.Size([2, 1, 1024])
    """

    def __init__(
        self,
        mels: int = 80,
        upsample_initial_channel: int = 512,
        upsample_rates: Sequence[int] = (8, 8, 2, 2),
        upsample_kernel_sizes: Sequence[int] = (16, 16, 4, 4),
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilations: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    ) -> None:
        super().__init__()
        if len(upsample_rates) != len(upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes must have the same length")
        self.conv_pre = nn.Conv1d(mels, upsample_initial_channel, 7, padding=3)
        self.stages = nn.ModuleList(
            UpsampleStage(
                upsample_initial_channel // 2**i,
                upsample_initial_channel // 2 ** (i + 1),
                rate,
                kernel_size,
                resblock_kernel_sizes,
                resblock_dilations,
            )
            for i, (rate, kernel_size) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        )
        self.conv_post = nn.Conv1d(upsample_initial_channel // 2 ** len(upsample_rates), 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for stage in self.stages:
            x = stage(x)
        # The reference's default-slope leaky_relu here (0.01), kept for fidelity.
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


WORKLOAD = Workload(
    name="hifigan",
    model_cls=HiFiGANGenerator,
    default_shape=(16, 80, 32),
    small_shape=(2, 80, 4),
    make_input=log_mel,
    loss_fn=mean_square,
    blocks="stages",
    description="HiFi-GAN V1 generator: 80-band mel to 22.05 kHz audio, x256 upsampling with MRF resblocks",
    channels_kwarg="mels",
    sample_rate=22050,
)
