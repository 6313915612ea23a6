"""A dilated Conv1d computed as an undilated conv2d over its phases: `Conv1dByPhases`, for speed.

# NOTE [Dilated convs by phases]
# A Conv1d of dilation d and stride 1 reads, for output t, the inputs t - p + j * d (j < kernel).
# With the length L a multiple of d and the padding p too, write t = m * d + r: the input viewed
# (batch, channels, L / d, d) -- no copy -- puts position m * d + r at row m, column r, and the
# taps become rows m - p/d + j of column r. So the convolution is a conv2d with kernel (k, 1),
# padding (p / d, 0) and no dilation over that view: the same sums of the same products, with the
# Conv1d's own parameters (each column r is one "phase" of the sequence; TensorFlow's atrous
# convolution does the same with space_to_batch, which copies). A length that d does not divide is
# padded on the right with zeros up to a multiple of d and the extra outputs cut off: those zeros
# stand where the convolution's own zero padding stood, so every kept output reads what it read.
#
# Why: cuDNN runs dilated convolutions on slower kernels. On an H200 (torch 2.11, cuDNN of CUDA 13;
# benchmarks/dilation_probe.py, forward and backward of one convolution, TF32 as PyTorch's
# default) tcn's 256-channel k=3 convolution over 4 x 65,536 took 4.08 ms at dilations 16 to 128
# and 2.61 ms at 1 to 8; by phases 2.71-2.75 ms at every dilation. WaveNet's k=2, 128 -> 256
# channels over 8 x 16,384: 2.50 ms at 16 to 512 against 0.85-1.03 ms by phases. Whole steps, every
# dilated Conv1d by phases: tcn 77.9 -> 68.0 ms eagerly and 71.6 -> 57.5 compiled, wavenet 71.0 ->
# 51.5 eagerly and 56.0 -> 40.0 compiled (37.0 with dilations from 16 only), the same peaks (tcn
# 0.25 GiB less compiled). Where it pays is the card's and cuDNN's (below dilation 16 it did not,
# on tcn's shape), so `optimize_` swaps a convolution only where its own forward and backward
# measured faster so on the GPU it plans for (NOTE [Convs by phases in plans] in plan/costs.py).
#
# Analyses that follow the time axis through aten ops (NOTE [The trace is not part of the step] in
# analysis/trace.py) cannot follow a view that splits it: while one runs, the wrapper calls its
# Conv1d as it is, which computes the same function.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.depthwise import resolve_padding
from ._wrapper import Conv1dComputedAnotherWay, swappable

__all__ = ["Conv1dByPhases", "conv_by_phases", "conv_by_phases_reason", "convs_by_phases"]


def _paddings(conv: nn.Conv1d) -> Tuple[int, int]:
    """Zeros the convolution adds (left, right), as PyTorch pads it."""
    return resolve_padding(conv.padding, conv.kernel_size[0], conv.dilation[0], conv.stride[0])


def conv_by_phases_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be a `Conv1dByPhases`, or None when it can."""
    if type(module) is not nn.Conv1d:
        return f"not an nn.Conv1d ({type(module).__name__})"
    dilation = module.dilation[0]
    if dilation == 1:
        return "not dilated"
    if module.stride[0] != 1:
        return f"stride {module.stride[0]}: the phases of a strided convolution are not its columns"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: the phases are padded with zeros only"
    left, right = _paddings(module)
    if left != right or left % dilation:
        return f"padding ({left}, {right}) is not the same multiple of the dilation {dilation} on both sides"
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which the conv2d would bypass"
    return None


def conv_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                   padding: int, groups: int = 1) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, 1, padding, dilation, groups)`` as an undilated conv2d over the
    phases of `x` (NOTE [Dilated convs by phases]); `padding` a multiple of `dilation`.

    x: (batch, in_channels, length) -> (batch, out_channels, length + 2 * padding - dilation * (k - 1)).
    """
    if padding % dilation:
        raise ValueError(f"conv_by_phases: padding {padding} is not a multiple of the dilation {dilation}")
    batch, channels, length = x.shape
    out_length = length + 2 * padding - dilation * (weight.shape[-1] - 1)
    extra = -length % dilation
    if extra:
        x = F.pad(x, (0, extra))
    out = F.conv2d(x.view(batch, channels, (length + extra) // dilation, dilation), weight.unsqueeze(-1), bias,
                   1, (padding // dilation, 0), 1, groups)
    out = out.reshape(batch, out.shape[1], -1)
    return out[..., :out_length] if extra else out


class Conv1dByPhases(Conv1dComputedAnotherWay):
    """A dilated ``nn.Conv1d`` computed as an undilated conv2d over its phases (NOTE [Dilated convs
    by phases]); same outputs and gradients, parameters and state_dict keys.

    x: (batch, in_channels, length) or (in_channels, length), any length.

    Example::

        >>> conv = Conv1dByPhases(nn.Conv1d(16, 32, 3, padding=8, dilation=8))
        >>> conv(torch.randn(2, 16, 100)).shape
        torch.Size([2, 32, 100])
    """

    reason_of = staticmethod(conv_by_phases_reason)
    cannot = "compute this convolution by phases"

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.wrapped
        return conv_by_phases(x, conv.weight, conv.bias, conv.dilation[0], _paddings(conv)[0], conv.groups)

    def extra_repr(self) -> str:
        return "by phases"


def convs_by_phases(model: nn.Module) -> Dict[str, Conv1dByPhases]:
    """A `Conv1dByPhases` for every dilated Conv1d of `model` that can be one and is not one already,
    by name; nothing is swapped (`optimize_` measures which pay: NOTE [Convs by phases in plans])."""
    return swappable(model, Conv1dByPhases)
