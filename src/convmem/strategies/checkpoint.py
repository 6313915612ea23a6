"""Activation checkpointing (exact): ``convmem.checkpoint_(model)``.

Wraps the model's repeated blocks (NOTE [Repeated blocks]), or the modules a ``filter_fn`` picks,
in `convmem.nn.Checkpointed`: their activations are recomputed in backward instead of kept.
Outputs, gradients and buffers stay those of the untouched model (DESIGN.md, invariants 1, 3, 4);
``convmem.restore_(model)`` takes the wrappers out again.

# NOTE [Segments balanced by kept bytes]
# Checkpointing a run of blocks as one segment keeps only the run's input; backward then recomputes
# the run and holds everything it keeps at once. With segments s_1..s_m of a chain,
#
#     kept during backward  ~  sum over segments of (bytes of the segment's input)
#                              + max over segments of (bytes the segment's items keep)
#
# Counting modules is the wrong measure: a strided encoder (wav2vec 2.0's feature encoder) keeps
# most of its memory in its first layers, where the signal is longest, so equal counts put most of
# the memory in one segment. With example inputs the bytes each item keeps (its calls' and its
# children's, from `convmem.profile.estimate_step` on the meta device) and the bytes of each item's
# output are known, and `plan_segments` finds the split into consecutive segments that minimises
# the sum above exactly (and is used only where it lowers the peak below one block per segment:
# `_SEGMENTS_PAY`): for every candidate bound on the largest segment (each sum of consecutive
# items), a dynamic programme finds the split with the cheapest segment inputs; the best bound
# wins, and between equal costs the split with fewer segments (fewer checkpoint calls).
#
# This applies to a Sequential whose forward is Sequential's own, which is not the model itself
# (the root cannot be replaced in place), and whose items are all selected or hold no parameters
# (a MaxPool between blocks joins a segment). Blocks of a ModuleList are called by their parent's
# forward, one by one, so each is a segment of its own; so is every block without example inputs,
# and every block under policy="selective": there the convolution outputs backward needs are kept
# whatever the segments, and recomputing one block's cheap ops at a time holds the least. A chain
# of plain layers has no blocks, and one layer per segment would save nothing (a conv keeps its
# input anyway), so it is segmented as above under both policies.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..nn.checkpointed import POLICIES, Checkpointed, resolve_policy
from ..profile.estimate import estimate_step
from ..profile.recorder import inclusive_kept
from ._blocks import find_blocks, find_chain, is_plain_sequential
from ._common import (
    ConfigDict, FilterFn, as_inputs, check_filter_fn, check_model, filter_selected, swap_modules, warn_skipped,
    wrappable,
)

__all__ = ["CheckpointConfig", "checkpoint_", "plan_segments"]

_STRATEGY = "checkpoint_"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(ConfigDict):
    """``policy``: "full" (keep block inputs only) or "selective" (also keep the convolution outputs
    backward needs, recompute only cheap ops; NOTE [Selective recompute])."""

    policy: str = "full"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"{_STRATEGY}: policy must be one of {POLICIES}, got {self.policy!r}")


def checkpoint_(
    model: nn.Module,
    filter_fn: Optional[FilterFn] = None,
    policy: str = "full",
    example_inputs: Any = None,
) -> nn.Module:
    """Checkpoint the repeated blocks of `model` in place (exact); returns `model`.

    Args:
        model: any ``nn.Module``; typically ``x: (batch, channels, length)`` through Conv1d blocks.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks the modules to checkpoint (the outermost
            of nested picks). Default: the model's repeated blocks, found from its structure
            (NOTE [Repeated blocks]).
        policy: "full" or "selective" (NOTE [Selective recompute]; needs PyTorch >= 2.5, else
            falls back to "full" with a warning).
        example_inputs: a tensor or tuple of the model's positional arguments. With it, the blocks
            of an ``nn.Sequential`` are grouped into segments balanced by the bytes they keep
            (policy="full"; NOTE [Segments balanced by kept bytes]), and a Sequential of plain
            layers without blocks is segmented (either policy). It runs on the meta device only.

    Modules that cannot be checkpointed (the root itself, modules already checkpointed or inside
    another convmem wrapper) are left untouched with a warning naming them; a convmem `Tiled`
    module itself can be checkpointed. If nothing is selected, a warning names the model and the
    model is unchanged. Invalid arguments raise before anything changes.

    Example::

        >>> model = convmem.zoo.get("w2v2_fe").model
        >>> convmem.checkpoint_(model, example_inputs=torch.randn(8, 320_000))
        >>> loss_fn(model(x)).backward()                 # same gradients, less memory kept
        >>> model = convmem.restore_(model)              # the original modules again
    """
    check_model(model, _STRATEGY)
    check_filter_fn(filter_fn, _STRATEGY)
    config = CheckpointConfig(policy=policy)
    inputs = as_inputs(example_inputs, _STRATEGY)
    policy = resolve_policy(config.policy)

    selection = _select(model, filter_fn, inputs)
    if selection is None:
        return model
    names, skipped = _checkpointable(model, selection[0])
    warn_skipped(_STRATEGY, skipped)
    if not names:
        return model

    chains: Dict[str, Tuple[int, ...]] = {}
    if inputs is not None and (policy == "full" or selection[1]):
        chains = _plan_chains(model, names, inputs)
    replacements: Dict[str, nn.Module] = {
        chain: Checkpointed(model.get_submodule(chain), policy, segments) for chain, segments in chains.items()
    }
    for name in names:
        if not any(name.startswith(chain + ".") for chain in chains):
            replacements[name] = Checkpointed(model.get_submodule(name), policy)
    swap_modules(model, replacements)
    return model


def plan_segments(kept: Sequence[int], inputs: Sequence[int]) -> Tuple[int, ...]:
    """Sizes of the consecutive segments that minimise ``sum(inputs[first item of each segment]) +
    max(sum(kept[segment]))``: NOTE [Segments balanced by kept bytes].

    ``kept[i]``: bytes item i keeps for backward; ``inputs[i]``: bytes of its input, kept when a
    segment starts at i. Example: ``plan_segments([800, 100, 100, 100], [0, 50, 50, 50])`` is
    ``(1, 3)``: the first, big item alone, the three small ones together.
    """
    n = len(kept)
    if n == 0 or len(inputs) != n:
        raise ValueError(f"kept and inputs need one entry per item, got {len(kept)} and {len(inputs)}")
    prefix = [0]
    for k in kept:
        prefix.append(prefix[-1] + k)
    best: Optional[Tuple[Tuple[int, int], List[int]]] = None
    sums = {prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)}
    for cap in sorted(s for s in sums if s >= max(kept)):  # below the largest item there is no split
        # cost[j]: (input bytes, segments) of the cheapest split of items[:j] into segments <= cap.
        cost: List[Optional[Tuple[int, int]]] = [(0, 0)] + [None] * n
        start = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):
                if prefix[j] - prefix[i] > cap:
                    break
                if cost[i] is not None:
                    candidate = (cost[i][0] + inputs[i], cost[i][1] + 1)
                    if cost[j] is None or candidate < cost[j]:
                        cost[j], start[j] = candidate, i
        total = (cost[n][0] + cap, cost[n][1])
        if best is None or total < best[0]:
            bounds, j = [], n
            while j > 0:
                bounds.append(j - start[j])
                j = start[j]
            best = (total, bounds[::-1])
    return tuple(best[1])


def _select(
    model: nn.Module, filter_fn: Optional[FilterFn], inputs: Optional[Tuple[Any, ...]]
) -> Optional[Tuple[List[str], bool]]:
    """Names of the modules to checkpoint (outermost only), and whether they are the layers of a
    chain without blocks; None (after a warning) when there are none."""
    model_name = type(model).__name__
    if filter_fn is not None:
        names = filter_selected(model, filter_fn, _STRATEGY)
        return (names, False) if names else None
    names = find_blocks(model)
    if names:
        return names, False
    chain = find_chain(model) if inputs is not None else None
    if chain is not None:
        items = model.get_submodule(chain)
        return [f"{chain}.{i}" for i, item in enumerate(items) if next(item.parameters(), None) is not None], True
    warnings.warn(
        f"{_STRATEGY}: found no repeated blocks in {model_name} (NOTE [Repeated blocks] in "
        "convmem/strategies/_blocks.py); pass filter_fn=... to choose modules"
        + ("" if inputs is not None else ", or example_inputs=... to segment a Sequential of plain layers")
        + "; the model is unchanged",
        stacklevel=3,
    )
    return None


def _checkpointable(model: nn.Module, names: List[str]) -> Tuple[List[str], Dict[str, str]]:
    # Another wrapper (Tiled) runs what it wraps its own way; the wrapper itself can be
    # checkpointed, what is inside it is left alone.
    return wrappable(model, names, Checkpointed, "already checkpointed", "; checkpoint the wrapper instead")


def _plan_chains(model: nn.Module, names: List[str], inputs: Tuple[Any, ...]) -> Dict[str, Tuple[int, ...]]:
    """{Sequential name: segment sizes} for each chain NOTE [Segments balanced by kept bytes] applies to."""
    selected = {id(model.get_submodule(n)) for n in names}
    chains = []
    for name, module in model.named_modules():
        if not name or not is_plain_sequential(module) or len(module) < 2:
            continue
        items = list(module)
        if any(id(item) in selected for item in items) and all(
            id(item) in selected or next(item.parameters(), None) is None for item in items
        ):
            chains.append(name)
    if not chains:
        return {}
    try:
        estimate = estimate_step(model, inputs)
    except Exception as error:  # the estimate only balances segments; blocks are checkpointed without it
        warnings.warn(
            f"{_STRATEGY}: cannot estimate what the blocks of {type(model).__name__} keep ({error}); "
            "checkpointing each block on its own",
            stacklevel=3,
        )
        return {}
    plans = {}
    for chain in chains:
        call = next((c for c in estimate.calls if c.name == chain and c.call_index == 0), None)
        if call is None or len(call.children) != len(model.get_submodule(chain)):
            continue  # the chain did not run on the example inputs: its blocks stay one per segment
        kept = [inclusive_kept(child) for child in call.children]
        item_inputs = [0] + [child.output_bytes for child in call.children[:-1]]
        segments = plan_segments(kept, item_inputs)
        if _segment_cost(kept, item_inputs, segments) > _SEGMENTS_PAY * _segment_cost(kept, item_inputs, (1,) * len(kept)):
            continue  # grouping saves too little to be worth a longer recompute: one block per segment
        plans[chain] = segments
    return plans


# Segments replace one-block-per-segment only when they lower the peak of the chain by more than
# 1% (`_SEGMENTS_PAY`). `plan_segments` balances kept bytes, but backward runs the segments in
# reverse: while segment s recomputes, only the inputs of the segments before it are still kept,
# so the peak is ``max_s (inputs kept before s + what s keeps)`` (NOTE [Chain cost model] in
# plan/solver.py). When the first, longest blocks set that maximum, grouping the later ones saves
# nothing at the peak (basenji's (1, 1, 2, 14) measured 0.94 MiB above one block per segment on an
# H200), and one block per segment recomputes less at a time.
_SEGMENTS_PAY = 0.99


def _segment_cost(kept: Sequence[int], inputs: Sequence[int], segments: Sequence[int]) -> int:
    """The peak of the chain's kept bytes with `segments` checkpointed (see `_SEGMENTS_PAY`)."""
    prefix, start, peak = 0, 0, 0
    for size in segments:
        peak = max(peak, prefix + sum(kept[start:start + size]))
        prefix += inputs[start]
        start += size
    return max(peak, prefix)
