"""A Conv1d computed as a conv2d over a height of one: `Conv1dAs2d`, for torch.compile's layouts.

# NOTE [Conv1d as conv2d under torch.compile]
# Inductor's layout optimization runs convolutions channels-last where that pays, and decides it
# for 4-d inputs only: a Conv1d's 3-d input stays channels-first, and cuDNN's Hopper kernels, which
# are channels-last, transpose around every call (on an H200 the three largest transposes took
# 2.3 of Basenji's 16.3 ms of kernels compiled). `Conv1dAs2d` computes the same convolution as ``conv2d`` on
# ``(batch, channels, 1, length)`` with the weight viewed ``(out, in, 1, kernel)``: the same sums of
# the same products, with the Conv1d's own parameters, so a compiled model may lay it out its way.
# Whether that pays is the model's: measured on an H200 (benchmarks/run.py conv_layout, compiled
# in the default mode, every Conv1d swapped) wav2vec 2.0's feature encoder went from 4.948 GiB at
# 22.2 ms to 3.966 GiB at 18.8, and Basenji (18.8 -> 20.1 ms), TCN (72.3 -> 77.7), WaveNet
# (56.1 -> 67.1) and the Conformer conv module (24.5 -> 55.7) became slower. So `optimize_` swaps
# them only for compiled plans, and only where the compiled step measured both ways says so (NOTE
# [Conv layouts in compiled plans] in strategies/optimize.py). Eagerly it does not pay either
# (basenji 1.05x, conformer_conv 1.91x, the other three within 1%).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ._wrapper import CheckedWrapper, swappable

__all__ = ["Conv1dAs2d", "conv_as_2d_reason", "convs_as_2d"]


def conv_as_2d_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be a `Conv1dAs2d`, or None when it can."""
    if type(module) is not nn.Conv1d:
        return f"not an nn.Conv1d ({type(module).__name__})"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: conv2d pads with zeros only"
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which the conv2d would bypass"
    return None


class Conv1dAs2d(CheckedWrapper):
    """An ``nn.Conv1d`` computed as a conv2d over a height of one (NOTE [Conv1d as conv2d under
    torch.compile]); same outputs and gradients, parameters and state_dict keys.

    Example::

        >>> conv = Conv1dAs2d(nn.Conv1d(16, 32, 3, padding=1))
        >>> conv(torch.randn(2, 16, 100)).shape
        torch.Size([2, 32, 100])
    """

    reason_of = staticmethod(conv_as_2d_reason)
    cannot = "compute this convolution as a conv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.wrapped
        padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
        out = nn.functional.conv2d(x.unsqueeze(-2), conv.weight.unsqueeze(-2), conv.bias, (1, conv.stride[0]),
                                   padding, (1, conv.dilation[0]), conv.groups)
        return out.squeeze(-2)

    def extra_repr(self) -> str:
        return "as conv2d"


def convs_as_2d(model: nn.Module) -> Dict[str, Conv1dAs2d]:
    """A `Conv1dAs2d` for every Conv1d of `model` that can be one and is not one already, by name;
    nothing is swapped (`optimize_` swaps them: NOTE [Conv layouts in compiled plans])."""
    return swappable(model, Conv1dAs2d)
