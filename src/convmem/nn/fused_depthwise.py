"""`FusedDepthwiseConv1d`: a depthwise ``nn.Conv1d`` (and the activation after it) run by the fused
Triton kernel `convmem.kernels.depthwise_conv1d`, with the same parameters and the same numbers.

It wraps the ``nn.Conv1d`` (NOTE [Wrappers keep the state_dict]): parameters, ``state_dict()``
keys and values are the conv's, and ``convmem.restore_`` puts the conv back. An activation that
the kernel computes is replaced by a `FusedActivation` placeholder, which passes its input through
and gives the activation back on ``restore_``. What changes is what a training step keeps: the
conv's input and weights only (NOTE [What the fused depthwise conv keeps]).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..analysis import trace as _trace
from ..kernels.depthwise import ACTIVATIONS, depthwise_conv1d, depthwise_conv1d_ref
from ._wrapper import ModuleWrapper

__all__ = ["FusedDepthwiseConv1d", "FusedActivation", "fusable_reason", "activation_name"]

_ACTIVATION_TYPES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu"}


def activation_name(module: nn.Module) -> Optional[str]:
    """The kernel's name for `module` ("relu", "gelu", "silu") or None when the kernel cannot compute it.

    Only these exact classes count (a subclass may change forward); GELU only with approximate='none'.
    """
    name = _ACTIVATION_TYPES.get(type(module))
    if name == "gelu" and getattr(module, "approximate", "none") != "none":
        return None
    return name


def fusable_reason(conv: nn.Module, max_depth_multiplier: Optional[int] = None) -> Optional[str]:
    """Why `conv` cannot be run by the fused depthwise kernel, or None when it can."""
    if not isinstance(conv, nn.Conv1d):
        return f"not an nn.Conv1d ({type(conv).__name__})"
    if type(conv).forward is not nn.Conv1d.forward:
        return f"{type(conv).__name__} overrides Conv1d.forward; the fused kernel would drop what that forward does"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "a lazy Conv1d that has not run yet: its weight does not exist"
    if conv.groups != conv.in_channels:
        return f"not depthwise: groups={conv.groups} but in_channels={conv.in_channels}"
    multiplier = conv.out_channels // conv.in_channels
    if max_depth_multiplier is not None and multiplier > max_depth_multiplier:
        return (f"depth multiplier {multiplier} (out_channels {conv.out_channels} / in_channels {conv.in_channels}) "
                f"is above max_depth_multiplier={max_depth_multiplier}")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the kernel pads with zeros only"
    if conv._forward_hooks or conv._forward_pre_hooks:
        return "it has forward hooks, which the fused kernel would bypass"
    if not conv.weight.is_floating_point() or conv.weight.dtype not in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64
    ):
        return f"weight dtype {conv.weight.dtype} is not one the kernel takes"
    return None


def _check_activation(activation: Optional[str]) -> Optional[str]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _read_through(name: str) -> property:
    """A read-only attribute of the wrapped conv, under the same name."""
    return property(lambda self: getattr(self.wrapped, name), doc=f"The wrapped conv's ``{name}``.")


class FusedDepthwiseConv1d(ModuleWrapper):
    """Depthwise Conv1d + bias + activation in one kernel; keeps only its input and weights for backward.

    ``x: (batch, in_channels, length) -> (batch, in_channels * depth_multiplier, length_out)``,
    exactly ``act(nn.Conv1d(in_channels, in_channels * depth_multiplier, kernel_size, stride,
    padding, dilation, groups=in_channels, bias=bias)(x))`` (float64 agrees to rounding; lower
    precisions accumulate in float32). The conv is ``self.wrapped``; its attributes (``weight``,
    ``bias``, ``kernel_size``, ...) read through. ``activation``: None, "relu", "gelu" or "silu".

    On a GPU with Triton it runs the Triton kernels; elsewhere the plain-PyTorch reference, with
    a one-time warning (NOTE [Interpreter and fallback]).

    Example::

        >>> conv = FusedDepthwiseConv1d(256, 31, padding=15, activation="silu").cuda()
        >>> conv(torch.randn(8, 256, 16000, device="cuda")).shape
        torch.Size([8, 256, 16000])
        >>> fused = FusedDepthwiseConv1d.from_conv1d(model.depthwise_conv)   # same parameters
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: Union[int, str] = 0,
        dilation: int = 1,
        bias: bool = True,
        depth_multiplier: int = 1,
        activation: Optional[str] = None,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        activation = _check_activation(activation)
        conv = nn.Conv1d(in_channels, in_channels * depth_multiplier, kernel_size, stride, padding, dilation,
                         groups=in_channels, bias=bias, device=device, dtype=dtype)
        super().__init__(conv)
        self.activation = activation

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, activation: Optional[str] = None) -> "FusedDepthwiseConv1d":
        """Wrap a depthwise ``nn.Conv1d`` (groups == in_channels, zero padding); shares its parameters.

        `activation` is the one that follows the conv, to compute inside the kernel (the caller
        removes it from the model). Raises ValueError naming the reason for a conv the kernel
        cannot run (see `fusable_reason`).
        """
        reason = fusable_reason(conv)
        if reason is not None:
            raise ValueError(f"FusedDepthwiseConv1d.from_conv1d: cannot fuse this conv: {reason}")
        activation = _check_activation(activation)
        module = cls.__new__(cls)
        ModuleWrapper.__init__(module, conv)
        module.activation = activation
        return module

    # The conv's arguments, read through, as nn.Conv1d has them.
    weight = _read_through("weight")
    bias = _read_through("bias")
    in_channels = _read_through("in_channels")
    out_channels = _read_through("out_channels")
    kernel_size = _read_through("kernel_size")
    stride = _read_through("stride")
    padding = _read_through("padding")
    dilation = _read_through("dilation")
    groups = _read_through("groups")
    padding_mode = _read_through("padding_mode")

    @property
    def depth_multiplier(self) -> int:
        return self.wrapped.out_channels // self.wrapped.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.wrapped
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        padding = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
        # a length trace (NOTE [The trace is not part of the step]) follows aten ops: the same
        # function, plainly
        run = depthwise_conv1d_ref if _trace.is_active() else depthwise_conv1d
        y = run(x, conv.weight, conv.bias, conv.stride[0], padding, conv.dilation[0], self.activation)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class FusedActivation(ModuleWrapper):
    """Stands where an activation was that the preceding `FusedDepthwiseConv1d` now computes.

    Returns its input unchanged; ``convmem.restore_`` puts the activation (``self.wrapped``) back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return "computed by the preceding FusedDepthwiseConv1d"
