"""Exact length tiling: ``convmem.tile_(model, tile_length)``.

Wraps the largest length-local submodules of a model (or those a ``filter_fn`` picks) in
`convmem.nn.Tiled`: they then run tile by tile, forward and backward, with outputs and gradients
equal to the untouched model (DESIGN.md "Exact length tiling"); ``convmem.restore_(model)`` takes
the wrappers out again.

# NOTE [Which modules are tiled]
# Tiling a module keeps its input and output at full length and nothing inside it, so the gain is
# largest for the largest local modules, and nil for a single layer. Without a filter_fn, the
# search goes top-down from the root's children: a module is tiled when it is length-local and
# holds at least two layers; otherwise its children are searched. The root itself is never
# replaced (that cannot happen in place, as for checkpoint_): wrap a whole local model yourself,
# ``model = convmem.nn.Tiled(model, tile_length)``.
# Locality is decided, with example inputs, by the length analysis of each module on the inputs
# it receives in a meta-device run of the model (exact: functional calls in a custom forward
# count); without them, by the layer types alone (BatchNorm in train mode, GroupNorm, circular
# padding, recurrences, attention, adaptive pooling, an active Dropout), and the `Tiled` wrapper
# then analyses and verifies the module at its first call, warning and running it untiled if it is
# not local after all (DESIGN.md, invariant 5).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..analysis.receptive_field import analyse, known_refusal
from ..nn._wrapper import ModuleWrapper
from ..nn.tiled import Tiled, _parameter_layers, check_batch_chunk, check_forward_tile_length, check_tile_length
from ..profile.estimate import meta_clone, to_meta
from ._common import ConfigDict, FilterFn, as_inputs, check_filter_fn, check_model, swap_modules, warn_skipped

__all__ = ["TileConfig", "tile_"]

_STRATEGY = "tile_"
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


@dataclasses.dataclass(frozen=True)
class TileConfig(ConfigDict):
    """``tile_length``: input samples per tile (rounded down to each module's alignment period);
    ``length_axis``: the time axis of the modules' inputs; ``verify``: check each tiling against
    the untiled module at its first call (NOTE [Verify before use] in convmem/nn/tiled.py);
    ``forward_tile_length``: input samples per forward window (None: a multiple of `tile_length`
    growing with each module's depth, NOTE [Forward windows]); ``batch_chunk``: samples per backward
    recomputation (None: the whole batch, NOTE [Batch chunks]); ``cuda_graphs``: replay each window
    shape from a CUDA graph (NOTE [Graphed windows] in convmem/nn/_window_graphs.py).

    Example: ``TileConfig.from_dict(TileConfig(4096).to_dict()) == TileConfig(4096)``.
    """

    tile_length: int
    length_axis: int = -1
    verify: bool = True
    forward_tile_length: Optional[int] = None
    batch_chunk: Optional[int] = None
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        try:
            check_tile_length(self.tile_length)
        except ValueError as error:
            raise ValueError(f"{_STRATEGY}: {error}") from None
        if isinstance(self.length_axis, bool) or not isinstance(self.length_axis, int):
            raise ValueError(f"{_STRATEGY}: length_axis must be an int, got {self.length_axis!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"{_STRATEGY}: verify must be True or False, got {self.verify!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"{_STRATEGY}: cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        try:
            check_forward_tile_length(self.forward_tile_length, self.tile_length)
            check_batch_chunk(self.batch_chunk)
        except ValueError as error:
            raise ValueError(f"{_STRATEGY}: {error}") from None


def tile_(
    model: nn.Module,
    tile_length: Union[int, TileConfig],
    filter_fn: Optional[FilterFn] = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Tile the largest length-local submodules of `model` in place (exact); returns `model`.

    Args:
        model: any ``nn.Module`` over sequences, ``x: (batch, channels, length)`` or
            ``(batch, length)``, typically Conv1d stacks.
        tile_length: input samples per tile (each module's own input), or a `TileConfig`.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks the modules to tile (the outermost of
            nested picks). Picked modules that are not length-local are left untouched with a
            warning naming them and the reason. Default: NOTE [Which modules are tiled].
        example_inputs: a tensor or tuple of the model's positional arguments; with them locality
            is decided by the exact length analysis (on the meta device: no memory, no GPU).

    If nothing can be tiled, a warning names the model and it is unchanged. Invalid arguments raise
    before anything changes. BatchNorm is local in eval mode only: call ``model.eval()`` first for
    inference, or tile the parts between norms.

    Example::

        >>> entry = convmem.zoo.get("tcn")
        >>> convmem.tile_(entry.model, 4096, example_inputs=entry.inputs)   # wraps entry.model.blocks
        >>> entry.loss_fn(entry.model(*entry.inputs)).backward()           # same gradients, less memory
        >>> model = convmem.restore_(entry.model)
    """
    check_model(model, _STRATEGY)
    check_filter_fn(filter_fn, _STRATEGY)
    config = tile_length if isinstance(tile_length, TileConfig) else TileConfig(tile_length)
    inputs = as_inputs(example_inputs, _STRATEGY)
    locality = _Locality(model, inputs, config.length_axis)

    skipped: Dict[str, str] = {}
    if filter_fn is not None:
        names = _picked(model, filter_fn, locality, skipped)
    else:
        names = _search(model, "", locality, skipped)
    if not names and any(isinstance(m, Tiled) for m in model.modules()) and filter_fn is None:
        return model  # tiled already: tile_ is idempotent
    if not names:
        warn_skipped(_STRATEGY, skipped)
        why = f": {locality.reason_for('')}" if locality.reason_for("") else ""
        warnings.warn(
            f"{_STRATEGY}: nothing in {type(model).__name__} can be tiled{why}; the model is unchanged", stacklevel=2
        )
        return model
    warn_skipped(_STRATEGY, {n: r for n, r in skipped.items() if filter_fn is not None or n == "<root>"})
    replacements = {
        name: Tiled(model.get_submodule(name), config.tile_length, forward_tile_length=config.forward_tile_length,
                    batch_chunk=config.batch_chunk, length_axis=config.length_axis, verify=config.verify,
                    on_refuse="warn", name=name, cuda_graphs=config.cuda_graphs)
        for name in names
    }
    swap_modules(model, replacements)
    return model


class _Locality:
    """Whether a submodule (by qualified name) is length-local: by analysis with inputs, else by type."""

    def __init__(self, model: nn.Module, inputs: Optional[Tuple[Any, ...]], axis: int):
        self.model, self.axis = model, axis
        self.reasons: Dict[str, Optional[str]] = {}
        self.calls: Optional[Dict[str, Tuple[tuple, dict]]] = None
        self.clone: Optional[nn.Module] = None
        if inputs is not None:
            self.clone = meta_clone(model)
            self.calls = {}
            names = {id(m): n for n, m in self.clone.named_modules()}

            def record(module, args, kwargs):
                self.calls.setdefault(names[id(module)], (args, kwargs))

            handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in self.clone.modules()]
            try:
                with torch.no_grad():
                    self.clone(*to_meta(tuple(inputs)))
            except Exception as error:
                raise ValueError(
                    f"{_STRATEGY}: {type(model).__name__} failed on the example inputs (run on the meta device): {error}"
                ) from error
            finally:
                for handle in handles:
                    handle.remove()

    def reason_for(self, name: str) -> Optional[str]:
        """None if the module `name` is length-local, else why not."""
        if name not in self.reasons:
            self.reasons[name] = self._reason(name)
        return self.reasons[name]

    def _reason(self, name: str) -> Optional[str]:
        module = self.model.get_submodule(name)
        refusal = known_refusal(module)
        if refusal is not None:
            where, kind, reason = refusal
            return f"not length-local: {_join(name, where)!r} ({kind}): {reason}"
        if self.calls is None:
            return None
        if name not in self.calls:
            return "not called by the model's forward on the example inputs"
        args, kwargs = self.calls[name]
        if not args or not isinstance(args[0], torch.Tensor) or args[0].ndim == 0:
            return "its first argument is not a sequence tensor"
        rf = analyse(self.clone.get_submodule(name), args[0], args[1:], kwargs, self.axis)
        if rf.local:
            return None
        return f"not length-local: {_join(name, rf.module or '')!r} ({rf.module_type}): {rf.reason}"


def _join(prefix: str, name: str) -> str:
    return ".".join(part for part in (prefix, name) if part) or "<root>"


def _layers(module: nn.Module) -> int:
    """Layers with parameters: tiling a module with one of them saves nothing."""
    return _parameter_layers(module)


def _search(model: nn.Module, name: str, locality: _Locality, skipped: Dict[str, str]) -> List[str]:
    """The largest local submodules under `name` holding two layers or more (NOTE [Which modules are tiled])."""
    found: List[str] = []
    module = model.get_submodule(name)
    for child_name, child in module.named_children():
        fqn = _join(name, child_name)
        if isinstance(child, Tiled) or _layers(child) < 2:
            continue
        if not isinstance(child, _CONTAINERS) and locality.reason_for(fqn) is None:
            found.append(fqn)
            continue
        if not isinstance(child, ModuleWrapper):
            found.extend(_search(model, fqn, locality, skipped))
    if not name and not found and locality.reason_for("") is None:
        skipped["<root>"] = (
            f"the root {type(model).__name__} is the only local module and cannot be replaced in place; wrap it "
            "instead: model = convmem.nn.Tiled(model, tile_length)"
        )
    return found


def _picked(model: nn.Module, filter_fn: FilterFn, locality: _Locality, skipped: Dict[str, str]) -> List[str]:
    names = [name for name, module in model.named_modules() if filter_fn(module, name)]
    names = [n for n in names if not any(o != n and (o == "" or n.startswith(o + ".")) for o in names)]
    keep = []
    for name in names:
        module = model.get_submodule(name)
        parts = name.split(".")
        ancestors = [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))] if name else []
        if not name:
            skipped["<root>"] = (
                f"the root {type(model).__name__} cannot be replaced in place; wrap it instead: "
                "model = convmem.nn.Tiled(model, tile_length)"
            )
        elif isinstance(module, Tiled) or any(isinstance(m, ModuleWrapper) for m in ancestors):
            skipped[name] = "already tiled or inside a convmem wrapper (convmem.restore_ undoes it)"
        elif isinstance(module, _CONTAINERS):
            skipped[name] = "a container without a forward of its own; pick the modules inside it"
        elif locality.reason_for(name) is not None:
            skipped[name] = locality.reason_for(name)
        else:
            keep.append(name)
    return keep
