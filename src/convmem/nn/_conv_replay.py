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

# NOTE [Selective recompute in one Function]
# Non-reentrant torch.utils.checkpoint builds the block's whole autograd graph in the first forward
# and trades every saved tensor for a handle through Python hooks, with checks around each: about
# 1,900 Python calls per checkpointed resnet1d block (cProfile, CPU), against about 250 for the
# block's own forward. On the launch-bound steps Conv1d models often have, that Python is the cost:
# on an H200, selective resnet1d kernels took 11% longer than eager's, the step 3x as long. So for
# a residual block where selective by module applies, `Checkpointed` runs the block as one autograd
# Function (`run_recomputed`), as Tiled runs its windows (NOTE [Tiled autograd]):
#   * forward runs the block under no_grad, forward hooks keeping the conv outputs the probe marked
#     as needed; it saves the block's tensor arguments, and nothing else;
#   * backward re-runs the block with autograd, the kept convs answering from their outputs (each
#     let go once answered), and back-propagates the output gradients with
#     ``torch.autograd.grad`` to the tensor arguments and the block's parameters, which are inputs
#     of the Function: autograd accumulates each ``.grad`` once, as for the untouched block.
# Without the first forward's graph there is no early stop, so the recompute runs to the block's
# end. A conv whose output no saved tensor depends on (a TCN block's pointwise conv, WaveNet's skip
# and residual 1x1s) answers there with a zero-stride placeholder of its output's shape through the
# same `_KeptConvolution`, whose backward needs only the conv's input and weight: the tail costs its
# cheap ops (the residual add), not its convs; the recomputed outputs are back-propagated from their
# gradient edges, so they are not held while backward runs. What the tail's cheap ops make exists
# for a moment: in the no-GPU estimate basenji's peak is 2.2% above torch.utils.checkpoint's
# selective, the other zoo models' equal to the byte.
# A Function holds its output gradient until its backward returns, where torch.utils.checkpoint's
# graph lets it go after the block's last op: one more output-sized tensor during the block's
# backward (w2v2_fe: 29% more peak), unless that last op is an add, whose backward hands the
# gradient on to the residual branch, which holds it anyway. So only blocks whose outputs all come
# from an add (the probe says) run this way; the others keep torch.utils.checkpoint. Random ops
# found by the probe (dropout) make forward stash the RNG states and the recompute replay them;
# buffers are handled by the contexts of NOTE [Buffers are updated once] around both runs. A block
# that writes into its own inputs keeps torch.utils.checkpoint: the inputs it saved would not be
# those it read.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

CallKey = Tuple[str, int]  # (qualified name of the Conv1d in the block, its call index in one forward)


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
    """Entered around the first forward: keeps the outputs of the wanted convolution calls, and the
    shapes of the `skipped` ones (NOTE [Selective recompute in one Function])."""

    def __init__(self, convs: Dict[str, nn.Module], wanted: Sequence[CallKey], skipped: Sequence[CallKey] = ()):
        self.convs = convs
        self.wanted = frozenset(wanted)
        self.skipped = frozenset(skipped)
        self.kept: Dict[CallKey, torch.Tensor] = {}
        self.shapes: Dict[CallKey, Tuple[torch.Size, torch.dtype]] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._calls: Dict[str, int] = {}

    def _hook(self, name: str, module: nn.Module, args, output: torch.Tensor) -> None:
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        if (name, index) in self.wanted:
            self.kept[(name, index)] = output.detach()
        elif (name, index) in self.skipped:
            self.shapes[(name, index)] = (output.shape, output.dtype)

    def __enter__(self) -> None:
        self._calls = {}
        self._handles = [m.register_forward_hook(functools.partial(self._hook, name)) for name, m in self.convs.items()]

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
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        kept = self.first.kept.pop((name, index), None)
        if kept is None and (name, index) in self.first.shapes:  # NOTE [Selective recompute in one Function]
            shape, dtype = self.first.shapes.pop((name, index))
            kept = torch.empty((), dtype=dtype, device=x.device).expand(shape)
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


# ------------------------------------------------------------------- NOTE [Selective recompute in one Function]

# torch.autograd.grad takes gradient edges as outputs since PyTorch 2.4's GradientEdge support in grad.
_GRAD_OF_EDGES = hasattr(torch.autograd.graph, "get_gradient_edge")


class _Call:
    """One call of a selectively recomputed block: what its recompute needs besides the saved tensors."""

    def __init__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], named: Dict[str, nn.Module],
                 kept: Sequence[CallKey], skipped: Sequence[CallKey], random: bool,
                 contexts: Tuple[ContextManager, ContextManager]):
        self.module = module
        self.leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.tensor_index = [i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor)]
        # module.parameters(), from the modules at hand: each once, however many modules share it
        unique = {id(p): p for m in named.values() for p in m._parameters.values() if p is not None}
        self.params = [p for p in unique.values() if p.requires_grad]
        names = {name for name, _ in kept} | {name for name, _ in skipped}
        self.keep = KeepConvOutputs({name: named[name] for name in sorted(names)}, kept, skipped)
        self.random = random
        self.rng: Optional[Tuple[torch.Tensor, List[Tuple[torch.device, torch.Tensor]]]] = None
        self.first_forward, self.recompute = contexts
        self.out_spec = None
        self.out_leaves: List[Any] = []

    @property
    def tensors(self) -> List[torch.Tensor]:
        return [self.leaves[i] for i in self.tensor_index]

    def run(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The block on `tensors` in place of its tensor arguments; its output tensors."""
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_index, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        flat, self.out_spec = tree_flatten(self.module(*args, **kwargs))
        self.out_leaves = [None if isinstance(v, torch.Tensor) else v for v in flat]
        return [v for v in flat if isinstance(v, torch.Tensor)]

    def output(self, tensors: Sequence[torch.Tensor]) -> Any:
        it = iter(tensors)
        return tree_unflatten([next(it) if v is None else v for v in self.out_leaves], self.out_spec)


def run_recomputed(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], named: Dict[str, nn.Module],
                   kept: Sequence[CallKey], skipped: Sequence[CallKey], random: bool,
                   contexts: Tuple[ContextManager, ContextManager] = (contextlib.nullcontext(), contextlib.nullcontext())) -> Any:
    """``module(*args, **kwargs)`` keeping the `kept` conv outputs and the tensor arguments only;
    backward recomputes the rest (NOTE [Selective recompute in one Function]). `named`:
    ``dict(module.named_modules())``; `skipped`: conv calls whose outputs nothing saved depends on;
    `random`: the block draws random numbers; `contexts`: entered around the first forward and
    around the recompute (buffers)."""
    call = _Call(module, args, kwargs, named, kept, skipped, random, contexts)
    if not call.params and not any(t.requires_grad for t in call.tensors):
        return module(*args, **kwargs)
    return call.output(_RecomputedBlock.apply(call, *call.tensors, *call.params))


def _rng_states(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[torch.device, torch.Tensor]]]:
    devices = {t.device for t in tensors if t.device.type not in ("cpu", "meta")}
    return torch.get_rng_state(), [(d, getattr(torch, d.type).get_rng_state(d)) for d in devices]


@contextlib.contextmanager
def _rng_replayed(states):
    """The RNG states of `states` while the block is recomputed; the current ones afterwards."""
    if states is None:
        yield
        return
    cpu, devices = states
    before = _rng_states([])[0], [(d, getattr(torch, d.type).get_rng_state(d)) for d, _ in devices]
    torch.set_rng_state(cpu)
    for d, state in devices:
        getattr(torch, d.type).set_rng_state(state, d)
    try:
        yield
    finally:
        torch.set_rng_state(before[0])
        for d, state in before[1]:
            getattr(torch, d.type).set_rng_state(state, d)


def _roots(outputs: List[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]):
    """The outputs to back-propagate from, as gradient edges where possible (the tensors themselves
    are then free to go), and their gradients."""
    roots, seeds = [], []
    for output, grad in zip(outputs, grads):
        if grad is not None and output.requires_grad:
            edge = _GRAD_OF_EDGES and output.grad_fn is not None
            roots.append(torch.autograd.graph.get_gradient_edge(output) if edge else output)
            seeds.append(grad)
    return roots, seeds


class _RecomputedBlock(torch.autograd.Function):
    """Inputs: the call, its tensor arguments, the block's parameters that need a gradient."""

    @staticmethod
    def forward(ctx, call: _Call, *tensors: torch.Tensor):
        count = len(call.tensor_index)
        if call.random:
            call.rng = _rng_states(tensors[:count])
        with call.first_forward, call.keep:
            outputs = call.run(tensors[:count])
        ctx.save_for_backward(*tensors[:count])
        ctx.call = call
        ctx.mark_non_differentiable(*[t for t in outputs if not (t.is_floating_point() or t.is_complex())])
        # An argument returned as it is comes back as a view of it, as autograd makes of any Function.
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        call: _Call = ctx.call
        count = len(call.tensor_index)
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(needs[i]) for i, t in enumerate(saved[:count])]
        del saved
        with torch.enable_grad(), _rng_replayed(call.rng), call.recompute, ReplayConvOutputs(call.keep):
            roots, seeds = _roots(call.run(inputs), grads)
        wanted = [i for i, need in enumerate(needs) if need]
        wrt = [inputs[i] if i < count else call.params[i - count] for i in wanted]
        result: List[Optional[torch.Tensor]] = [None] * len(needs)
        if roots and wrt:
            for i, grad in zip(wanted, torch.autograd.grad(roots, wrt, seeds, allow_unused=True)):
                result[i] = grad
        return (None, *result)
