"""Fused convolutions (exact): ``convmem.fuse_(model)``.

Swaps every depthwise ``nn.Conv1d`` the fused Triton kernel can run for a
`convmem.nn.FusedDepthwiseConv1d` wrapping it, and folds a ReLU, GELU or SiLU that follows the
conv in an ``nn.Sequential`` into the kernel. A training step then keeps only each conv's input
and weights (NOTE [What the fused depthwise conv keeps]). And it runs every block whose forward
calls BatchNorm1d -> ReLU/GELU/SiLU/LeakyReLU -> Conv1d, or GELU/SiLU/LeakyReLU -> Conv1d, in a
`convmem.nn.FusedNormActConv`, which keeps only the first input of each such chain and rebuilds
the rest in backward (NOTE [Norm-activation-conv chains]; plain PyTorch, no Triton needed). And
every nn.MaxPool1d runs as a `convmem.nn.CompactMaxPool1d`, keeping an int8 window offset per
output instead of its input and int64 indices (NOTE [Compact max-pool]).
Outputs and gradients are those of the untouched model up to floating-point reassociation, and
``state_dict()`` keys are unchanged. ``convmem.restore_(model)`` undoes it.

# NOTE [Which convs are fused]
# `filter_fn(module, fqn)` is asked about every nn.Conv1d (default: all). Of those chosen:
# * fused: groups == in_channels, out_channels / in_channels <= max_depth_multiplier (default 1:
#   one filter per channel), padding_mode 'zeros', the plain Conv1d forward, no forward hooks
#   (the kernel would bypass them) and a floating dtype;
# * left alone silently under the default filter: convs that are not depthwise (groups !=
#   in_channels), and single-input-channel convs with several outputs (a dense conv of a mono
#   signal, not a depthwise layer); with a filter_fn that chose them, with a warning;
# * left alone with a warning, always: depthwise convs that fail another condition.
# Convs already inside a FusedDepthwiseConv1d are skipped; convs inside other convmem wrappers
# (Checkpointed, Tiled) are fused in place, which those wrappers run as any other module.
#
# NOTE [Which activations are fused]
# The activation must be the conv's only consumer, which convmem can know only from structure: the
# conv and the next module are items of one nn.Sequential that runs Sequential's own forward, each
# registered once in the model (a shared module may be called elsewhere), and the next module is
# exactly nn.ReLU, nn.SiLU or nn.GELU(approximate='none') without hooks. Activations called from a
# custom forward (conformer's BatchNorm then SiLU, Conv-TasNet's PReLU) are left as they are by
# the kernel (conformer's BatchNorm -> SiLU -> pointwise conv is a chain: the NOTE below).
#
# NOTE [Which blocks get fused chains]
# Every module but the root with an nn.Conv1d among its direct children or the items of its
# ModuleLists (a residual block, an nn.Sequential) has its forward traced with torch.fx, its
# submodules as leaves; the chains found (NOTE [Norm-activation-conv chains] in
# nn/fused_norm_conv.py) whose conv `filter_fn` accepts make it a `FusedNormActConv`. A forward fx cannot trace, or without a chain,
# is left as it is without a word: most modules have none. Modules inside another convmem wrapper
# are not traced (the wrapper runs its own way), nor modules registered under two names. When
# blocks nest, the outermost with a chain is wrapped. The root itself cannot be replaced in place:
# ``model = convmem.nn.FusedNormActConv(model)`` wraps it.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, Optional, Set

import torch
from torch import nn

from ..kernels.depthwise import kernels_usable, triton_available
from ..nn._wrapper import ModuleWrapper
from ..nn.compact_pool import compact_pools
from ..nn.fused_depthwise import FusedActivation, FusedDepthwiseConv1d, activation_name, fusable_reason
from ..nn.fused_norm_conv import FusedNormActConv, NoChainError
from ._common import (
    ConfigDict,
    FilterFn,
    check_filter_fn,
    check_model,
    module_aliases,
    swap_modules,
    warn_nothing_selected,
    warn_skipped,
)

__all__ = ["FuseConfig", "fuse_", "chain_wrappers"]

_STRATEGY = "fuse_"


@dataclasses.dataclass(frozen=True)
class FuseConfig(ConfigDict):
    """``activations``: fold a following ReLU/GELU/SiLU into the kernel (NOTE [Which activations are
    fused]); ``max_depth_multiplier``: the most filters per input channel a fused conv may have;
    ``norm_act_conv``: fuse [BatchNorm ->] activation -> Conv1d chains (NOTE [Which blocks get fused
    chains]); ``pools``: run max-pools with int8 window offsets (NOTE [Compact max-pool])."""

    activations: bool = True
    max_depth_multiplier: int = 1
    norm_act_conv: bool = True
    pools: bool = True

    def __post_init__(self) -> None:
        for name in ("activations", "norm_act_conv", "pools"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{_STRATEGY}: {name} must be a bool, got {getattr(self, name)!r}")
        m = self.max_depth_multiplier
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"{_STRATEGY}: max_depth_multiplier must be a positive integer, got {m!r}")


def _is_depthwise_layer(conv: nn.Conv1d) -> bool:
    return conv.groups == conv.in_channels and (conv.in_channels > 1 or conv.out_channels == 1)


def _following_activation(model: nn.Module, name: str, aliases: Dict[int, list]) -> Optional[str]:
    """The name of the activation to fold into the conv `name`, or None (NOTE [Which activations are fused])."""
    conv = model.get_submodule(name)
    if len(aliases[id(conv)]) != 1:
        return None
    parent_name, _, key = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return None
    keys = list(parent._modules)
    index = keys.index(key)
    if index + 1 >= len(keys):
        return None
    act = parent._modules[keys[index + 1]]
    if act is None or activation_name(act) is None or len(aliases[id(act)]) != 1:
        return None
    if act._forward_hooks or act._forward_pre_hooks:
        return None
    return f"{parent_name}.{keys[index + 1]}" if parent_name else keys[index + 1]


def fuse_(
    model: nn.Module,
    filter_fn: Optional[FilterFn] = None,
    activations: bool = True,
    max_depth_multiplier: int = 1,
    norm_act_conv: bool = True,
    pools: bool = True,
) -> nn.Module:
    """Run the depthwise convs of `model` (and a following activation) by fused kernels, its
    [BatchNorm ->] activation -> Conv1d chains fused and its max-pools compact, in place; returns `model`.

    Args:
        model: any ``nn.Module``; its depthwise ``nn.Conv1d`` take ``x: (batch, channels, length)``.
        filter_fn: ``filter_fn(conv, fqn) -> bool`` chooses among the ``nn.Conv1d`` modules; default
            all (NOTE [Which convs are fused]).
        activations: also fold a ReLU, GELU (exact) or SiLU that follows a fused conv in an
            ``nn.Sequential`` into its kernel (NOTE [Which activations are fused]).
        max_depth_multiplier: fuse convs with up to this many filters per input channel.
        norm_act_conv: also run BatchNorm1d -> ReLU/GELU/SiLU/LeakyReLU -> Conv1d and
            GELU/SiLU/LeakyReLU -> Conv1d chains of the blocks' forwards fused, keeping only each
            chain's first input (NOTE [Which blocks get fused chains]); `filter_fn` is asked
            about the chain's Conv1d.
        pools: also run every ``nn.MaxPool1d`` as a `convmem.nn.CompactMaxPool1d`, which keeps an
            int8 window offset per output for backward instead of its input and int64 indices
            (NOTE [Compact max-pool]; eagerly and under torch.compile).

    Exact: outputs, gradients and buffers agree with the untouched model up to rounding, and
    ``state_dict()`` keys and values are unchanged. ``convmem.restore_(model)`` undoes it.
    Without Triton or a GPU the fused depthwise modules run the PyTorch reference (same numbers,
    nothing saved), and this warns. Depthwise convs that cannot be fused are left untouched with a
    warning. Fused chains need neither Triton nor a GPU.

    Example::

        >>> model = convmem.zoo.get("conformer_conv", size="default", device="cuda").model
        >>> convmem.fuse_(model)              # 16 depthwise k=31 convs -> FusedDepthwiseConv1d
        >>> model = convmem.restore_(model)   # the original convs again
    """
    check_model(model, _STRATEGY)
    check_filter_fn(filter_fn, _STRATEGY)
    config = FuseConfig(activations=activations, max_depth_multiplier=max_depth_multiplier,
                        norm_act_conv=norm_act_conv, pools=pools)
    # first: the chains' traced forwards then call the compact pools
    pooled = compact_pools(model) if config.pools else {}
    swap_modules(model, pooled)

    chosen: Dict[str, nn.Conv1d] = {}
    skipped: Dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv1d):
            continue
        parent_name = name.rpartition(".")[0]
        if name.endswith("wrapped") and isinstance(model.get_submodule(parent_name), FusedDepthwiseConv1d):
            continue  # fused already
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if not name:
            raise ValueError(f"{_STRATEGY}: the model itself is a {type(module).__name__} and cannot be replaced in "
                             "place; use convmem.nn.FusedDepthwiseConv1d.from_conv1d(conv)")
        reason = fusable_reason(module, config.max_depth_multiplier)
        if reason is None:
            chosen[name] = module
        elif filter_fn is not None or _is_depthwise_layer(module):
            skipped[name] = reason
    if chosen:
        _warn_if_reference_only(model)
        aliases = module_aliases(model)
        replacements: Dict[str, nn.Module] = {}
        for name, conv in chosen.items():
            act_name = _following_activation(model, name, aliases) if config.activations else None
            act = model.get_submodule(act_name) if act_name else None
            replacements[name] = FusedDepthwiseConv1d.from_conv1d(conv, activation_name(act) if act is not None else None)
            if act is not None:
                replacements[act_name] = FusedActivation(act)
        swap_modules(model, replacements)
    chained = _fuse_chains(model, filter_fn) if config.norm_act_conv else set()
    # a conv filter_fn chose for its chain is not one the depthwise pass left out
    chain_note = "; nor is it the conv of an activation chain it could fuse" if config.norm_act_conv else ""
    warn_skipped(_STRATEGY, {n: r + (chain_note if r.startswith("not depthwise") else "")
                             for n, r in skipped.items() if n not in chained})
    if not chosen and not chained and not pooled:
        detail = f" ({len(skipped)} depthwise Conv1d could not be fused)" if skipped else ""
        warn_nothing_selected(model, _STRATEGY, filter_fn is not None, detail)
    return model


def _chain_candidate(module: nn.Module) -> bool:
    # an activation may be a functional call: any module that may call an nn.Conv1d of its own
    # (a child, or an item of a ModuleList or ModuleDict child) is traced
    if isinstance(module, (ModuleWrapper, nn.ModuleList, nn.ModuleDict)):
        return False
    owned = [c for child in module.children()
             for c in (child.children() if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child])]
    return any(isinstance(c, nn.Conv1d) for c in owned)


def _conv_filter(filter_fn: Optional[FilterFn], block: nn.Module, prefix: str) -> Optional[Callable[[str], bool]]:
    """`filter_fn` asked about a conv of `block` by its name in `block` (`block` is `prefix` in the model)."""
    if filter_fn is None:
        return None
    return lambda conv_name: bool(filter_fn(block.get_submodule(conv_name),
                                            f"{prefix}.{conv_name}" if prefix else conv_name))


def chain_wrappers(model: nn.Module, filter_fn: Optional[FilterFn] = None,
                   include_root: bool = False) -> Dict[str, FusedNormActConv]:
    """A `FusedNormActConv` for every outermost module of `model` with fusable chains, by name
    (NOTE [Which blocks get fused chains]); nothing is swapped. With `include_root` `model` itself
    is tried too, under the name ``""`` (`convmem.optimize_` fuses the chains of one block)."""
    aliases = module_aliases(model)
    inside_wrappers = [n for n, m in model.named_modules() if n and isinstance(m, ModuleWrapper)]
    found: Dict[str, FusedNormActConv] = {}
    for name, module in model.named_modules():
        if (not name and not include_root) or not _chain_candidate(module) or len(aliases[id(module)]) != 1:
            continue
        if name and any(name.startswith(w + ".") for w in inside_wrappers):
            continue
        try:
            found[name] = FusedNormActConv(module, _conv_filter(filter_fn, module, name))
        except NoChainError:
            continue  # most modules have none
    if "" in found:
        return {"": found[""]}
    return {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found if o != n)}


def _fuse_chains(model: nn.Module, filter_fn: Optional[FilterFn]) -> Set[str]:
    """Wrap every block with fusable chains (NOTE [Which blocks get fused chains]); the names of the
    convs fused, as they were before (NOTE [Wrappers keep the state_dict]: without ``wrapped.``)."""
    outermost = chain_wrappers(model, filter_fn)
    swap_modules(model, outermost)
    return {f"{name}.{conv}" for name, block in outermost.items() for conv in block.convs}


def _warn_if_reference_only(model: nn.Module) -> None:
    if not triton_available():
        why = "Triton is not installed (pip install triton)"
    elif torch.cuda.is_available() or kernels_usable("cpu"):
        return  # kernels_usable("cpu"): Triton's interpreter (tests)
    else:
        why = "no CUDA device is available"
    warnings.warn(
        f"{_STRATEGY}: {why}: the fused convs of {type(model).__name__} will run the plain-PyTorch reference "
        "(same numbers, no memory saved) until they run on a GPU with Triton",
        stacklevel=3,
    )
