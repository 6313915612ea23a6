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
# Windows that tile the input (stride == kernel, Basenji's pools) take the gradient in one
# elementwise pass (`_spread_over_windows`) instead of a strided add per slot.
#
# Under torch.compile the backward is max-pool's own backward op, on int64 indices rebuilt from the
# offsets (`_max_pool_backward`): Inductor lowers it to the kernel it builds for a compiled
# ``nn.MaxPool1d``, with the index arithmetic folded in. Inductor lowers max-pools to offsets of
# its own (`_low_memory_max_pool2d_with_offsets`), yet on torch 2.11 a compiled Basenji still kept
# 0.67 GiB more without the swap: that op takes the pool's input, for its shape alone, and the
# compact pool hands it an uninitialised tensor of that shape instead. On an H200 (three runs of
# benchmarks/run.py compact_pools, commit b63ffb2): Basenji compiled as it is 2.739 GiB at 18.1,
# 18.2 and 19.0 ms, with the pools compact 2.070 GiB at 18.3, 18.3 and 18.1 ms (with the slot loop
# compiled it had measured up to 1.3 ms slower: each strided add became a copy of the whole
# gradient); every block
# selective, 1.554 GiB either way (selective blocks recompute the pools' inputs already). On torch
# 2.13 (CPU) a compiled ``nn.MaxPool1d`` keeps no input, and the swap changes nothing there.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ._wrapper import CheckedWrapper, swappable

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
        # in place: the int64 indices are the only full-size temporary, as in max-pool's own step
        indices.sub_(torch.arange(out.shape[-1], device=x.device) * stride - padding)
        if dilation > 1:
            indices.div_(dilation, rounding_mode="floor")
        ctx.save_for_backward(indices.to(torch.int8))
        ctx.input_shape = x.shape
        ctx.geometry = (kernel, stride, padding, dilation)
        ctx.ceil_mode = ceil_mode
        return out

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            grad_input = _max_pool_backward(grad, offsets, ctx.input_shape, *ctx.geometry, ctx.ceil_mode)
        else:
            grad_input = _scatter_to_maxima(grad, offsets, ctx.input_shape, *ctx.geometry)
        return grad_input, None, None, None, None, None


def _max_pool_backward(grad: torch.Tensor, offsets: torch.Tensor, input_shape, kernel: int, stride: int,
                       padding: int, dilation: int, ceil_mode: bool) -> torch.Tensor:
    """Max-pool's own backward op, given indices rebuilt from the offsets: for torch.compile, whose
    Inductor lowers that op to one kernel that gathers each input position's gradient from the
    windows holding it, and folds the index arithmetic into it. The op takes max-pool's input too,
    for its shape alone (Inductor's lowering reads no value of it, and neither do aten's kernels),
    which is why a compiled ``nn.MaxPool1d`` keeps its input: here an uninitialised tensor of that
    shape stands in. Eagerly the int64 indices would be a full-size temporary, so eager steps use
    `_scatter_to_maxima` (NOTE [Compact max-pool])."""
    positions = torch.arange(offsets.shape[-1], device=offsets.device) * stride - padding
    indices = (offsets.long() * dilation + positions).unsqueeze(-2)
    shape_only = grad.new_empty(input_shape).unsqueeze(-2)
    grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
        grad.unsqueeze(-2), shape_only, [1, kernel], [1, stride], [0, padding], [1, dilation], ceil_mode, indices)
    return grad_input.squeeze(-2)


def _scatter_to_maxima(grad: torch.Tensor, offsets: torch.Tensor, input_shape, kernel: int, stride: int,
                       padding: int, dilation: int) -> torch.Tensor:
    """Each output's gradient added at its maximum's input position, one window slot at a time:
    slot r of output j is input position ``j * stride - padding + r * dilation``. Nothing of the
    size of int64 indices is built (NOTE [Compact max-pool]); the ops are differentiable in `grad`."""
    length, n_out = input_shape[-1], offsets.shape[-1]
    zero = grad.new_zeros(())
    if kernel == stride and dilation == 1:
        return _spread_over_windows(grad, offsets, length, kernel, padding, zero)
    grad_input = grad.new_zeros(input_shape)
    for slot in range(kernel):
        shift = slot * dilation - padding
        first = max(0, -(shift // stride))  # the first output whose slot lies in the input: ceil(-shift / stride)
        last = min(n_out, (length - 1 - shift) // stride + 1)  # one past the last
        if last <= first:
            continue
        start = first * stride + shift
        hit = torch.where(offsets[..., first:last] == slot, grad[..., first:last], zero)
        grad_input[..., start:start + (last - first - 1) * stride + 1:stride] += hit
    return grad_input


def _spread_over_windows(grad: torch.Tensor, offsets: torch.Tensor, length: int, kernel: int, padding: int,
                         zero: torch.Tensor) -> torch.Tensor:
    """`_scatter_to_maxima` where windows tile the input (stride == kernel, no dilation): output j's
    window is input positions ``j * kernel - padding + r``, so the gradient is every window's
    one-hot spread laid end to end, cut or zero-filled to the input's length. One elementwise pass,
    which torch.compile fuses into a single kernel; the slot loop's strided in-place adds became a
    full copy of the gradient per slot there (NOTE [Compact max-pool])."""
    slots = torch.arange(kernel, device=offsets.device, dtype=offsets.dtype)
    spread = torch.where(offsets.unsqueeze(-1) == slots, grad.unsqueeze(-1), zero).flatten(-2)
    covered = spread.shape[-1] - padding  # input positions from 0 the windows reach
    if padding == 0 and covered == length:
        return spread
    return torch.nn.functional.pad(spread, (-padding, length - covered))  # negative: cut the padding


class CompactMaxPool1d(CheckedWrapper):
    """An ``nn.MaxPool1d`` whose training step keeps an int8 window offset per output instead of its
    input and int64 indices (NOTE [Compact max-pool]); same outputs and gradients.

    Example::

        >>> pool = CompactMaxPool1d(nn.MaxPool1d(2))
        >>> convmem.fuse_(model)   # swaps every max-pool it can (``pools=True``)
    """

    reason_of = staticmethod(compact_pool_reason)
    cannot = "run this max-pool compactly"

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
    """A `CompactMaxPool1d` for every max-pool of `model` that can be one and is not one already, by
    name; nothing is swapped (`fuse_` swaps them, and `optimize_`: NOTE [Compact max-pools in plans]
    in plan/costs.py)."""
    return swappable(model, CompactMaxPool1d)
