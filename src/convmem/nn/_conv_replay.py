"""Selective recompute without a dispatch mode: NOTE [Selective recompute by module].

# NOTE [Selective recompute by module]
# PyTorch's selective checkpointing (NOTE [Selective recompute] in checkpointed.py) decides per op in
# a Python dispatch mode, in the first forward and again in the recompute. Conv1d training steps are
# often launch-bound -- about 2,000 aten calls in a 20 ms step of a Basenji tower -- and there that
# Python call per op costs more than the recompute itself: selective measured slower than full
# checkpointing on four or five zoo models (H200, two runs). Against it, in one run, this version
# made steps 1.1-1.3x faster on five zoo models with the same bytes kept. When every convolution output the block must keep comes
# from a plain ``nn.Conv1d`` (or ``nn.ConvTranspose1d``) call, the same plan needs no dispatch mode:
#   * first forward: a forward hook on each such convolution keeps (a detached alias of) the
#     outputs the probe marked as needed, by call order per module;
#   * recompute: those modules answer from the kept outputs instead of convolving again, through
#     `_KeptConvolution`, an autograd Function whose forward returns the kept output and whose
#     backward is the convolution's own (``aten.convolution_backward`` with the module's stride,
#     padding, dilation, output padding and groups, on the recomputed input and the weight): the
#     gradients are those of the convolution op, bit for bit.
# Everything else in the block is recomputed as plain eager ops. What is kept, and so the memory,
# is exactly what the dispatch-mode version keeps. A Conv1d or ConvTranspose1d qualifies when its
# forward is PyTorch's own (weight-norm parametrizations included: the weight is recomputed from its
# parametrization as before), its padding is numeric or "valid" and its padding_mode "zeros";
# otherwise, or when a kept output comes from another op (a matmul, a functional conv), or under
# autocast (the casts around the convolution would have to be replayed too), the block uses the
# dispatch-mode version.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

CallKey = Tuple[str, int]  # (qualified name of the Conv1d in the block, its call index in one forward)


def next_call(calls: Dict[str, int], name: str) -> CallKey:
    """The key of this call of module `name`, counting its calls in `calls` (one forward's)."""
    index = calls.get(name, 0)
    calls[name] = index + 1
    return name, index


_REPLAYABLE = (nn.Conv1d, nn.ConvTranspose1d)


def replayable(module: nn.Module) -> bool:
    """Whether a call of `module` can be answered from a kept output (NOTE [Selective recompute by module])."""
    kind = type(module)
    return (
        isinstance(module, _REPLAYABLE)
        and any(kind.forward is base.forward for base in _REPLAYABLE)
        and module.padding_mode == "zeros"
        and (module.padding == "valid" or not isinstance(module.padding, str))
    )


class _KeptConvolution(torch.autograd.Function):
    """Forward: the kept output of a convolution. Backward: that convolution's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, kept, options):
        ctx.save_for_backward(x, weight)
        ctx.options = options
        ctx.has_bias = bias is not None
        return kept

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups, bias_sizes = ctx.options
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes if ctx.has_bias else None, stride, padding, dilation, transposed,
            output_padding, groups, mask,
        )
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None


def _options(conv: nn.Module) -> Tuple:
    """The arguments of ``aten.convolution`` that `conv`'s forward passes (without an output_size)."""
    transposed = isinstance(conv, nn.ConvTranspose1d)
    padding = [0] if conv.padding == "valid" else list(conv.padding)
    output_padding = list(conv.output_padding) if transposed else [0]
    return (list(conv.stride), padding, list(conv.dilation), transposed, output_padding, conv.groups,
            [conv.out_channels])


class KeepConvOutputs:
    """Entered around the first forward: keeps the outputs of the wanted convolution calls."""

    def __init__(self, convs: Dict[str, nn.Module], wanted: Sequence[CallKey]):
        self.convs = convs
        self.wanted = frozenset(wanted)
        self.kept: Dict[CallKey, torch.Tensor] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._calls: Dict[str, int] = {}

    def _hook(self, name: str, module: nn.Module, args, output: torch.Tensor) -> None:
        key = next_call(self._calls, name)
        if key in self.wanted:
            self.kept[key] = output.detach()

    def __enter__(self) -> None:
        self._calls = {}
        self._handles = []
        for name, module in self.convs.items():
            hook = functools.partial(self._hook, name)
            # A fused chain that runs this conv inside its own Function (nn/fused_norm_conv.py) may
            # skip the hook, in the first forward and the recompute alike: its output is then not
            # kept but recomputed, and the replay finds nothing to answer for it.
            hook.convmem_observer = True
            self._handles.append(module.register_forward_hook(hook))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ReplayConvOutputs:
    """Entered around the recompute: the kept convolution calls answer from what the first forward kept."""

    def __init__(self, first: KeepConvOutputs):
        self.first = first
        self._calls: Dict[str, int] = {}
        self._shadowed: List[Tuple[nn.Module, Optional[object]]] = []

    def _forward(self, name: str, conv: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        kept = self.first.kept.pop(next_call(self._calls, name), None)
        if kept is None or args or kwargs:  # not kept, or a ConvTranspose1d given an output_size
            return type(conv).forward(conv, x, *args, **kwargs)
        return _KeptConvolution.apply(x, conv.weight, conv.bias, kept, _options(conv))

    def __enter__(self) -> None:
        self._calls = {}
        self._shadowed = []
        for name, conv in self.first.convs.items():
            self._shadowed.append((conv, conv.__dict__.get("forward")))
            conv.forward = functools.partial(self._forward, name, conv)  # an instance attribute: __call__ finds it first

    def __exit__(self, *exc) -> None:
        for conv, before in self._shadowed:
            if before is None:
                del conv.forward
            else:
                conv.forward = before
        self._shadowed = []
