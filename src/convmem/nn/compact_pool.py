"""Max-pooling that keeps one byte per output for backward: `CompactMaxPool1d`.

# NOTE [Compact max-pool]
# In a training step ``nn.MaxPool1d`` keeps its input and the int64 index of every output's
# maximum. After a BatchNorm (Basenji's blocks: Conv1d -> BatchNorm -> MaxPool(2)) the input is the
# BatchNorm's output, which nothing else keeps: 4 bytes per input sample, and the indices 8 bytes
# per output -- 8 bytes per input sample in all for a pool of stride 2, twice the output. The
# gradient needs neither: only where in its window each maximum was, which fits an int8 for
# windows of up to 128 positions. `CompactMaxPool1d` runs the same aten max-pool, keeps that
# offset alone (one byte per output), and in backward rebuilds the indices from it and adds each
# output's gradient at its maximum's position, the scatter max-pool's own backward does. Outputs,
# ties and NaN handling are max-pool's own (its indices are the ones turned into offsets), and
# gradients agree exactly, up to the order of additions where windows overlap. The backward is
# built from differentiable ops, so gradients of gradients work as before.
#
# torch.compile's Inductor lowers max-pools the same way (`_low_memory_max_pool2d_with_offsets`):
# in compiled code the swap changes nothing, and plans for compiled models do not use it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ._wrapper import ModuleWrapper

__all__ = ["CompactMaxPool1d", "compact_pool_reason", "compact_pools"]

_MAX_WINDOW = 128  # offsets 0..127 fit an int8


def _single(value) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def compact_pool_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be a `CompactMaxPool1d`, or None when it can."""
    if type(module) is not nn.MaxPool1d:
        return f"not an nn.MaxPool1d ({type(module).__name__})"
    if module.return_indices:
        return "return_indices=True: its caller takes the int64 indices"
    if _single(module.kernel_size) > _MAX_WINDOW:
        return f"a window of {_single(module.kernel_size)} positions; offsets fit an int8 up to {_MAX_WINDOW}"
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which the compact pool would bypass"
    return None


class _MaxPoolOffsets(torch.autograd.Function):
    """max_pool1d whose backward keeps an int8 window offset per output (NOTE [Compact max-pool])."""

    @staticmethod
    def forward(ctx, x, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool):
        out, indices = torch.ops.aten.max_pool1d_with_indices(x, [kernel], [stride], [padding], [dilation], ceil_mode)
        offsets = torch.div(indices - _window_starts(out.shape[-1], stride, padding, x.device), dilation,
                            rounding_mode="floor").to(torch.int8)
        ctx.save_for_backward(offsets)
        ctx.input_shape = x.shape
        ctx.geometry = (stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        indices = offsets.long() * dilation + _window_starts(offsets.shape[-1], stride, padding, offsets.device)
        grad_input = grad.new_zeros(ctx.input_shape).scatter_add(-1, indices, grad)
        return grad_input, None, None, None, None, None


def _window_starts(n_out: int, stride: int, padding: int, device) -> torch.Tensor:
    """Where output j's window begins in the input: ``j * stride - padding``."""
    return torch.arange(n_out, device=device) * stride - padding


class CompactMaxPool1d(ModuleWrapper):
    """An ``nn.MaxPool1d`` whose training step keeps an int8 window offset per output instead of its
    input and int64 indices (NOTE [Compact max-pool]); same outputs and gradients.

    Example::

        >>> pool = CompactMaxPool1d(nn.MaxPool1d(2))
        >>> convmem.fuse_(model)   # swaps every max-pool it can (``pools=True``)
    """

    def __init__(self, wrapped: nn.MaxPool1d):
        reason = compact_pool_reason(wrapped)
        if reason is not None:
            raise ValueError(f"CompactMaxPool1d: cannot run this max-pool compactly: {reason}")
        super().__init__(wrapped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.wrapped
        if not (torch.is_grad_enabled() and x.requires_grad):
            return pool(x)  # nothing is kept for backward
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return _MaxPoolOffsets.apply(x, _single(pool.kernel_size), _single(stride), _single(pool.padding),
                                     _single(pool.dilation), bool(pool.ceil_mode))

    def extra_repr(self) -> str:
        return "int8 window offsets"


def compact_pools(model: nn.Module) -> Dict[str, CompactMaxPool1d]:
    """A `CompactMaxPool1d` for every max-pool of `model` that can be one, by name; nothing is
    swapped (`convmem.optimize_` swaps them: NOTE [Compact max-pools in plans] in plan/costs.py)."""
    return {name: CompactMaxPool1d(module) for name, module in model.named_modules()
            if name and compact_pool_reason(module) is None}
