"""Fused depthwise Conv1d (+ bias + activation): Triton kernels, their autograd function, and the
plain-PyTorch twin `depthwise_conv1d_ref`.

``y = act(conv1d(x, weight, bias, stride, padding, dilation, groups=channels))``, with the
activation one of None, "relu", "gelu" (exact, erf) or "silu". The weight may hold several
filters per input channel (a depth multiplier: ``out_channels = channels * multiplier``, output
channel ``o`` reads input channel ``o // multiplier``), as ``nn.Conv1d`` with ``groups=in_channels``.

# NOTE [What the fused depthwise conv keeps]
# PyTorch's depthwise conv followed by an activation keeps two tensors of the output's size for
# backward: the conv's input (for the weight gradient) and the activation's input (for its
# derivative), and moves the pre-activation through device memory twice more (written by the
# conv, read by the activation). The fused function keeps only ``x`` and the weights (and the
# bias): backward recomputes the pre-activation from them, which costs the forward's arithmetic
# once more but no memory traffic beyond reading ``x``, which the weight gradient reads anyway.
#
# NOTE [Depthwise kernel layout]
# Channels are independent, so every program works on one channel row and a tile of positions
# along the length (the contiguous axis), in three kernels:
#   * `fwd`: ``y[t] = act(b + sum_k w[k] x[t * stride - pad_left + k * dilation])`` over a tile of
#     BLOCK_L outputs, one shifted load of the tile per tap (taps unrolled up to 64); neighbouring
#     tiles' halos come from L1/L2, not device memory.
#   * `bwd_w`: per row, over a chunk of length tiles, recompute the pre-activation p, form
#     ``gp = grad_y * act'(p)`` and accumulate the weight gradient ``sum_t gp[t] * x[t * stride -
#     pad_left + k * dilation]`` on a (taps, positions) tile (at most 32 taps a program; longer
#     kernels split their taps over programs) and the bias gradient ``sum_t gp[t]``, in float32;
#     the partial sums of all chunks and batch items are added afterwards (no atomics, so the
#     result is deterministic). With an activation it writes gp (input dtype) for `bwd_x`; without
#     one, gp is grad_y itself and nothing is written.
#   * `bwd_x`: ``grad_x[s] = sum_{j, k} w[c * multiplier + j, k] * gp[c * multiplier + j, t]``
#     over the t with ``t * stride = s + pad_left - k * dilation``: the correlation of gp with the
#     flipped kernel, tap by tap as in `fwd` (strided convs take a slower path that keeps the
#     positions where that division is exact).
# Accumulation is in float32 (float64 for float64 inputs) whatever the input dtype; bias and
# activation are applied to the accumulator before the one rounding to the output dtype.
#
# Offsets: a tile's start is computed in int64 once per tile (so inputs may exceed 2**31
# elements) and positions inside it are int32 relative to it, which keeps per-element index
# arithmetic 32-bit (a first version with 64-bit index math per element and tap, and (taps,
# positions) tiles in every kernel, was 1.6-4.2x slower on an H200). Tiles whose whole window lies inside the sequence load without masks; only tiles
# at the ends mask. Strides are passed, so inputs need not be contiguous (one whose length stride
# would overflow the int32 offsets is copied first).
#
# A single backward kernel could recompute gp at every tap of grad_x instead of storing it, but
# that costs K**2 multiply-adds per element, more than the memory traffic it saves for K >~ 8.
#
# NOTE [Interpreter and fallback]
# Triton is optional. The kernels are defined the first time they are needed, so the
# ``TRITON_INTERPRET=1`` environment variable (Triton's interpreter, which runs kernels on CPU
# tensors with numpy: the CI path) is honoured whenever it is set before that first call, even
# after triton itself was imported (see the comment in `_kernels` on builtins). Without
# Triton, or for tensors on a device the kernels cannot run on (the CPU without the interpreter),
# `depthwise_conv1d` runs `depthwise_conv1d_ref` and warns once. On the meta device it runs a
# shape-only version of the fused function, so that convmem's no-GPU memory estimate sees what the
# kernels keep.
#
# NOTE [Depthwise under torch.compile]
# Dynamo cannot trace the launchers (grid arithmetic over strides, device queries, kernels defined
# on first use), and a graph break around every depthwise conv would cost what the kernel saves.
# While compiling, `depthwise_conv1d` calls the forward and the backward as two torch.library
# custom ops (``convmem::depthwise_conv1d`` and its ``_backward``) with shape-only fake
# implementations: Dynamo and AOTAutograd trace them as opaque nodes, Inductor calls them as they
# are, and the backward op is the autograd rule of the forward one (registered with
# `register_autograd`), saving x, the weight and the bias, as the eager autograd function does.
# Where the kernels cannot run (no Triton, the CPU without the interpreter) the ops compute the
# reference and its gradients. These opaque ops are the path under Triton's interpreter (its
# kernels are not traceable) and on torch < 2.6; through them, on an H200 (benchmarks/dilation_probe.py --impls
# depthwise, commit 6e00904), the Conformer conv module compiled with its 16 depthwise convs on the
# kernel spent 15.0 ms a step in GPU kernels against 21.8 with cuDNN's, yet stepped in 29.8 ms
# against 23.9: the host time of a forward and backward through the Python ops is about three
# times PyTorch's (746 against 221 us on that machine, benchmarks/kernels.py --sections host: three
# Triton launches and their reductions), and that step is host-bound.
# So on a GPU with torch >= 2.6 the same two functions are `torch.library.triton_op`s instead
# (``convmem::depthwise_conv1d_triton`` and its ``_backward``), each kernel launched through
# `torch.library.wrap_triton`: AOTAutograd traces into them, Inductor launches the kernels from its
# generated code with its own launcher and compiles the partial-sum reductions with the rest of the
# graph. Same H200, commit 4b044fb: the Conformer step 20.2 ms against 24.6 as is, ConvTasNet's
# 33.2 against 40.6 (its 24 depthwise convs), both one graph. Under CUDA graphs
# (mode="reduce-overhead") the host time is gone either way: 16.4 ms against 24.0 (Conformer, the
# Python ops). `optimize_` decides per model (option "depthwise", NOTE
# [Convs by phases in plans] in plan/costs.py).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import positive_int

__all__ = ["ACTIVATIONS", "depthwise_conv1d", "depthwise_conv1d_ref", "resolve_padding", "triton_available",
           "kernels_usable"]

ACTIVATIONS = (None, "relu", "gelu", "silu")
_ACT_CODE = {None: 0, "relu": 1, "gelu": 2, "silu": 3}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Padding = Union[int, str, Tuple[int, ...]]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(device: Union[torch.device, str]) -> bool:
    """True when `depthwise_conv1d` runs the Triton kernels for tensors on `device`.

    CUDA devices with Triton installed; CPU tensors only under ``TRITON_INTERPRET=1``.
    """
    device = torch.device(device)
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _fallback_reason(device: torch.device) -> str:
    if not triton_available():
        return ("convmem.kernels.depthwise_conv1d: Triton is not installed (pip install triton, or "
                "convmem[triton]); running the plain-PyTorch reference depthwise_conv1d_ref instead, which "
                "keeps the pre-activation for backward")
    return (f"convmem.kernels.depthwise_conv1d: the Triton kernels need a CUDA device, got a tensor on "
            f"{device.type} (set TRITON_INTERPRET=1 before the first call to test them on the CPU); running "
            "the plain-PyTorch reference depthwise_conv1d_ref instead")


def resolve_padding(padding: Padding, kernel_size: int, dilation: int, stride: int) -> Tuple[int, int]:
    """(left, right) zero padding for `padding`: an int (both sides), a 1-tuple (as ``nn.Conv1d``
    stores it), a (left, right) pair, "valid" (none), "same" (PyTorch's rule: ``dilation *
    (kernel_size - 1)`` in all, the odd one on the right; stride 1 only) or "causal" (all on the
    left: output t sees inputs up to t)."""
    span = dilation * (kernel_size - 1)
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding == "same":
            if stride != 1:
                raise ValueError(f"padding='same' needs stride 1, got stride={stride} (as nn.Conv1d)")
            return span // 2, span - span // 2
        if padding == "causal":
            return span, 0
        raise ValueError(f"padding must be an int, a (left, right) pair, 'same', 'valid' or 'causal', got {padding!r}")
    if isinstance(padding, (tuple, list)):
        if len(padding) == 1:
            padding = padding[0]
        elif len(padding) == 2:
            left, right = (_nonnegative_int(p, "padding") for p in padding)
            return left, right
        else:
            raise ValueError(f"padding must be an int or a (left, right) pair, got {padding!r}")
    p = _nonnegative_int(padding, "padding")
    return p, p


def _length_out(length: int, kernel_size: int, stride: int, left: int, right: int, dilation: int) -> int:
    """Outputs of a convolution over `length` samples padded by (`left`, `right`) zeros."""
    return (length + left + right - dilation * (kernel_size - 1) - 1) // stride + 1


def _nonnegative_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _single_positive_int(value, what: str) -> int:
    """An int >= 1, also given as a one-element tuple or list (as nn.Conv1d stores its stride)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return positive_int(value, what)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
           activation) -> Tuple[int, int, int, int, int]:
    """Validate the arguments; (kernel_size, stride, dilation, pad_left, pad_right)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (batch, channels, length) tensor, got {getattr(x, 'shape', x)!r}")
    channels = x.shape[1]
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    if weight.dim() != 3 or weight.shape[1] != 1:
        raise ValueError(f"weight must be (out_channels, 1, kernel_size) as a depthwise nn.Conv1d's, got {tuple(weight.shape)}")
    out_channels, _, kernel_size = weight.shape
    if channels == 0 or out_channels % channels != 0:
        raise ValueError(f"weight has {out_channels} filters for {channels} input channels; a depthwise conv needs "
                         "a whole number of filters per channel")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must be ({out_channels},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast them to one dtype (or use torch.autocast)")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    stride = _single_positive_int(stride, "stride")
    dilation = _single_positive_int(dilation, "dilation")
    left, right = resolve_padding(padding, kernel_size, dilation, stride)
    length_out = _length_out(x.shape[2], kernel_size, stride, left, right, dilation)
    if length_out < 1:
        raise ValueError(f"input length {x.shape[2]} with padding ({left}, {right}) is shorter than the kernel's "
                         f"span {dilation * (kernel_size - 1) + 1}: no output")
    return kernel_size, stride, dilation, left, right


def _act_ref(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "silu":
        return F.silu(y)
    return y


def depthwise_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: int = 1,
    padding: Padding = 0,
    dilation: int = 1,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """The plain-PyTorch twin of `depthwise_conv1d`: ``F.conv1d(groups=channels)`` then the activation.

    Same arguments and result; keeps what PyTorch keeps (the input and the pre-activation).
    """
    kernel_size, stride, dilation, left, right = _check(x, weight, bias, stride, padding, dilation, activation)
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    if left == right:
        y = F.conv1d(x, weight, bias, stride, left, dilation, groups=x.shape[1])
    else:
        y = F.conv1d(F.pad(x, (left, right)), weight, bias, stride, 0, dilation, groups=x.shape[1])
    return _act_ref(y, activation)


def depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: int = 1,
    padding: Padding = 0,
    dilation: int = 1,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise Conv1d, bias and activation in one Triton kernel, keeping only `x` and the weights.

    Args:
        x: (batch, channels, length), float32, float16, bfloat16 (or float64); any strides.
        weight: (channels * multiplier, 1, kernel_size), as a depthwise ``nn.Conv1d``'s (or without
            the middle axis); any kernel size.
        bias: (channels * multiplier,) or None.
        stride, dilation: positive integers.
        padding: an int, a (left, right) pair, "valid", "same" or "causal" (see `resolve_padding`).
        activation: None, "relu", "gelu" (exact) or "silu", applied after the bias.

    Returns:
        (batch, channels * multiplier, length_out) in x's dtype, with ``length_out = (length + left
        + right - dilation * (kernel_size - 1) - 1) // stride + 1``.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as ``F.conv1d``'s are.
    Gradients flow to x, weight and bias; backward recomputes the pre-activation (NOTE [What the
    fused depthwise conv keeps]). Without Triton or a GPU it runs `depthwise_conv1d_ref` and warns
    once (NOTE [Interpreter and fallback]).

    Warning: in float16/bfloat16 the sums run in float32 and round once, so results differ from
    PyTorch's own low-precision conv by rounding (they are usually closer to the float32 result).

    Example::

        >>> x = torch.randn(8, 256, 16000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        >>> w = torch.randn(256, 1, 31, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        >>> y = depthwise_conv1d(x, w, padding="same", activation="silu")    # (8, 256, 16000)
        >>> y.sum().backward()
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if isinstance(x, torch.Tensor) and device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return depthwise_conv1d(x, weight, bias, stride, padding, dilation, activation)
    kernel_size, stride, dilation, left, right = _check(x, weight, bias, stride, padding, dilation, activation)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    if torch.compiler.is_compiling():  # NOTE [Depthwise under torch.compile]
        op = _depthwise_triton_op if x.device.type == "cuda" and _triton_ops_on_gpus() else _depthwise_op
        return op(x, weight, bias, stride, left, right, dilation, activation or "")
    if device_type != "meta" and not kernels_usable(x.device):
        _warn_once(device_type, _fallback_reason(x.device))
        return depthwise_conv1d_ref(x, weight, bias, stride, (left, right), dilation, activation)
    return _DepthwiseConv1dFunction.apply(x, weight, bias, stride, left, right, dilation, activation)


@torch.library.custom_op("convmem::depthwise_conv1d", mutates_args=())
def _depthwise_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, left: int,
                  right: int, dilation: int, activation: str) -> torch.Tensor:
    """The forward as one opaque op for torch.compile (NOTE [Depthwise under torch.compile]);
    `activation` "" for none."""
    if not kernels_usable(x.device):
        return depthwise_conv1d_ref(x, weight, bias, stride, (left, right), dilation, activation or None)
    return _forward(x, weight, bias, stride, left, right, dilation, activation or None)


@_depthwise_op.register_fake
def _(x, weight, bias, stride, left, right, dilation, activation):
    batch, _, length = x.shape
    out_channels, _, kernel_size = weight.shape
    return x.new_empty(batch, out_channels, _length_out(length, kernel_size, stride, left, right, dilation))


@torch.library.custom_op("convmem::depthwise_conv1d_backward", mutates_args=())
def _depthwise_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           stride: int, left: int, right: int, dilation: int, activation: str, need_x: bool,
                           need_w: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, weight and bias; an empty tensor stands for one not needed."""
    if kernels_usable(x.device):
        grads = _backward(x, weight, bias, grad_out, stride, left, right, dilation, activation or None,
                          need_x, need_w, need_b)
    else:
        grads = _reference_backward(x, weight, bias, grad_out, stride, left, right, dilation, activation or None,
                                    need_x, need_w, need_b)
    return _op_gradients(grads, x)


def _op_gradients(grads, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A backward op's outputs: an op returns tensors, so an empty one stands for a gradient not needed."""
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _reference_backward(x, weight, bias, grad_out, stride, left, right, dilation, activation, need_x, need_w, need_b):
    """`depthwise_conv1d_ref`'s gradients from aten's backward ops: a custom op runs below autograd,
    so the reference cannot be differentiated there."""
    padded = F.pad(x, (left, right)) if left or right else x
    groups = x.shape[1]
    pre = F.conv1d(padded, weight, bias, stride, 0, dilation, groups=groups)
    if activation == "relu":
        grad_out = torch.ops.aten.threshold_backward(grad_out, F.relu(pre), 0)
    elif activation == "gelu":
        grad_out = torch.ops.aten.gelu_backward(grad_out, pre)
    elif activation == "silu":
        grad_out = torch.ops.aten.silu_backward(grad_out, pre)
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out, padded, weight, list(bias.shape) if bias is not None else None, [stride], [0], [dilation], False,
        [0], groups, [need_x, need_w, need_b])
    if grad_x is not None and (left or right):
        # a fresh tensor, as the fake op's: Inductor asserts an op's strides and storage offset
        grad_x = grad_x[..., left:left + x.shape[-1]].contiguous()
    return grad_x, grad_w, grad_b


@_depthwise_backward_op.register_fake
def _(grad_out, x, weight, bias, stride, left, right, dilation, activation, need_x, need_w, need_b):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            bias.new_empty(bias.shape) if need_b else x.new_empty(0))


def _depthwise_op_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, left, right, dilation, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.conf = (stride, left, right, dilation, activation)


def _gradients_by(backward_op):
    """The autograd rule of a forward op whose gradients `backward_op` computes."""

    def gradients(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        grad_x, grad_w, grad_b = backward_op(grad_out, x, weight, bias, *ctx.conf, need_x, need_w, need_b)
        return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None)

    return gradients


_depthwise_op.register_autograd(_gradients_by(_depthwise_backward_op), setup_context=_depthwise_op_context)

# NOTE [Depthwise under torch.compile]: where torch has triton ops (2.6 on) and the kernels are
# compiled ones on a GPU, the same forward and backward as `torch.library.triton_op`s, whose
# kernels Inductor launches from its own generated code. Defined only with Triton installed:
# without it torch warns at each definition that it finds no kernels.
_TRITON_OPS = (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
               and triton_available())


@torch.compiler.assume_constant_result  # read while Dynamo traces: a constant to it, no graph break
def _triton_ops_on_gpus() -> bool:
    """Whether CUDA tensors take the triton ops when compiling (torch >= 2.6, Triton, no interpreter)."""
    return _TRITON_OPS and not _interpreting()


if _TRITON_OPS:
    @torch.library.triton_op("convmem::depthwise_conv1d_triton", mutates_args=())
    def _depthwise_triton_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                             left: int, right: int, dilation: int, activation: str) -> torch.Tensor:
        """`_depthwise_op` with its kernel visible to Inductor."""
        return _forward(x, weight, bias, stride, left, right, dilation, activation or None,
                        launch=torch.library.wrap_triton)

    @torch.library.triton_op("convmem::depthwise_conv1d_triton_backward", mutates_args=())
    def _depthwise_triton_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                      bias: Optional[torch.Tensor], stride: int, left: int, right: int, dilation: int,
                                      activation: str, need_x: bool, need_w: bool,
                                      need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_depthwise_backward_op` with its kernels visible to Inductor."""
        grads = _backward(x, weight, bias, grad_out, stride, left, right, dilation, activation or None,
                          need_x, need_w, need_b, launch=torch.library.wrap_triton)
        return _op_gradients(grads, x)

    _depthwise_triton_op.register_autograd(_gradients_by(_depthwise_triton_backward_op),
                                           setup_context=_depthwise_op_context)


class _DepthwiseConv1dFunction(torch.autograd.Function):
    """The fused conv as an autograd node that saves x, weight and bias only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, left, right, dilation, activation):
        ctx.conf = (stride, left, right, dilation, activation)
        ctx.save_for_backward(x, weight, bias)
        return _forward(x, weight, bias, stride, left, right, dilation, activation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        stride, left, right, dilation, activation = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = _backward(x, weight, bias, grad_out, stride, left, right, dilation, activation,
                                           need_x, need_w, need_b and bias is not None)
        return grad_x, grad_w, grad_b, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Launchers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Positions a 1-D tile covers, a weight-gradient tile's elements, and warps per program;
# `benchmarks/kernels.py --sections tune` times other choices.
_TUNING = {"block": 1024, "tile": 4096, "warps": 4}
_MAX_TAPS = 32  # taps a weight-gradient program holds at once (NOTE [Depthwise kernel layout])


def _block_l(length: int) -> int:
    return max(16, min(_TUNING["block"], _next_pow2(length)))


def _blocks_w(kernel_size: int, length_out: int) -> Tuple[int, int]:
    """(BLOCK_K, BLOCK_L) of the weight-gradient kernel's (taps, positions) tile: at least one
    position per thread, so that the sum over taps stays inside a thread."""
    block_k = min(_MAX_TAPS, _next_pow2(kernel_size))
    block_l = max(32 * _TUNING["warps"], min(4096, _TUNING["tile"] // block_k, _next_pow2(length_out)))
    return block_k, block_l


def _acc_dtype(dtype: torch.dtype):
    tl = _kernels().tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _int32_safe(t: torch.Tensor, span: int) -> torch.Tensor:
    """Offsets inside a tile are int32 (NOTE [Depthwise kernel layout]); a tensor whose length stride
    would overflow them over `span` positions is made contiguous first."""
    return t if abs(t.stride(-1)) * (span + 1) < 2**31 else t.contiguous()


def _as_is(kernel):
    return kernel


def _forward(x, weight, bias, stride, left, right, dilation, activation, launch=_as_is):
    """`launch`: what a kernel is launched through (`torch.library.wrap_triton` inside the triton ops)."""
    batch, channels, length = x.shape
    out_channels, _, kernel_size = weight.shape
    length_out = _length_out(length, kernel_size, stride, left, right, dilation)
    y = torch.empty(batch, out_channels, length_out, device=x.device, dtype=x.dtype)
    if x.device.type == "meta":
        return y
    k = _kernels()
    w = weight.reshape(out_channels, kernel_size).contiguous()
    block_l = _block_l(length_out)
    x = _int32_safe(x, block_l * stride + dilation * kernel_size)
    n_tiles = _cdiv(length_out, block_l)
    launch(k.fwd)[(batch * out_channels * n_tiles,)](
        x, w, bias if bias is not None else w, y,
        out_channels, out_channels // channels, length, length_out, stride, left, dilation, n_tiles,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        K=kernel_size, HAS_BIAS=bias is not None, ACT=_ACT_CODE[activation], ACC=_acc_dtype(x.dtype),
        ROUND_BF16=x.dtype == torch.bfloat16, BLOCK_L=block_l, num_warps=_TUNING["warps"],
    )
    return y


def _chunks(device: torch.device, rows: int, n_tiles: int) -> Tuple[int, int]:
    """(chunks, tiles per chunk) for the weight-gradient kernel: enough programs to fill the GPU,
    each summing over as many tiles as it can, so the partial sums stay few."""
    if device.type == "cuda":
        target = 16 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 1
    chunks = max(1, min(n_tiles, -(-target // max(rows, 1))))
    per_chunk = -(-n_tiles // chunks)
    return -(-n_tiles // per_chunk), per_chunk


def _backward(x, weight, bias, grad_out, stride, left, right, dilation, activation, need_x, need_w, need_b,
              launch=_as_is):
    batch, channels, length = x.shape
    out_channels, _, kernel_size = weight.shape
    multiplier = out_channels // channels
    length_out = grad_out.shape[2]
    if x.device.type == "meta":
        return (torch.empty_like(x) if need_x else None, torch.empty_like(weight) if need_w else None,
                torch.empty_like(bias) if need_b else None)
    k = _kernels()
    acc = _acc_dtype(x.dtype)
    round_bf16 = x.dtype == torch.bfloat16
    part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.reshape(out_channels, kernel_size).contiguous()
    act = _ACT_CODE[activation]
    warps = _TUNING["warps"]
    grad_x = grad_w = grad_b = None

    gp = grad_out  # NOTE [Depthwise kernel layout]: without an activation, gp is grad_out itself
    store_gp = act != 0 and need_x
    if store_gp:
        gp = torch.empty(batch, out_channels, length_out, device=x.device, dtype=x.dtype)
    if need_w or need_b or store_gp:
        block_k, block_l = _blocks_w(kernel_size, length_out)
        xw = _int32_safe(x, block_l * stride + dilation * kernel_size)
        g = _int32_safe(grad_out, block_l)
        n_tiles = _cdiv(length_out, block_l)
        n_kc = _cdiv(kernel_size, block_k)
        rows = batch * out_channels
        chunks, per_chunk = _chunks(x.device, rows * n_kc, n_tiles)
        dw = torch.empty(chunks, rows, kernel_size, device=x.device, dtype=part_dtype)
        db = torch.empty(chunks, rows, device=x.device, dtype=part_dtype)
        launch(k.bwd_w)[(rows * chunks * n_kc,)](
            xw, w, bias if bias is not None else w, g, gp, dw, db,
            out_channels, multiplier, length, length_out, stride, left, dilation, per_chunk, chunks, n_kc, rows,
            xw.stride(0), xw.stride(1), xw.stride(2), g.stride(0), g.stride(1), g.stride(2),
            K=kernel_size, HAS_BIAS=bias is not None, ACT=act, STORE_GP=store_gp, ACC=acc, ROUND_BF16=round_bf16,
            BLOCK_K=block_k, BLOCK_L=block_l, num_warps=warps,
        )
        # rows are batch-major: the partial sums of one channel are every (chunk, batch) pair, one
        # reduction (each op here is host time a launch-bound step pays)
        if need_w:
            grad_w = dw.view(chunks * batch, out_channels, kernel_size).sum(0)
            grad_w = grad_w.to(weight.dtype).view(weight.shape)
        if need_b:
            grad_b = db.view(chunks * batch, out_channels).sum(0).to(bias.dtype)
    if need_x:
        grad_x = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
        block_l = _block_l(length)
        gp = _int32_safe(gp, block_l + dilation * kernel_size)
        n_tiles = _cdiv(length, block_l)
        launch(k.bwd_x)[(batch * channels * n_tiles,)](
            gp, w, grad_x,
            channels, multiplier, length, length_out, stride, left, dilation, n_tiles,
            gp.stride(0), gp.stride(1), gp.stride(2), grad_x.stride(0), grad_x.stride(1), grad_x.stride(2),
            K=kernel_size, ACC=acc, ROUND_BF16=round_bf16, UNIT_STRIDE=stride == 1, BLOCK_L=block_l,
            num_warps=warps,
        )
    return grad_x, grad_w, grad_b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Kernels, defined on first use (NOTE [Interpreter and fallback])


@functools.lru_cache(maxsize=None)
def _kernels():
    # Triton resolves the names a kernel uses in its module's globals (its interpreter re-creates
    # the function from source, without closures), and Inductor copies a kernel launched in a
    # compiled graph together with the @jit functions it finds among the globals it names
    # (NOTE [Depthwise under torch.compile]): so `tl` and the kernels' helpers are this module's
    # globals, bound here on first use. The kernels use only Triton's builtins (tl.full, tl.reduce),
    # none of the @jit functions of triton.language.standard (tl.zeros, tl.sum): those are
    # compiled-only objects when triton was imported before TRITON_INTERPRET=1 was set
    # (torch._dynamo imports it), and the interpreter then cannot call them.
    global tl, _act, _act_grad, _rounded, _tap, _taps, _add, _clamp32
    import triton
    import triton.language as tl

    @triton.jit
    def _act(p, ACT: tl.constexpr):
        if ACT == 1:
            p = tl.where(p < 0, 0.0, p).to(p.dtype)
        elif ACT == 2:
            p = 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))
        elif ACT == 3:
            p = p / (1.0 + tl.exp(-p))
        return p

    @triton.jit
    def _act_grad(p, ACT: tl.constexpr):
        # d act / d p, as PyTorch's backward formulas compute it.
        if ACT == 1:
            d = tl.where(p > 0, 1.0, 0.0).to(p.dtype)
        elif ACT == 2:
            cdf = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476))
            d = cdf + p * (tl.exp(-0.5 * p * p) * 0.3989422804014327)
        else:
            s = 1.0 / (1.0 + tl.exp(-p))
            d = s * (1.0 + p * (1.0 - s))
        return d

    @triton.jit
    def _rounded(v, dst_ptr, ROUND_BF16: tl.constexpr):
        # float32 -> bfloat16 rounds to nearest even on the GPU, but Triton's interpreter truncates;
        # rounding the bits here first makes the final cast exact on both.
        if ROUND_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
        return v.to(dst_ptr.dtype.element_ty)

    @triton.jit
    def _tap(acc, k, base, w_row, rel0, step, s_l, lo, hi, ok, MASKED: tl.constexpr, ACC: tl.constexpr):
        # acc += w[k] * v[rel0 + k * step]: one tap over a tile, int32 positions relative to `base`.
        rel = rel0 + k * step
        w = tl.load(w_row + k).to(ACC)
        if MASKED:
            v = tl.load(base + rel * s_l, mask=ok & (rel >= lo) & (rel < hi), other=0.0)
        else:
            v = tl.load(base + rel * s_l)
        return acc + w * v.to(ACC)

    @triton.jit
    def _taps(acc, base, w_row, rel0, step, s_l, lo, hi, ok, K: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
        # acc + sum_k w[k] * v[rel0 + k * step], unrolled up to 64 taps.
        if K <= 64:
            for k in tl.static_range(K):
                acc = _tap(acc, k, base, w_row, rel0, step, s_l, lo, hi, ok, MASKED, ACC)
        else:
            for k in range(K):
                acc = _tap(acc, k, base, w_row, rel0, step, s_l, lo, hi, ok, MASKED, ACC)
        return acc

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _clamp32(v):
        return tl.minimum(tl.maximum(v, -(2**30)), 2**30).to(tl.int32)

    @triton.jit
    def fwd(x_ptr, w_ptr, b_ptr, y_ptr,
            C_out, M, L_in, L_out, stride, pad_left, dilation, n_tiles,
            sxb, sxc, sxl, syb, syc, syl,
            K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
            ROUND_BF16: tl.constexpr, BLOCK_L: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        row = pid // n_tiles
        t0 = (pid % n_tiles) * BLOCK_L
        b = row // C_out
        o = row % C_out
        start = t0 * stride - pad_left  # input position of tap 0 of output t0
        base = x_ptr + b * sxb + (o // M) * sxc + start * sxl
        ar = tl.arange(0, BLOCK_L)
        rel0 = ar * stride
        lo = _clamp32(-start)
        hi = _clamp32(L_in - start)
        ok = ar < _clamp32(L_out - t0)
        w_row = w_ptr + o * K
        interior = (start >= 0) & (start + (BLOCK_L - 1) * stride + (K - 1) * dilation < L_in) & (t0 + BLOCK_L <= L_out)
        if interior:
            acc = _taps(tl.full([BLOCK_L], 0, ACC), base, w_row, rel0, dilation, sxl, lo, hi, ok, K, False, ACC)
        else:
            acc = _taps(tl.full([BLOCK_L], 0, ACC), base, w_row, rel0, dilation, sxl, lo, hi, ok, K, True, ACC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + o).to(ACC)
        y = _act(acc, ACT)
        tl.store(y_ptr + b * syb + o * syc + t0 * syl + ar * syl, _rounded(y, y_ptr, ROUND_BF16), mask=ok)

    @triton.jit
    def bwd_w(x_ptr, w_ptr, b_ptr, g_ptr, gp_ptr, dw_ptr, db_ptr,
              C_out, M, L_in, L_out, stride, pad_left, dilation, per_chunk, n_chunks, n_kc, n_rows,
              sxb, sxc, sxl, sgb, sgc, sgl,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_GP: tl.constexpr,
              ACC: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        kc = pid % n_kc
        chunk = (pid // n_kc) % n_chunks
        row = pid // (n_kc * n_chunks)
        b = row // C_out
        o = row % C_out
        x_row = x_ptr + b * sxb + (o // M) * sxc
        g_row = g_ptr + b * sgb + o * sgc
        w_row = w_ptr + o * K
        kk = tl.arange(0, BLOCK_K)
        k_real = kc * BLOCK_K + kk
        k_ok = k_real < K
        # Taps past K repeat tap K-1 (no mask needed) with weight 0; their sums are not stored.
        k_idx = tl.minimum(k_real, K - 1).to(tl.int32)
        w_col = tl.where(k_ok, tl.load(w_row + k_idx).to(ACC), 0.0)
        ar = tl.arange(0, BLOCK_L)
        rel2 = ar[None, :] * stride + k_idx[:, None] * dilation  # (taps, positions), int32
        if HAS_BIAS:
            bias = tl.load(b_ptr + o).to(ACC)
        acc = tl.full([BLOCK_K, BLOCK_L], 0, ACC)
        acc_b = tl.full([BLOCK_L], 0, ACC)
        for i in range(0, per_chunk):
            t0 = (chunk * per_chunk + i) * BLOCK_L
            start = t0 * stride - pad_left
            base = x_row + start * sxl
            lo = _clamp32(-start)
            hi = _clamp32(L_in - start)
            ok = ar < _clamp32(L_out - t0)
            interior = (start >= 0) & (start + (BLOCK_L - 1) * stride + (K - 1) * dilation < L_in) & (t0 + BLOCK_L <= L_out)
            if interior:
                xv = tl.load(base + rel2 * sxl).to(ACC)
                g = tl.load(g_row + (t0 + ar) * sgl).to(ACC)
            else:
                xv = tl.load(base + rel2 * sxl, mask=ok[None, :] & (rel2 >= lo) & (rel2 < hi), other=0.0).to(ACC)
                g = tl.load(g_row + (t0 + ar) * sgl, mask=ok, other=0.0).to(ACC)
            if ACT != 0:
                if K <= BLOCK_K:
                    pre = tl.reduce(xv * w_col[:, None], 0, _add)
                else:
                    if interior:
                        pre = _taps(tl.full([BLOCK_L], 0, ACC), base, w_row, ar * stride, dilation, sxl, lo, hi, ok, K, False,
                                     ACC)
                    else:
                        pre = _taps(tl.full([BLOCK_L], 0, ACC), base, w_row, ar * stride, dilation, sxl, lo, hi, ok, K, True,
                                     ACC)
                if HAS_BIAS:
                    pre += bias
                gp = g * _act_grad(pre, ACT)
                if STORE_GP:
                    if kc == 0:
                        tl.store(gp_ptr + row * L_out + t0 + ar, _rounded(gp, gp_ptr, ROUND_BF16), mask=ok)
            else:
                gp = g
            acc += xv * gp[None, :]
            if HAS_BIAS:
                acc_b += gp
        part = chunk * n_rows + row
        tl.store(dw_ptr + part * K + k_real, tl.reduce(acc, 1, _add), mask=k_ok)
        if kc == 0:
            tl.store(db_ptr + part, tl.reduce(acc_b, 0, _add))

    @triton.jit
    def bwd_x(gp_ptr, w_ptr, dx_ptr,
              C_in, M, L_in, L_out, stride, pad_left, dilation, n_tiles,
              sgb, sgc, sgl, sdb, sdc, sdl,
              K: tl.constexpr, ACC: tl.constexpr, ROUND_BF16: tl.constexpr, UNIT_STRIDE: tl.constexpr,
              BLOCK_L: tl.constexpr):
        # grad_x[s] = sum_{j, k} w[c * M + j, k] * gp[c * M + j, t], t * stride = s + pad_left - k * dilation
        pid = tl.program_id(0).to(tl.int64)
        row = pid // n_tiles
        s0 = (pid % n_tiles) * BLOCK_L
        b = row // C_in
        c = row % C_in
        ar = tl.arange(0, BLOCK_L)
        s_ok = ar < _clamp32(L_in - s0)
        acc = tl.full([BLOCK_L], 0, ACC)
        for j in range(0, M):
            o = c * M + j
            g_row = gp_ptr + b * sgb + o * sgc
            w_row = w_ptr + o * K
            if UNIT_STRIDE:
                start = s0 + pad_left  # gp position of tap 0 of grad_x s0
                base = g_row + start * sgl
                lo = _clamp32(-start)
                hi = _clamp32(L_out - start)
                interior = (start - (K - 1) * dilation >= 0) & (start + BLOCK_L <= L_out) & (s0 + BLOCK_L <= L_in)
                if interior:
                    acc = _taps(acc, base, w_row, ar, -dilation, sgl, lo, hi, s_ok, K, False, ACC)
                else:
                    acc = _taps(acc, base, w_row, ar, -dilation, sgl, lo, hi, s_ok, K, True, ACC)
            else:
                s = s0 + ar
                for k in range(K):
                    num = s + pad_left - k * dilation
                    t = num // stride
                    ok = s_ok & (num >= 0) & ((num % stride) == 0) & (t < L_out)
                    v = tl.load(g_row + t * sgl, mask=ok, other=0.0).to(ACC)
                    acc += tl.load(w_row + k).to(ACC) * v
        tl.store(dx_ptr + b * sdb + c * sdc + s0 * sdl + ar * sdl, _rounded(acc, dx_ptr, ROUND_BF16), mask=s_ok)

    class _K:
        pass

    ns = _K()
    ns.tl, ns.fwd, ns.bwd_w, ns.bwd_x = tl, fwd, bwd_w, bwd_x
    return ns
