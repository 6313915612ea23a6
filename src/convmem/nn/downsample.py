"""A Conv1d that runs on its input shortened by an integer factor (lossy, opt-in).

# NOTE [Downsampling modes]
# Every mode turns a length L into ceil(L / factor): no trailing samples are dropped, so a
# sequence shorter than the factor still gives one sample.
#
# * "avg": mean of each block of `factor` samples (the last block may be shorter). A crude
#   low-pass: its frequency response is a sinc with sidelobes at -13 dB, so some aliasing.
# * "max": maximum of each block. Not linear; keeps peaks (onsets, spikes), aliases freely. Its
#   backward keeps int64 argmax indices, 8 bytes per output sample.
# * "strided": every `factor`-th sample. Free, keeps nothing for backward, and aliases everything
#   above the new Nyquist frequency onto the band below it.
# * "lowpass": anti-aliased decimation: a Hann-windowed sinc FIR low-pass with its cutoff at the
#   new Nyquist frequency (half-width 8 * factor taps, DC gain exactly 1), evaluated only at the
#   kept samples (a strided conv, so it costs 16 * factor + 1 multiply-adds per kept sample and
#   channel). Edges are padded by replication, so a constant signal stays exactly constant.
#   Stopband from about 1.25x the new Nyquist frequency, below -40 dB.
#
# The conv itself is unchanged: its kernel now spans `factor` times more of the original signal,
# which is why downsampling needs retraining unless the signal has nothing above the new Nyquist
# frequency (an oversampled input).
#
# NOTE [Restoring the output length]
# With ``restore_length=True`` the conv's output is linearly interpolated back to the length the
# original conv would have produced, so the rest of the model sees the same shapes and the change
# stays local. Only that conv saves less (its input is `factor` times shorter) and computes less;
# everything after it runs at full length again. Without it, every layer downstream runs (and
# keeps its activations) at the shorter length, which is where the memory goes down by up to the
# factor -- and where the model's output length changes too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int

__all__ = ["DownsampleConv1d", "MODES", "downsample", "lowpass_filter"]

MODES = ("avg", "max", "strided", "lowpass")


def lowpass_filter(factor: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (16 * factor + 1,) Hann-windowed sinc low-pass of mode "lowpass".

    Cutoff at 1 / (2 * factor) cycles per sample, the Nyquist frequency after decimation.

    Taps sum to 1 (unit DC gain). See NOTE [Downsampling modes].
    """
    half = 8 * factor
    n = torch.arange(-half, half + 1, dtype=torch.float64)
    window = 0.5 * (1 + torch.cos(math.pi * n / (half + 1)))
    taps = torch.sinc(n / factor) * window
    return (taps / taps.sum()).to(dtype)


def downsample(x: torch.Tensor, factor: int, mode: str = "avg") -> torch.Tensor:
    """Shorten ``x: (batch, channels, length)`` to ``(batch, channels, ceil(length / factor))``.

    Each channel on its own; modes in NOTE [Downsampling modes].

    Example::

        >>> downsample(torch.arange(7.0).view(1, 1, 7), 3, "avg")
        tensor([[[1., 4., 6.]]])
    """
    factor = positive_int(factor, "factor")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if x.dim() != 3:
        raise ValueError(f"expected x of shape (batch, channels, length), got {tuple(x.shape)}")
    if factor == 1:
        return x
    if mode == "avg":
        return F.avg_pool1d(x, factor, factor, ceil_mode=True)
    if mode == "max":
        return F.max_pool1d(x, factor, factor, ceil_mode=True)
    if mode == "strided":
        return x[..., ::factor]
    batch, channels, length = x.shape
    taps = lowpass_filter(factor, x.dtype).to(x.device)
    half = taps.numel() // 2
    flat = F.pad(x.reshape(batch * channels, 1, length), (half, half), mode="replicate")
    return F.conv1d(flat, taps.view(1, 1, -1), stride=factor).reshape(batch, channels, -1)


def _conv1d_output_length(conv: nn.Conv1d, length: int) -> int:
    """The output length of `conv` on an input of `length` samples (nn.Conv1d's formula)."""
    (kernel_size,), (stride,), (dilation,) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        return length
    padding = 0 if conv.padding == "valid" else conv.padding[0]
    return (length + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


class DownsampleConv1d(nn.Module):
    """``conv(downsample(x, factor, mode))``, optionally interpolated back to the conv's original output length.

    ``x: (batch, in_channels, length) -> (batch, out_channels, n)`` where n is the conv's output
    length on ``ceil(length / factor)`` samples, or, with ``restore_length=True``, on ``length``
    samples. `conv` is used as it is (same parameters, no copy); its state_dict keys gain the
    prefix ``conv.``. Modes: NOTE [Downsampling modes]; restore_length: NOTE [Restoring the output
    length].

    Warning: this changes the model's numbers (lossy): the conv's kernel covers `factor` times
    more of the signal than it was trained on.

    Example::

        >>> layer = DownsampleConv1d(nn.Conv1d(1, 64, 9, padding=4), factor=4, mode="lowpass")
        >>> layer(torch.randn(8, 1, 16000)).shape
        torch.Size([8, 64, 4000])
    """

    def __init__(self, conv: nn.Conv1d, factor: int, mode: str = "avg", restore_length: bool = False) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"DownsampleConv1d wraps an nn.Conv1d, got {type(conv).__name__}")
        self.factor = positive_int(factor, "factor")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(restore_length, bool):
            raise TypeError(f"restore_length must be a bool, got {restore_length!r}")
        self.conv = conv
        self.mode = mode
        self.restore_length = restore_length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(downsample(x, self.factor, self.mode))
        if not self.restore_length:
            return y
        return F.interpolate(y, size=_conv1d_output_length(self.conv, x.shape[-1]), mode="linear", align_corners=False)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, mode={self.mode!r}, restore_length={self.restore_length}"
