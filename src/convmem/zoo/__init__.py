"""Reference Conv1d workloads: the eight architectures of shared/WORKLOADS.md.

Each is rebuilt from its published configuration with random weights (nothing is downloaded) and
comes as a `ZooEntry`: the model, a realistic input, and a training loss.

Example::

    >>> from convmem import zoo
    >>> entry = zoo.get("wavenet", dtype=torch.float64)          # small input, for CPU tests
    >>> entry.loss_fn(entry.model(*entry.inputs)).backward()
    >>> zoo.get("wavenet", size="default", device="meta").inputs[0].shape
    torch.Size([8, 1, 16384])
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from convmem._checks import positive_int
from convmem.zoo import basenji, conformer_conv, convtasnet, hifigan, resnet1d, tcn, w2v2_fe, wavenet
from convmem.zoo._entry import ZooEntry
from convmem.zoo._workload import Workload

__all__ = ["ZooEntry", "get", "names"]

_WORKLOADS: Dict[str, Workload] = {
    module.WORKLOAD.name: module.WORKLOAD
    for module in (tcn, wavenet, w2v2_fe, convtasnet, hifigan, resnet1d, conformer_conv, basenji)
}
_SIZES = ("small", "default")


def names() -> Tuple[str, ...]:
    """Names of the zoo architectures, in the order of shared/WORKLOADS.md."""
    return tuple(_WORKLOADS)


def get(
    name: str,
    size: str = "small",
    *,
    batch: Optional[int] = None,
    length: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> ZooEntry:
    """Build the zoo architecture `name` with an input of the given size.

    size: "default" is the WORKLOADS.md input (the scale users train at, for GPU benchmarks);
        "small" is the same model on a short input that runs forward and backward in well under a
        second on a CPU in float64.
    batch, length: override the input's batch and length (its last axis, in the input's own unit:
        samples, mel frames for hifigan, bases for basenji).
    device: where the model and input live (default CPU). On "meta" nothing is allocated: shapes and
        dtypes are exact, values are absent. Elsewhere weights (from `torch.manual_seed(seed)`, with
        the global RNG state restored afterwards) and inputs (from a `torch.Generator` seeded with
        `seed`) are drawn on the CPU and moved, so they are the same on every device.
    dtype: floating dtype of the model and input (default: torch's default dtype).
    model_kwargs: passed to the model class, e.g. ``get("w2v2_fe", norm="layer")``; one that sets
        the model's input channels (``leads``, ``mels``, conformer's ``channels``) sets the input's.

    Raises ValueError for an unknown name, size, or a length below the architecture's minimum,
    TypeError for a keyword the model class does not take.
    """
    workload = _lookup(name)
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of: {', '.join(_SIZES)}")
    shape = list(workload.default_shape if size == "default" else workload.small_shape)
    if batch is not None:
        shape[0] = positive_int(batch, "batch")
    if length is not None:
        shape[-1] = positive_int(length, "length")
    if shape[-1] < workload.min_length:
        raise ValueError(f"{name} needs length >= {workload.min_length}, got {shape[-1]}")
    _check_model_kwargs(workload, model_kwargs)
    if workload.channels_kwarg is not None and workload.channels_kwarg in model_kwargs:
        shape[1] = model_kwargs[workload.channels_kwarg]
    device = torch.device("cpu" if device is None else device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")

    if device.type == "meta":
        with torch.device("meta"):
            model = workload.model_cls(**model_kwargs)
        x = torch.empty(shape, device="meta")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = workload.model_cls(**model_kwargs)
        x = workload.make_input(tuple(shape), torch.Generator().manual_seed(seed))
    model.to(device=device, dtype=dtype)

    container = model.get_submodule(workload.blocks)
    return ZooEntry(
        name=name,
        model=model,
        inputs=(x.to(device=device, dtype=dtype),),
        loss_fn=workload.loss_fn,
        blocks=tuple(f"{workload.blocks}.{child}" for child, _ in container.named_children()),
        chain=workload.blocks if isinstance(container, nn.Sequential) else None,
        sample_rate=workload.sample_rate,
        description=workload.description,
    )


def _lookup(name: str) -> Workload:
    try:
        return _WORKLOADS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(_WORKLOADS)}") from None


def _check_model_kwargs(workload: Workload, model_kwargs: Dict[str, Any]) -> None:
    accepted = inspect.signature(workload.model_cls).parameters
    unexpected = sorted(set(model_kwargs) - set(accepted))
    if unexpected:
        raise TypeError(
            f"{workload.name}: {workload.model_cls.__name__} got unexpected keyword argument(s) "
            f"{', '.join(unexpected)}; it accepts: {', '.join(accepted)}"
        )
