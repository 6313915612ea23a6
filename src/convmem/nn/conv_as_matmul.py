"""A Conv1d with few input channels computed as one matmul over its unfolded input: `Conv1dAsMatmul`.

# NOTE [Conv1d as a matmul]
# A model's first convolution often reads a handful of channels over the longest length of the
# model (Basenji's stem: 4 channels, k=15, 131,072 positions; a waveform's single channel), a shape
# convolution libraries tile poorly: the reduction per output is in_channels x kernel_size terms,
# far under the tiles their kernels are built for. The same sums of the same products are one
# matmul: the input, padded, is unfolded into its columns ``(batch, in_channels * kernel_size,
# length_out)`` (an ``unfold`` view, then one copy), and ``weight.view(out, in * k)`` applied to
# every column is the output. That product runs as a pointwise convolution over the columns, so it
# runs where the Conv1d would and in its precision (on a GPU cuDNN's, TF32 by default through
# ``torch.backends.cudnn.allow_tf32``; a float32 ``torch.matmul`` would not use TF32 unless
# ``torch.backends.cuda.matmul.allow_tf32`` is set, and on an H200 took Basenji's stem from 2.03 to
# 3.18 ms of GPU time a forward and backward). Autograd gives the weight's gradient from the
# columns and the output's gradient, and the input's through the unfold's backward. Only
# convolutions whose reduction is short, ``in_channels * kernel_size <= 64``, are offered, and
# only where the columns are no larger than the output (``in_channels * kernel_size <=
# out_channels``), so the bytes kept for the backward (the columns, in eager mode) are at most the
# output's. Whether it is faster is the card's and the shape's: `optimize_` times each such conv
# both ways (option "matmul", NOTE [Convs by phases in plans] in plan/costs.py). On an H200 the
# pointwise form took 0.26 ms off Basenji's compiled step (16.02-16.06 ms of GPU kernels against
# 16.28-16.33 with the stem as a Conv1d; docs/BENCHMARKS.md, run 59).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.depthwise import resolve_padding
from ._wrapper import Conv1dComputedAnotherWay, swappable

__all__ = ["Conv1dAsMatmul", "conv1d_as_matmul", "conv_as_matmul_reason", "convs_as_matmul"]

MAX_ROWS = 64  # the longest reduction (in_channels * kernel_size) offered: NOTE [Conv1d as a matmul]


def conv_as_matmul_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be a `Conv1dAsMatmul`, or None when it can."""
    if type(module) is not nn.Conv1d:
        return f"not an nn.Conv1d ({type(module).__name__})"
    if module.groups != 1:
        return f"groups={module.groups}: one matmul computes an ungrouped convolution"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: the columns are padded with zeros only"
    rows = module.in_channels * module.kernel_size[0]
    if rows > MAX_ROWS:
        return (f"its reduction ({module.in_channels} channels x kernel {module.kernel_size[0]} = {rows} terms) "
                f"is over the {MAX_ROWS} the matmul form is for: few input channels")
    if rows > module.out_channels:
        return (f"its columns ({module.in_channels} channels x kernel {module.kernel_size[0]} = {rows} rows) "
                f"would outnumber its {module.out_channels} output channels")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which the matmul would bypass"
    return None


def conv1d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, left: int,
                     right: int, dilation: int) -> torch.Tensor:
    """``F.conv1d`` (groups 1) of `x` zero-padded by (left, right), as one matmul over its columns
    (NOTE [Conv1d as a matmul]).

    x: (batch, in_channels, length) -> (batch, out_channels, length_out), as ``F.conv1d``.
    """
    batch, channels, _ = x.shape
    out_channels, _, kernel_size = weight.shape
    padded = F.pad(x, (left, right)) if left or right else x
    span = dilation * (kernel_size - 1) + 1
    if padded.shape[-1] < span:  # too short to convolve: F.conv1d's own error
        return F.conv1d(padded, weight, bias, stride, 0, dilation)
    columns = padded.unfold(-1, span, stride)  # (batch, channels, length_out, span), a view
    if dilation > 1:
        columns = columns[..., ::dilation]
    # (batch, channels * kernel_size, length_out) in the weight's (channel, tap) order: the one copy
    columns = columns.permute(0, 1, 3, 2).reshape(batch, channels * kernel_size, -1)
    # the matmul as a pointwise convolution: it runs where the convolution would, in its precision
    # (cuDNN's TF32 by default on a GPU, as the Conv1d's own)
    return F.conv1d(columns, weight.reshape(out_channels, channels * kernel_size, 1), bias)


class Conv1dAsMatmul(Conv1dComputedAnotherWay):
    """An ``nn.Conv1d`` with few input channels computed as one matmul over its unfolded input (NOTE
    [Conv1d as a matmul]); same outputs and gradients, parameters and state_dict keys.

    x: (batch, in_channels, length) or (in_channels, length).

    Example::

        >>> conv = Conv1dAsMatmul(nn.Conv1d(4, 64, 15, padding=7))
        >>> conv(torch.randn(2, 4, 1000)).shape
        torch.Size([2, 64, 1000])
    """

    reason_of = staticmethod(conv_as_matmul_reason)
    cannot = "compute this convolution as a matmul"

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.wrapped
        left, right = resolve_padding(conv.padding, conv.kernel_size[0], conv.dilation[0], conv.stride[0])
        return conv1d_as_matmul(x, conv.weight, conv.bias, conv.stride[0], left, right, conv.dilation[0])

    def extra_repr(self) -> str:
        return "as a matmul over its columns"


def convs_as_matmul(model: nn.Module) -> Dict[str, Conv1dAsMatmul]:
    """A `Conv1dAsMatmul` for every Conv1d of `model` that can be one and is not one already, by
    name; nothing is swapped (`optimize_` measures which pay: NOTE [Convs by phases in plans])."""
    return swappable(model, Conv1dAsMatmul)
