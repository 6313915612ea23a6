"""`FusedNormActConv`: a block whose [BatchNorm ->] activation -> Conv1d chains keep only their first input.

A training step of ``conv(act(batch_norm(x)))`` keeps x (BatchNorm's backward reads it) and the
activation's output (the convolution's backward reads it; a GELU or SiLU keeps its input as well).
All of them but x are cheap functions of x and the batch statistics, so this keeps x and the
statistics only and rebuilds the convolution's input in backward, elementwise: what selective
checkpointing keeps, without torch.utils.checkpoint and without running the block's forward again
(NOTE [Norm-activation-conv chains]). ``conv(act(x))`` with a GELU, SiLU or LeakyReLU, which keeps
x and act(x), likewise keeps x only.

# NOTE [Norm-activation-conv chains]
# One autograd Function per chain. Forward: BatchNorm through the same kernel eager mode picks
# (``aten._batch_norm_impl_index``: cuDNN, MIOpen or native, and the running statistics updated by
# that kernel with nn.BatchNorm's momentum rule), the activation, the convolution; kept: x, the
# saved mean and inverse standard deviation (and cuDNN's reserve), the weights. Backward: the
# activation's input rebuilt as x * (invstd * weight) + (bias - mean * invstd * weight), computed
# in float32 or wider and rounded to x's dtype like the kernel's output, and the activation's output
# from it; then the convolution's, the activation's and BatchNorm's backward ops, the very aten ops
# eager autograd calls (convolution_backward, threshold/gelu/silu/leaky_relu backward,
# _batch_norm_impl_index_backward). So gradients are eager's up to the rounding of the rebuilt
# input (the kernel may order (x - mean) * invstd * weight + bias differently): float64 tests agree
# to 1e-15.
#
# An activation -> conv chain (no BatchNorm) is the same with the normalisation left out; the
# activation's output is rebuilt by the same op on the same input, bit for bit. A ReLU alone is not
# fused: it keeps only its output, which is the conv's input, so keeping its input instead would
# save nothing.
#
# A chain qualifies (`chain_reason`) when the BatchNorm is a plain nn.BatchNorm1d, the activation
# nn.ReLU, nn.GELU, nn.SiLU or nn.LeakyReLU (or F.relu, F.gelu, F.silu, F.leaky_relu, torch.relu
# called in forward with constant arguments), the convolution an nn.Conv1d running Conv1d's own
# forward (parametrized ones too: weight norm) with zero padding,
# none of them with hooks (the fused path would bypass them), and each output's only consumer the
# next op: the block's forward is traced with torch.fx, its submodules as leaves, to see that. At
# run time a chain runs fused only when it would save memory exactly: gradients on, the BatchNorm
# normalising with batch statistics (train mode, or no running statistics), no autocast (its casts
# around the ops would have to be replayed), not under torch.compile (which decides what to keep
# by itself); otherwise the three modules run as they are.
#
# Hooks on the chain's modules added after fusing run the chain unfused (the modules' own calls
# run them as they expect), except two of convmem's: Checkpointed's recompute bookkeeping on the
# BatchNorm (NOTE [Buffers are updated once]) runs around the fused chain, so a fused block inside
# checkpoint_ advances its statistics once; convmem.profile's per-module hooks are left out, so
# the profile sees the fused step, the chain inside its block's row.
#
# The traced forward bakes in what the block's Python reads at trace time (``self.training``, a
# None submodule, a flag): it is traced in train mode and used only while the block is in train
# mode with gradients on; in any other state the block's own forward runs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..profile.autocast_sim import autocast_state
from ._conv_replay import _options
from ._wrapper import ModuleWrapper
from .checkpointed import _Recompute

__all__ = ["FusedNormActConv", "NoChainError", "act_conv", "chain_reason", "find_chains", "norm_act_conv", "trace_fused"]

_aten = torch.ops.aten

# the functional activations fx records, by name
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", F.leaky_relu: "leaky_relu"}


def _module_activation(module: nn.Module) -> Optional[Tuple[str, Any]]:
    kind = type(module)
    if kind is nn.ReLU:
        return ("relu", None)
    if kind is nn.GELU:
        return ("gelu", module.approximate)
    if kind is nn.SiLU:
        return ("silu", None)
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    return None


def _apply_activation(z: torch.Tensor, activation: Tuple[str, Any]) -> torch.Tensor:
    name, arg = activation
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return F.gelu(z, approximate=arg)
    if name == "silu":
        return F.silu(z)
    return F.leaky_relu(z, arg)


def _activation_backward(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                         activation: Tuple[str, Any]) -> torch.Tensor:
    # The ops eager autograd calls for each activation (ReLU's reads its output).
    name, arg = activation
    if name == "relu":
        return _aten.threshold_backward(grad, y, 0)
    if name == "gelu":
        return _aten.gelu_backward(grad, z, approximate=arg)
    if name == "silu":
        return _aten.silu_backward(grad, z)
    return _aten.leaky_relu_backward(grad, z, arg, False)


def _rebuild(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """BatchNorm's output from its input and the saved statistics (NOTE [Norm-activation-conv chains])."""
    wide = torch.promote_types(x.dtype, torch.float32)
    scale = invstd.to(wide) if weight is None else invstd.to(wide) * weight.to(wide)
    shift = -mean.to(wide) * scale if bias is None else bias.to(wide) - mean.to(wide) * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x.to(wide), scale.view(shape)).to(x.dtype)


class _NormActConv(torch.autograd.Function):
    """conv(act(batch_norm(x))) keeping x and the batch statistics only."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, conv_weight, conv_bias, running_mean, running_var, factor, eps,
                activation, options):
        z, mean, invstd, reserve, impl = _aten._batch_norm_impl_index(
            x, bn_weight, bn_bias, running_mean, running_var, True, factor, eps, torch.backends.cudnn.enabled)
        y = _apply_activation(z, activation)
        del z
        stride, padding, dilation, _, _, groups, _ = options
        out = F.conv1d(y, conv_weight, conv_bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, bn_weight, bn_bias, conv_weight, mean, invstd, reserve)
        ctx.impl, ctx.eps, ctx.activation, ctx.options = impl, eps, activation, options
        ctx.has_bn_weight, ctx.has_bn_bias = bn_weight is not None, bn_bias is not None
        ctx.has_conv_bias = conv_bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bn_weight, bn_bias, conv_weight, mean, invstd, reserve = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups, bias_sizes = ctx.options
        z = _rebuild(x, bn_weight if ctx.has_bn_weight else None, bn_bias if ctx.has_bn_bias else None, mean, invstd)
        y = _apply_activation(z, ctx.activation)
        needs = ctx.needs_input_grad
        grad_y, grad_conv_weight, grad_conv_bias = _aten.convolution_backward(
            grad, y, conv_weight, bias_sizes if ctx.has_conv_bias else None, stride, padding, dilation,
            transposed, output_padding, groups, [any(needs[:3]), needs[3], ctx.has_conv_bias and needs[4]])
        grad_x = grad_bn_weight = grad_bn_bias = None
        if grad_y is not None:
            grad_z = _activation_backward(grad_y, z, y, ctx.activation)
            del grad_y, y, z
            grad_x, grad_bn_weight, grad_bn_bias = _aten._batch_norm_impl_index_backward(
                ctx.impl, x, grad_z, bn_weight if ctx.has_bn_weight else None, None, None, mean, invstd, True,
                ctx.eps, [needs[0], ctx.has_bn_weight and needs[1], ctx.has_bn_bias and needs[2]], reserve)
        return (grad_x, grad_bn_weight, grad_bn_bias, grad_conv_weight,
                grad_conv_bias if ctx.has_conv_bias else None, None, None, None, None, None, None)


class _ActConv(torch.autograd.Function):
    """conv(act(x)) keeping x only: the activation's output is computed again in backward."""

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, activation, options):
        stride, padding, dilation, _, _, groups, _ = options
        out = F.conv1d(_apply_activation(x, activation), conv_weight, conv_bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, conv_weight)
        ctx.activation, ctx.options, ctx.has_conv_bias = activation, options, conv_bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, conv_weight = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups, bias_sizes = ctx.options
        y = _apply_activation(x, ctx.activation)  # the same op on the same input: the same bits
        needs = ctx.needs_input_grad
        grad_y, grad_conv_weight, grad_conv_bias = _aten.convolution_backward(
            grad, y, conv_weight, bias_sizes if ctx.has_conv_bias else None, stride, padding, dilation,
            transposed, output_padding, groups, [needs[0], needs[1], ctx.has_conv_bias and needs[2]])
        grad_x = _activation_backward(grad_y, x, y, ctx.activation) if grad_y is not None else None
        return grad_x, grad_conv_weight, grad_conv_bias if ctx.has_conv_bias else None, None, None


def act_conv(activation: Tuple[str, Any], conv: nn.Conv1d, x: torch.Tensor,
             act_module: Optional[nn.Module] = None) -> torch.Tensor:
    """``conv(act(x))``, fused when that saves memory exactly (NOTE [Norm-activation-conv chains]).

    `act_module`: the block's activation module, called when the chain runs unfused (None: the
    block called the activation as a function).
    """
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or _autocast_on(x)
            or _fusable_hooks(None, conv, act_module) is None):
        return conv(_unfused_activation(x, activation, act_module))
    return _ActConv.apply(x, conv.weight, conv.bias, activation, _options(conv))


def _unfused_activation(z: torch.Tensor, activation: Tuple[str, Any], act_module: Optional[nn.Module]) -> torch.Tensor:
    return act_module(z) if act_module is not None else _apply_activation(z, activation)


def _batch_statistics(bn: nn.BatchNorm1d) -> bool:
    """Whether `bn` normalises with the batch's statistics (and so its input is all backward needs)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _autocast_on(x: torch.Tensor) -> bool:
    if x.device.type in ("cuda", "cpu"):
        return torch.is_autocast_enabled(x.device.type)
    autocast = autocast_state(x.device.type)  # the meta device: convmem.profile's simulated autocast
    return autocast is not None and autocast.get("enabled") is not False


def _fusable_now(x: torch.Tensor, bn: nn.BatchNorm1d) -> bool:
    return (torch.is_grad_enabled() and _batch_statistics(bn) and not torch.compiler.is_compiling()
            and not _autocast_on(x))


def norm_act_conv(bn: nn.BatchNorm1d, activation: Tuple[str, Any], conv: nn.Conv1d, x: torch.Tensor,
                  act_module: Optional[nn.Module] = None) -> torch.Tensor:
    """``conv(act(bn(x)))``, fused when that saves memory exactly (NOTE [Norm-activation-conv chains]).

    `act_module`: as in `act_conv`.
    """
    recompute_hooks = _fusable_hooks(bn, conv, act_module)
    if not _fusable_now(x, bn) or recompute_hooks is None:
        return conv(_unfused_activation(bn(x), activation, act_module))
    pre_hooks, post_hooks = recompute_hooks
    for hook in pre_hooks:
        hook(bn, (x,))
    try:
        return _fused(bn, activation, conv, x)
    finally:
        for hook in post_hooks:
            hook(bn, (x,), None)


def _fusable_hooks(bn: Optional[nn.BatchNorm1d], conv: nn.Conv1d, act_module: Optional[nn.Module],
                   ) -> Optional[Tuple[List[Callable], List[Callable]]]:
    """The BatchNorm hooks to run around the fused chain, or None when a hook on the chain's modules
    needs the modules' own calls (NOTE [Norm-activation-conv chains]).

    Hooks marked ``convmem_observer`` (convmem.profile's per-module bookkeeping, selective
    checkpointing's conv-output keeper) are left out: the chain is then one call of its block.
    Checkpointed's recompute bookkeeping on the BatchNorm (NOTE [Buffers are updated once]) is
    returned, to run around the chain. Any other hook: None.
    """
    modules = [m for m in (bn, conv, act_module) if m is not None]
    if not any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return [], []  # the common case, checked first: this runs once per chain and step
    kept: Dict[str, List[Callable]] = {"pre": [], "post": []}
    for module in modules:
        for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks)):
            for hook in hooks.values():
                if getattr(hook, "convmem_observer", False):
                    continue
                if module is not bn or not isinstance(getattr(hook, "__self__", None), _Recompute):
                    return None
                kept[kind].append(hook)
    return kept["pre"], kept["post"]


def _fused(bn: nn.BatchNorm1d, activation: Tuple[str, Any], conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    # nn.BatchNorm1d.forward's checks and bookkeeping, then its F.batch_norm call fused.
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if bn.training:
        F._verify_batch_size(x.size())
    running = bn.training and bn.track_running_stats
    return _NormActConv.apply(
        x, bn.weight, bn.bias, conv.weight, conv.bias,
        bn.running_mean if running else None, bn.running_var if running else None, factor, bn.eps,
        activation, _options(conv))


# ------------------------------------------------------------------------------ finding chains


def chain_reason(bn: Optional[nn.Module], activation: Optional[Tuple[str, Any]], conv: nn.Module) -> Optional[str]:
    """Why ``conv(act(bn(x)))`` (``conv(act(x))`` without `bn`) cannot run fused, or None when it can."""
    if bn is not None and type(bn) is not nn.BatchNorm1d:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm1d"
    if activation is None:
        return "the activation is not ReLU, GELU, SiLU or LeakyReLU"
    if bn is None and activation[0] == "relu":
        # ReLU keeps only its output, the conv's input: keeping its input instead saves nothing
        return "a ReLU without a BatchNorm before it keeps one tensor either way"
    if not isinstance(conv, nn.Conv1d) or type(conv).forward is not nn.Conv1d.forward:
        # a parametrized Conv1d (weight norm) qualifies: its weight is computed when read
        return f"{type(conv).__name__} is not an nn.Conv1d with Conv1d's own forward"
    if conv.padding_mode != "zeros" or (isinstance(conv.padding, str) and conv.padding != "valid"):
        return f"padding_mode={conv.padding_mode!r}, padding={conv.padding!r}: only zero padding given in numbers"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (bn, conv) if m is not None):
        return "a forward hook, which the fused chain would bypass"
    return None


class _Leaves(fx.Tracer):
    """Traces one block's forward only: every submodule is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _activation_of(node: fx.Node, block: nn.Module) -> Optional[Tuple[str, Any]]:
    if node.op == "call_module":
        module = block.get_submodule(node.target)
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        return _module_activation(module)
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS and len(node.args) >= 1:
        name = _ACTIVATION_FUNCTIONS[node.target]
        extra = list(node.args[1:])
        kwargs = dict(node.kwargs)
        if kwargs.pop("inplace", False) or any(isinstance(a, fx.Node) for a in extra + list(kwargs.values())):
            return None
        if name == "gelu":
            approximate = kwargs.pop("approximate", extra[0] if extra else "none")
            return None if kwargs or len(extra) > 1 else ("gelu", approximate)
        if name == "leaky_relu":
            slope = kwargs.pop("negative_slope", extra[0] if extra else 0.01)
            return None if kwargs or len(extra) > 1 else ("leaky_relu", float(slope))
        return None if extra or kwargs else (name, None)
    return None


def find_chains(block: nn.Module, graph: fx.Graph, wanted: Optional[Callable[[str], bool]] = None,
                ) -> List[Tuple[Optional[fx.Node], fx.Node, fx.Node, Tuple[str, Any]]]:
    """The ([BatchNorm], activation, conv) call nodes of `graph` that `block` can run fused (the
    BatchNorm None for an activation -> conv chain); with `wanted`, only chains whose conv's name in
    `block` it accepts."""
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chains = []
    for act_node in graph.nodes:
        activation = _activation_of(act_node, block) if act_node.op in ("call_module", "call_function") else None
        if activation is None or len(act_node.users) != 1:
            continue
        conv_node = next(iter(act_node.users))
        if (conv_node.op != "call_module" or calls[conv_node.target] != 1 or conv_node.args != (act_node,)
                or conv_node.kwargs):
            continue
        source = act_node.args[0]
        bn_node = source if (isinstance(source, fx.Node) and source.op == "call_module" and calls[source.target] == 1
                             and len(source.args) == 1 and not source.kwargs and len(source.users) == 1
                             and type(block.get_submodule(source.target)) is nn.BatchNorm1d) else None
        bn = block.get_submodule(bn_node.target) if bn_node is not None else None
        conv = block.get_submodule(conv_node.target)
        if chain_reason(bn, activation, conv) is None and (wanted is None or wanted(conv_node.target)):
            chains.append((bn_node, act_node, conv_node, activation))
    return chains


def trace_fused(block: nn.Module, wanted: Optional[Callable[[str], bool]] = None,
                ) -> Optional[Tuple[Callable[..., Any], Tuple[str, ...]]]:
    """`block`'s forward with its chains fused, as a function of (block, *args), and the names of
    the chains' convs in `block`; None when the forward cannot be traced or has no chain (`wanted`:
    see `find_chains`)."""
    modes = [(m, m.training) for m in block.modules()]  # each its own: a frozen BatchNorm stays in eval
    block.training = True  # the block's own Python only: its children are leaves
    try:
        graph = _Leaves().trace(block)
    except Exception:  # noqa: BLE001 - any forward fx cannot trace is left as it is
        return None
    finally:
        for m, training in modes:
            m.training = training
    chains = find_chains(block, graph, wanted)
    if not chains:
        return None
    convs = tuple(conv_node.target for _, _, conv_node, _ in chains)
    for bn_node, act_node, conv_node, activation in chains:
        with graph.inserting_before(conv_node):
            bn = graph.get_attr(bn_node.target) if bn_node is not None else None
            conv = graph.get_attr(conv_node.target)
            call = graph.get_attr(act_node.target) if act_node.op == "call_module" else None
            x = (bn_node if bn_node is not None else act_node).args[0]
            fused = graph.call_function(_fused_call, (bn, activation, conv, x, call))
        conv_node.replace_all_uses_with(fused)
        for node in (conv_node, act_node, bn_node):
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    module = fx.GraphModule(block, graph)
    return type(module).forward, convs


def _fused_call(bn: Optional[nn.Module], activation: Tuple[str, Any], conv: nn.Module, x: torch.Tensor,
                act_module: Optional[nn.Module]) -> torch.Tensor:
    """What the traced forward calls in place of a chain."""
    if bn is None:
        return act_conv(activation, conv, x, act_module)
    return norm_act_conv(bn, activation, conv, x, act_module)


class NoChainError(ValueError):
    """A block's forward has no chain `FusedNormActConv` can fuse."""


class FusedNormActConv(ModuleWrapper):
    """Runs `wrapped` with its [BatchNorm ->] activation -> Conv1d chains fused (NOTE [Norm-activation-conv chains]).

    ``state_dict()`` keys and values are those of `wrapped`; ``convmem.restore_`` gives it back.
    `wanted`: a predicate on each chain's conv name in `wrapped` (default: every chain). Raises
    `NoChainError` (a ValueError) when `wrapped`'s forward has no chain it can fuse.

    Example::

        >>> block = FusedNormActConv(resnet_basic_block)   # bn1 -> relu -> conv2 keeps bn1's input only
        >>> model = convmem.nn.FusedNormActConv(model)     # the root, which fuse_ cannot replace in place
    """

    def __init__(self, wrapped: nn.Module, wanted: Optional[Callable[[str], bool]] = None):
        traced = trace_fused(wrapped, wanted)
        if traced is None:
            raise NoChainError(f"FusedNormActConv: no [BatchNorm1d ->] activation -> Conv1d chain found in "
                             f"{type(wrapped).__name__}'s forward")
        super().__init__(wrapped)
        self.__dict__["_fused_forward"], self.convs = traced

    @property
    def chains(self) -> int:
        """How many chains run fused."""
        return len(self.convs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        block = self.wrapped
        fused = self._fused_forward
        if fused is not None and block.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return fused(block, *args, **kwargs)
        return block(*args, **kwargs)

    # The traced forward is generated code, which pickle cannot save (``torch.save(model)``): it is
    # traced again on loading, for the same convs.
    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fused_forward"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        traced = trace_fused(self.wrapped, frozenset(self.convs).__contains__)
        self.__dict__["_fused_forward"] = traced[0] if traced is not None else None

    def extra_repr(self) -> str:
        return f"chains={self.chains}"
