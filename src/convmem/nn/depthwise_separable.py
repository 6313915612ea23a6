"""A depthwise-separable Conv1d, built fresh or converted from a trained dense Conv1d (lossy, opt-in).

# NOTE [Per-channel SVD]
# A dense Conv1d with groups=1 computes ``y[o] = sum_c W[o, c, :] * x[c]`` (``*`` the 1-D
# correlation with the conv's stride, padding and dilation). For one input channel c the slice
# ``W[:, c, :]`` is an (out, k) matrix ``M_c``; its SVD ``M_c = sum_j s_j u_j v_j^T`` turns the sum
# into ``y[o] = sum_c sum_j u_j[o] sqrt(s_j) * (sqrt(s_j) v_j * x[c])``: r depthwise filters
# ``sqrt(s_j) v_j`` per input channel (a conv with groups=in_channels and in_channels*r outputs),
# then a 1x1 conv with weights ``u_j[o] sqrt(s_j)``. Padding and padding modes act on each input
# channel alone, so they move into the depthwise conv unchanged; the bias goes on the pointwise.
#
# * Exact when r >= min(out, k): the SVD has at most that many terms. Larger ranks are clamped to
#   it (more filters would be zero).
# * Below that, keeping the r largest terms is the best rank-r approximation of every ``M_c`` in
#   the Frobenius norm (Eckart-Young), hence of W as a whole, and the squared weight error is the
#   sum of the dropped ``s_j**2``: it can only fall as r grows. The output error follows the weight
#   error for white inputs; for others it is weighted by the input's spectrum.
# * ``sqrt(s_j)`` goes to both factors so that neither conv gets all the scale: both start with
#   weights of comparable size, which keeps fine-tuning with one learning rate well conditioned.
# * The SVD runs in float64 whatever the conv's dtype; the result is cast back.
# * Only groups=1 convs factor this way. A grouped conv couples each input channel to only
#   out/groups outputs, so its pointwise half would have to be grouped too, which this module does
#   not have; a depthwise conv (groups == in_channels) is already separable.
#
# NOTE [Depthwise-separable kept memory]
# Parameters and FLOPs per output position fall from ``out*in*k`` to ``in*r*(k + out)``, a cut for
# r < k*out/(k + out). Activation memory does not fall: the pointwise conv saves its input, the
# depthwise output of in*r channels, for its weight gradient, so a training step keeps that tensor
# on top of what the dense conv kept (its input). Checkpointing the converted module (exact) keeps
# only its input again, for the price of recomputing it in backward.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules.utils import _single

from .._checks import positive_int
from .fused_depthwise import FusedDepthwiseConv1d

__all__ = ["DepthwiseSeparableConv1d"]

_Padding = Union[int, str]


class DepthwiseSeparableConv1d(nn.Module):
    """Depthwise Conv1d (groups=in_channels, ``depth_multiplier`` filters per channel), then a 1x1 Conv1d.

    Takes the arguments of ``nn.Conv1d`` (groups is always 1: see NOTE [Per-channel SVD]) and
    returns the same shape: ``x: (batch, in_channels, length) -> (batch, out_channels, length_out)``
    with ``length_out`` as for ``nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding,
    dilation)``. Stride, padding, dilation and padding mode belong to the depthwise conv; the bias
    to the pointwise one. Submodules: ``depthwise`` (``in_channels * depth_multiplier`` outputs) and
    ``pointwise``.

    Use `from_conv1d` to convert a trained ``nn.Conv1d``; the reference for either way of building
    it is ``F.conv1d`` with `dense_weight`, the dense weight the module computes.

    ``fused=True`` makes ``depthwise`` a `FusedDepthwiseConv1d` (the Triton kernel, keeping only its
    input for backward) around the same ``nn.Conv1d``: same parameters, same ``state_dict`` keys,
    same numbers up to rounding. It needs ``padding_mode="zeros"``.

    Example::

        >>> conv = nn.Conv1d(64, 128, 15, padding=7)
        >>> ds = DepthwiseSeparableConv1d.from_conv1d(conv, rank=2)  # 18,432 parameters instead of 123,008
        >>> ds(torch.randn(8, 64, 1000)).shape
        torch.Size([8, 128, 1000])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: _Padding = 0,
        dilation: int = 1,
        bias: bool = True,
        depth_multiplier: int = 1,
        padding_mode: str = "zeros",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if fused and padding_mode != "zeros":
            raise ValueError(f"fused=True needs padding_mode='zeros' (the fused kernel pads with zeros), got {padding_mode!r}")
        depth_multiplier = positive_int(depth_multiplier, "depth_multiplier")
        in_channels = positive_int(in_channels, "in_channels")
        if padding == "same" and any(s != 1 for s in _single(stride)):
            raise ValueError(
                f"padding='same' needs stride 1, got stride={stride}: a strided conv's output is "
                "shorter than its input, so no padding makes them the same length, and PyTorch's own "
                "nn.Conv1d rejects this combination ('padding='same' is not supported for strided "
                "convolutions'). Pass an integer padding instead, e.g. padding=dilation*(kernel_size-1)//2."
            )
        self.depthwise = nn.Conv1d(
            in_channels, in_channels * depth_multiplier, kernel_size, stride, padding, dilation,
            groups=in_channels, bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        if fused:
            # Same parameters and state_dict keys ("depthwise.weight"): the wrapper keeps them.
            self.depthwise = FusedDepthwiseConv1d.from_conv1d(self.depthwise)
        self.pointwise = nn.Conv1d(
            in_channels * depth_multiplier, out_channels, 1, bias=bias, device=device, dtype=dtype
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth_multiplier = depth_multiplier

    # The conv arguments live on the depthwise conv; these mirror nn.Conv1d's attributes.
    @property
    def kernel_size(self) -> tuple:
        return self.depthwise.kernel_size

    @property
    def stride(self) -> tuple:
        return self.depthwise.stride

    @property
    def padding(self) -> Union[tuple, str]:
        return self.depthwise.padding

    @property
    def dilation(self) -> tuple:
        return self.depthwise.dilation

    @property
    def padding_mode(self) -> str:
        return self.depthwise.padding_mode

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.pointwise.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    def dense_weight(self) -> torch.Tensor:
        """The (out_channels, in_channels, kernel_size) weight of the dense Conv1d this module computes.

        ``F.conv1d(x, ds.dense_weight(), ds.bias, ...)`` with the same stride, padding and dilation
        (through ``F.pad`` for non-zero padding modes) gives ``ds(x)``.
        """
        r = self.depth_multiplier
        depthwise = self.depthwise.weight.reshape(self.in_channels, r, -1)  # (in, r, k)
        pointwise = self.pointwise.weight.reshape(self.out_channels, self.in_channels, r)  # (out, in, r)
        return torch.einsum("ocj,cjt->oct", pointwise, depthwise)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, rank: Optional[int] = None, fused: bool = False) -> "DepthwiseSeparableConv1d":
        """Convert a trained ``nn.Conv1d`` (groups=1) by a rank-`rank` SVD of each input channel's filters.

        See NOTE [Per-channel SVD]. ``rank=None`` or ``rank >= min(out_channels, kernel_size)`` is
        exact (up to rounding); smaller ranks give the best least-squares approximation of the
        weight, and the module's ``depth_multiplier`` is the rank used. ``fused=True`` runs the
        depthwise half by the fused Triton kernel (`FusedDepthwiseConv1d`; zero padding only). The result has the conv's
        device, dtype, ``requires_grad`` and train/eval mode; the conv is not modified.

        Warning: below full rank the outputs change; measure the error (``convmem.to_depthwise_separable_``
        reports it) and fine-tune.

        Example::

            >>> conv = nn.Conv1d(16, 32, 7, padding=3).double()
            >>> exact = DepthwiseSeparableConv1d.from_conv1d(conv)  # depth_multiplier 7
            >>> x = torch.randn(2, 16, 50, dtype=torch.float64)
            >>> torch.allclose(exact(x), conv(x))
            True
        """
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"from_conv1d converts an nn.Conv1d, got {type(conv).__name__}")
        if isinstance(conv.weight, nn.parameter.UninitializedParameter):
            raise ValueError("the conv's weight is not initialized yet (a lazy module): run it once first")
        if conv.groups != 1:
            kind = "a depthwise conv, already separable" if conv.groups == conv.in_channels else "grouped"
            raise ValueError(
                f"only groups=1 convs can be converted; this one has groups={conv.groups} ({kind}): each "
                f"input channel reaches only out_channels/groups = {conv.out_channels // conv.groups} "
                "outputs, which a dense pointwise conv would not respect (NOTE [Per-channel SVD])"
            )
        out_channels, in_channels, kernel_size = conv.weight.shape
        full_rank = min(out_channels, kernel_size)
        r = full_rank if rank is None else min(positive_int(rank, "rank"), full_rank)

        weight = conv.weight.detach()
        with torch.no_grad():
            per_channel = weight.to(torch.float64).permute(1, 0, 2)  # (in, out, k)
            u, s, vh = torch.linalg.svd(per_channel, full_matrices=False)  # (in, out, q), (in, q), (in, q, k)
            root = s[:, :r].sqrt()
            depthwise = root[:, :, None] * vh[:, :r, :]  # (in, r, k)
            pointwise = u[:, :, :r] * root[:, None, :]  # (in, out, r)

            module = cls(
                in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                bias=conv.bias is not None, depth_multiplier=r, padding_mode=conv.padding_mode,
                device=weight.device, dtype=weight.dtype, fused=fused,
            )
            module.depthwise.weight.copy_(depthwise.reshape(in_channels * r, 1, kernel_size))
            module.pointwise.weight.copy_(pointwise.permute(1, 0, 2).reshape(out_channels, in_channels * r, 1))
            if conv.bias is not None:
                module.pointwise.bias.copy_(conv.bias.detach())
        module.depthwise.weight.requires_grad_(conv.weight.requires_grad)
        module.pointwise.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            module.pointwise.bias.requires_grad_(conv.bias.requires_grad)
        return module.train(conv.training)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,):
            text += f", padding={self.padding}"
        if self.dilation != (1,):
            text += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text + f", depth_multiplier={self.depth_multiplier}, bias={self.bias is not None}"
