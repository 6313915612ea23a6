"""Offloading saved tensors to host memory (exact): ``convmem.offload_(model)``.

Wraps the model's repeated blocks (NOTE [Repeated blocks]), or the modules a ``filter_fn`` picks,
in `convmem.nn.Offloaded`, all sharing one `OffloadGroup`: between forward and backward their
large saved tensors live in pinned host memory, and backward copies each block's back while the
block after it (in forward order) computes its gradients (NOTE [Offload prefetch]). Outputs,
gradients and buffers stay bitwise those of the untouched model (DESIGN.md, invariants 1, 3, 4);
``convmem.restore_(model)`` takes the wrappers out again.

It pays when the PCIe time of a block's saved bytes (about 25 GB/s each way on PCIe 4, 50 on
PCIe 5) is shorter than the block's backward compute: see docs/offload.md.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..nn.offloaded import DEFAULT_MIN_BYTES, OffloadGroup, Offloaded, check_min_bytes, check_prefetch
from ._blocks import find_blocks
from ._common import (
    ConfigDict, FilterFn, check_filter_fn, check_model, filter_selected, swap_modules, warn_skipped, wrappable,
)

__all__ = ["OffloadConfig", "offload_"]

_STRATEGY = "offload_"


@dataclasses.dataclass(frozen=True)
class OffloadConfig(ConfigDict):
    """``min_bytes``: storages smaller than this stay on the device (NOTE [What is offloaded]);
    ``prefetch``: how many blocks before the one backward reached are copied back early
    (NOTE [Offload prefetch])."""

    min_bytes: int = DEFAULT_MIN_BYTES
    prefetch: int = 1

    def __post_init__(self) -> None:
        check_min_bytes(self.min_bytes, _STRATEGY)
        check_prefetch(self.prefetch, _STRATEGY)


def offload_(
    model: nn.Module,
    filter_fn: Optional[FilterFn] = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    prefetch: int = 1,
) -> nn.Module:
    """Offload the saved tensors of `model`'s repeated blocks to pinned host memory (exact); returns `model`.

    Args:
        model: any ``nn.Module`` on a CUDA device; typically ``x: (batch, channels, length)``
            through Conv1d blocks. On the CPU it changes nothing but the module tree.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks the modules to offload (the outermost
            of nested picks). Default: the model's repeated blocks (NOTE [Repeated blocks]).
        min_bytes: storages smaller than this stay on the device (default 1 MiB).
        prefetch: blocks before the one backward reached that are copied back early (default 1).

    All wrappers share one `OffloadGroup`, that of Offloaded modules already in the model if
    there are any, so that separate calls still prefetch for each other. A `Checkpointed` or `Tiled`
    module can be offloaded: its saved inputs then wait in host memory (NOTE [Offload and other
    saved-tensor hooks]). Modules that cannot be offloaded (the root, modules already offloaded or
    inside another convmem wrapper) are left untouched with a warning naming them. If nothing is selected, a warning names the model and the model is
    unchanged. Invalid arguments raise before anything changes.

    Example::

        >>> entry = convmem.zoo.get("tcn", "default", device="cuda")
        >>> convmem.offload_(entry.model)
        >>> entry.loss_fn(entry.model(*entry.inputs)).backward()   # same gradients, less kept on the GPU
        >>> model = convmem.restore_(entry.model)
    """
    check_model(model, _STRATEGY)
    check_filter_fn(filter_fn, _STRATEGY)
    config = OffloadConfig(min_bytes=min_bytes, prefetch=prefetch)

    names = _select(model, filter_fn)
    if names is None:
        return model
    names, skipped = _offloadable(model, names)
    warn_skipped(_STRATEGY, skipped)
    if not names:
        return model
    group = next((m.group for m in model.modules() if isinstance(m, Offloaded)), None)
    if group is None:
        group = OffloadGroup(prefetch=config.prefetch)
    elif group.prefetch != config.prefetch:
        warnings.warn(
            f"{_STRATEGY}: joining the OffloadGroup of the Offloaded modules already in {type(model).__name__}, "
            f"which prefetches {group.prefetch}, not {config.prefetch}",
            stacklevel=2,
        )
    replacements: Dict[str, nn.Module] = {
        name: Offloaded(model.get_submodule(name), min_bytes=config.min_bytes, group=group) for name in names
    }
    swap_modules(model, replacements)
    return model


def _select(model: nn.Module, filter_fn: Optional[FilterFn]) -> Optional[List[str]]:
    """Names of the modules to offload (outermost only); None (after a warning) when there are none."""
    if filter_fn is not None:
        return filter_selected(model, filter_fn, _STRATEGY) or None
    names = find_blocks(model)
    if not names:
        warnings.warn(
            f"{_STRATEGY}: found no repeated blocks in {type(model).__name__} (NOTE [Repeated blocks] in "
            "convmem/strategies/_blocks.py); pass filter_fn=... to choose modules; the model is unchanged",
            stacklevel=3,
        )
        return None
    return names


def _offloadable(model: nn.Module, names: List[str]) -> Tuple[List[str], Dict[str, str]]:
    # Inside a Checkpointed or Tiled module nothing is kept to offload; the wrapper itself can be
    # offloaded (its inputs): NOTE [Offload and other saved-tensor hooks].
    return wrappable(model, names, Offloaded, "already offloaded",
                     ", which keeps nothing there; offload the wrapper instead")
