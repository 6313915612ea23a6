"""Finding a model's repeated blocks from its structure alone (no input, no forward).

Strategies that act block by block (checkpointing; tiling may reuse it) need the modules a person
would name: the 16 residual blocks of a TCN, the 24 layers of a WaveNet, the 8 basic blocks of a
ResNet -- whatever the model calls them and however it stores them.

# NOTE [Repeated blocks]
# A *block* is a module of a class that is not PyTorch's own (its class is defined outside
# ``torch.``: a ``TCNBlock``, a third-party ``ResBlock1``; not ``nn.Conv1d`` or ``nn.GELU``, nor a
# subclass of a PyTorch layer such as a ``CausalConv1d(nn.Conv1d)``, though a subclass of a
# container such as a ``ConvNormAct(nn.Sequential)`` is one), and that holds parameters (a
# parameter-free custom activation is not worth a checkpoint of its own). Convmem wrappers are seen
# through: a wrapped block is still a block.
#
# Blocks come in *groups*:
#   * the blocks among the children of one container (``self.blocks = nn.Sequential(...)``,
#     ``nn.ModuleList``), whatever else the container holds;
#   * two or more same-class blocks that are direct children of one ordinary module (blocks held
#     as attributes: ``self.block1``, ``self.block2``).
# Groups of the same kind whose blocks have the same set of classes are one group: the stages of
# a torchvision-style ResNet each hold a Sequential of BasicBlocks, and all of them are checkpointed,
# not the first stage's. A block inside another block of its group is dropped (the outer one
# covers it).
#
# The winner covers the most parameter tensors -- a proxy for the layers whose activations are
# kept, so the group that leaves the least of the model outside wins: Basenji's trunk (7 conv
# blocks and 11 residual blocks) over the pairs of conv blocks inside each residual block, HiFi-GAN's
# 4 upsampling stages over the 12 resblocks inside them (the stages also cover the upsampling
# convolutions). Ties go to the group with more blocks (finer recompute), then the shallower, then
# the first in definition order. At least two blocks, or there is no group.
#
# A model without blocks may still be a chain of plain layers, ``nn.Sequential(Conv1d, BatchNorm1d,
# ReLU, Conv1d, ...)``: `find_chain` names the non-root Sequential with the most items that hold
# parameters. Cutting it into segments needs the bytes each item keeps, so only a caller with
# example inputs uses it.
"""
from __future__ import annotations

import collections
from typing import Dict, FrozenSet, List, Optional, Tuple

from torch import nn

from ..nn._wrapper import unwrap

__all__ = ["find_blocks", "find_chain", "is_block"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_BASES = (nn.Module,) + _CONTAINERS


def is_block(module: nn.Module) -> bool:
    """A module of a class not from ``torch.`` that holds parameters: NOTE [Repeated blocks]."""
    module = unwrap(module)
    # A subclass of a PyTorch layer (a CausalConv1d(nn.Conv1d)) is still a layer; one of a
    # container (a ConvNormAct(nn.Sequential)) groups layers, as a block does.
    mro = type(module).__mro__[:-1]  # without object
    from_torch = [c for c in mro if c.__module__.startswith("torch.")]
    if mro[0] in from_torch or any(c not in _BASES for c in from_torch):
        return False
    return next(module.parameters(), None) is not None


def find_blocks(model: nn.Module) -> List[str]:
    """Qualified names of the model's repeated blocks (NOTE [Repeated blocks]); ``[]`` if none.

    Example::

        >>> find_blocks(convmem.zoo.get("tcn").model)[:2]
        ['blocks.0', 'blocks.1']
    """
    groups: Dict[Tuple[str, FrozenSet[type]], List[str]] = collections.defaultdict(list)
    for name, module in model.named_modules():
        children = [(_join(name, child_name), unwrap(child)) for child_name, child in module.named_children()]
        blocks = [(fqn, child) for fqn, child in children if is_block(child)]
        if isinstance(unwrap(module), _CONTAINERS):
            if blocks:
                groups[("container", frozenset(type(b) for _, b in blocks))].extend(fqn for fqn, _ in blocks)
            continue
        by_class: Dict[type, List[str]] = collections.defaultdict(list)
        for fqn, child in blocks:
            by_class[type(child)].append(fqn)
        for cls, names in by_class.items():
            if len(names) >= 2:
                groups[("siblings", frozenset({cls}))].extend(names)

    best: Optional[Tuple[tuple, List[str]]] = None
    for position, names in enumerate(groups.values()):
        names = _outermost(names)
        if len(names) < 2:
            continue
        covered = {id(p) for n in names for p in model.get_submodule(n).parameters()}
        depth = min(n.count(".") for n in names)
        score = (len(covered), len(names), -depth, -position)
        if best is None or score > best[0]:
            best = (score, names)
    return best[1] if best is not None else []


def find_chain(model: nn.Module) -> Optional[str]:
    """The non-root ``nn.Sequential`` (own forward unchanged) with the most items that hold parameters.

    None when no such Sequential has two. For models of plain layers: NOTE [Repeated blocks].
    """
    best: Optional[Tuple[int, str]] = None
    for name, module in model.named_modules():
        if not name or not is_plain_sequential(module):
            continue
        with_params = sum(next(item.parameters(), None) is not None for item in module)
        if with_params >= 2 and (best is None or with_params > best[0]):
            best = (with_params, name)
    return best[1] if best is not None else None


def is_plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's: calling it runs its items in order, nothing else."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _outermost(names: List[str]) -> List[str]:
    kept = []
    for name in dict.fromkeys(names):
        if not any(name.startswith(other + ".") for other in names if other != name):
            kept.append(name)
    return kept
