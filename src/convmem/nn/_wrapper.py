"""The base of every convmem wrapper module, and how wrappers are put in and taken out.

# NOTE [Wrappers keep the state_dict]
# A wrapper holds the original module as ``self.wrapped``, which would add ``wrapped.`` to every
# key of ``state_dict()``. Exact strategies promise unchanged keys (DESIGN.md, invariant 3), so
# `ModuleWrapper` strips that prefix when saving and puts it back when loading: a checkpoint saved
# from an optimized model loads into the original model and back. ``restore_`` swaps every
# wrapper for the module it wraps.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

import torch
from torch import nn

from ..analysis import trace as _trace

_PREFIX = "wrapped."


def _strip_prefix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(_PREFIX):]] = state_dict.pop(key)
    return state_dict


def _add_prefix(state_dict, prefix, *args, **kwargs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


class ModuleWrapper(nn.Module):
    """A module that runs ``self.wrapped`` differently (checkpointed, tiled, ...) with the same numbers.

    Subclasses override ``forward``; ``state_dict`` keys are those of the wrapped module.
    """

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - subclasses override
        return self.wrapped(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""


class CheckedWrapper(ModuleWrapper):
    """A `ModuleWrapper` for the modules its ``reason_of`` finds no reason against: the constructor
    refuses any other, saying ``"<class>: cannot <cannot>: <reason>"``.

    Subclasses set ``reason_of`` (a ``staticmethod``: module -> the reason, or None) and ``cannot``.
    """

    cannot = "wrap this module"  # what a refusal says the wrapper cannot do

    @staticmethod
    def reason_of(module: nn.Module) -> Optional[str]:  # pragma: no cover - subclasses override
        return None

    def __init__(self, wrapped: nn.Module):
        reason = self.reason_of(wrapped)
        if reason is not None:
            raise ValueError(f"{type(self).__name__}: cannot {self.cannot}: {reason}")
        super().__init__(wrapped)


class Conv1dComputedAnotherWay(CheckedWrapper):
    """A `CheckedWrapper` of an ``nn.Conv1d`` that computes it another way (``convolve``, on a
    batched input); unbatched inputs are batched around it. While a length trace runs (tiling's
    receptive-field analysis, which follows Conv1d calls) the Conv1d itself runs: the same numbers.
    """

    def convolve(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - subclasses override
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _trace.is_active():
            return self.wrapped(x)
        unbatched = x.dim() == 2
        out = self.convolve(x.unsqueeze(0) if unbatched else x)
        return out.squeeze(0) if unbatched else out


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `model.get_submodule(name)` is; `name` may not be the root ("")."""
    if not name:
        raise ValueError("the root module cannot be replaced in place; wrap it instead")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def unwrap(module: nn.Module) -> nn.Module:
    """The original module inside any number of convmem wrappers."""
    while isinstance(module, ModuleWrapper):
        module = module.wrapped
    return module


def restore_(model: nn.Module) -> nn.Module:
    """Undo every convmem strategy on `model` in place: each wrapper gives way to what it wraps.

    Returns the model (the same object), unless the root itself is a wrapper: then the wrapped
    root is returned. Example: ``model = convmem.restore_(model)``.
    """
    while True:
        names = [name for name, m in model.named_modules() if name and isinstance(m, ModuleWrapper)]
        if not names:
            return unwrap(model)
        # Outermost first: its name stays valid, and what it wraps may hold more wrappers.
        name = min(names, key=lambda n: n.count("."))
        replace_submodule(model, name, unwrap(model.get_submodule(name)))


def swappable(model: nn.Module, wrapper: Type[CheckedWrapper]) -> Dict[str, nn.Module]:
    """A `wrapper` around every module of `model` that its ``reason_of`` finds no reason against and
    that no `wrapper` wraps already, by name; nothing is swapped (``swap_modules`` does that)."""
    inside = {id(m.wrapped) for m in model.modules() if isinstance(m, wrapper)}
    return {name: wrapper(module) for name, module in model.named_modules()
            if name and id(module) not in inside and wrapper.reason_of(module) is None}


def wrapper_state(model: nn.Module) -> Dict[str, str]:
    """``{qualified name: wrapper class}`` for every convmem wrapper in `model`."""
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, ModuleWrapper)}
