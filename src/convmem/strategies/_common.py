"""What the strategies share: argument checks, config dicts, swapping modules with rollback, and,
for the lossy ones (depthwise-separable, downsampling), selecting convs and measuring what a swap
did to the model's outputs and memory.

# NOTE [Lossy strategies measure before they report]
# A lossy strategy is opt-in and must say what it cost (DESIGN.md, invariant 2). Given example
# inputs, the model runs once before and once after the change, in eval mode and without
# gradients, inside `preserved` (parameters, buffers and train/eval flags come back as they were):
# eval mode so that dropout and batch statistics add no noise of their own to the comparison, and
# so that BatchNorm running statistics are not updated by a measurement. The outputs give the SQNR
# of the whole model; a no-GPU estimate of one training step before and after gives the memory.
# Without example inputs only what the weights alone tell is reported.
#
# NOTE [Validate, then swap, then verify]
# Every argument is checked and every replacement module built before the model is touched. The
# swap then replaces each selected module under all the names it is registered under (a module
# shared by two parents is replaced in both). If the changed model then fails on the example
# inputs, every swap is undone before the error propagates: an error leaves the model as it was.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .._metrics import sqnr_db
from ..nn._wrapper import replace_submodule
from ..profile.estimate import estimate_step
from ..profile.measure import preserved

FilterFn = Callable[[nn.Module, str], bool]


def check_model(model: Any, strategy: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{strategy}: model must be an nn.Module, got {type(model).__name__}")


def check_filter_fn(filter_fn: Optional[FilterFn], strategy: str) -> None:
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{strategy}: filter_fn must be callable as filter_fn(module, fqn) -> bool, got {filter_fn!r}")


def as_inputs(example_inputs: Any, strategy: str) -> Optional[Tuple[Any, ...]]:
    """None, one tensor, or a tuple/list of the model's positional arguments -> a tuple or None."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(
        f"{strategy}: example_inputs must be a tensor or a non-empty tuple of the model's positional "
        f"arguments, got {type(example_inputs).__name__}"
    )


def has_plain_conv1d_forward(module: nn.Module) -> bool:
    """True when `module` computes exactly what nn.Conv1d does (a subclass may override forward)."""
    return isinstance(module, nn.Conv1d) and type(module).forward is nn.Conv1d.forward


def module_aliases(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every qualified name it is registered under, in definition order."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def filter_selected(model: nn.Module, filter_fn: FilterFn, strategy: str) -> List[str]:
    """The modules ``filter_fn(module, fqn)`` picks, the outermost of nested picks only; a warning
    naming the model when it picks none (the caller then leaves the model unchanged)."""
    names = [name for name, module in model.named_modules() if filter_fn(module, name)]
    names = [n for n in names if not any(n.startswith(o + ".") or (o == "" and n) for o in names if o != n)]
    if not names:
        warnings.warn(f"{strategy}: filter_fn selected no module of {type(model).__name__}; the model is unchanged",
                      stacklevel=4)
    return names


def wrappable(model: nn.Module, names: List[str], wrapper: type, done: str,
              inside: str) -> Tuple[List[str], Dict[str, str]]:
    """Split `names` into those a strategy can wrap in `wrapper` and {name: why not} (DESIGN.md,
    invariant 5): not the root (it cannot be replaced in place), not a module already wrapped in
    `wrapper` (`done` says so), not a module inside another convmem wrapper (`inside` says what to
    do instead; the wrapper itself can be wrapped)."""
    from ..nn._wrapper import ModuleWrapper

    keep, skipped = [], {}
    for name in names:
        if not name:
            skipped["<root>"] = (
                f"the root {type(model).__name__} cannot be replaced in place; wrap it instead: "
                f"model = convmem.nn.{wrapper.__name__}(model)"
            )
            continue
        parts = name.split(".")
        ancestors = [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
        outer = next((m for m in ancestors if isinstance(m, ModuleWrapper)), None)
        if isinstance(model.get_submodule(name), wrapper):
            skipped[name] = f"{done} (convmem.restore_ undoes it)"
        elif outer is not None:
            skipped[name] = f"inside a convmem {type(outer).__name__}{inside}"
        else:
            keep.append(name)
    return keep, skipped


def swap_modules(model: nn.Module, replacements: Dict[str, nn.Module]) -> Callable[[], None]:
    """Put each replacement in place of ``model.get_submodule(name)``, under all that module's names.

    Returns a function that undoes every swap. See NOTE [Validate, then swap, then verify].
    """
    aliases = module_aliases(model)
    done: List[Tuple[str, nn.Module]] = []
    for name, new in replacements.items():
        old = model.get_submodule(name)
        for alias in aliases[id(old)]:
            done.append((alias, old))
            replace_submodule(model, alias, new)

    def undo() -> None:
        for alias, old in reversed(done):
            replace_submodule(model, alias, old)

    return undo


@dataclasses.dataclass
class ForwardRecord:
    """One eval-mode forward: the output tensors, and per selected module its first call's lengths."""

    outputs: List[torch.Tensor]
    order: List[str]  # names of the watched modules in the order of their first call
    input_lengths: Dict[str, int]
    output_lengths: Dict[str, int]


def eval_forward(model: nn.Module, inputs: Sequence[Any], watch: Dict[str, nn.Module]) -> ForwardRecord:
    """Run `model` once in eval mode without gradients and leave it as it was.

    See NOTE [Lossy strategies measure before they report].
    """
    record = ForwardRecord([], [], {}, {})

    def hook(name: str):
        def on_call(module, args, output):
            if name not in record.input_lengths and args and isinstance(args[0], torch.Tensor):
                record.order.append(name)
                record.input_lengths[name] = args[0].shape[-1]
                record.output_lengths[name] = output.shape[-1]

        return on_call

    handles = [module.register_forward_hook(hook(name)) for name, module in watch.items()]
    try:
        with preserved(model), torch.no_grad():
            model.eval()
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    record.outputs = [t.detach() for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    return record


def output_sqnr_db(after: List[torch.Tensor], before: List[torch.Tensor]) -> Optional[float]:
    """SQNR of all outputs together, or None when any output's shape changed."""
    if len(after) != len(before) or any(a.shape != b.shape for a, b in zip(after, before)):
        return None
    floats = [(a, b) for a, b in zip(after, before) if b.is_floating_point()]
    if not floats:
        return None
    return sqnr_db(torch.cat([a.reshape(-1) for a, _ in floats]), torch.cat([b.reshape(-1) for _, b in floats]))


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes of one training step, from the no-GPU estimate (`convmem.profile.estimate_step`)."""

    saved_bytes: int  # everything autograd saves for backward
    peak_bytes: int  # estimated CUDA peak of the step
    kept_by_module: Dict[str, int]  # per module name, its calls and its children's together


def estimate_memory(model: nn.Module, inputs: Sequence[Any], strategy: str) -> Optional[MemoryEstimate]:
    """The step's memory, or None (with a warning) for a model the meta-device estimate cannot run."""
    try:
        estimate = estimate_step(model, inputs)
    except Exception as error:  # the estimate is a report column; the conversion stands without it
        warnings.warn(f"{strategy}: no memory estimate for {type(model).__name__}: {error}", stacklevel=3)
        return None
    kept: Dict[str, int] = {}
    for call in estimate.calls:
        parts = call.name.split(".") if call.name else []
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            kept[prefix] = kept.get(prefix, 0) + call.kept_bytes
    return MemoryEstimate(estimate.saved_bytes, estimate.peak_bytes, kept)


def warn_nothing_selected(model: nn.Module, strategy: str, filtered: bool, detail: str = "") -> None:
    who = "filter_fn selected" if filtered else "found"
    warnings.warn(
        f"{strategy}: {who} no Conv1d to change in {type(model).__name__}{detail}; the model is unchanged",
        stacklevel=3,
    )


def warn_skipped(strategy: str, skipped: Dict[str, str]) -> None:
    """One warning per reason, naming the modules left untouched (DESIGN.md, invariant 5)."""
    by_reason: Dict[str, List[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"{strategy}: left {shown} untouched: {reason}", stacklevel=3)


def fmt_db(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "exact" if math.isinf(value) and value > 0 else f"{value:.1f} dB"


class ConfigDict:
    """``to_dict``/``from_dict`` for a frozen Config dataclass; ``from_dict`` rejects unknown keys."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)
