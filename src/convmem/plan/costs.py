"""What each option costs on each block of a model: the inputs of the chain solver.

# NOTE [Measured option costs]
# Bytes come from the no-GPU estimate (`estimate_step` on the meta device, within a few percent
# of the CUDA allocator on the zoo): one estimate of the untouched model, and one per option with
# that option applied to every block at once -- every block selectively recomputed, every block
# checkpointed, every block tiled at each candidate tile length, the whole chain tiled. A block's
# call in each gives what the block keeps under that option; the untouched estimate gives its
# input, output and largest internal activation, and the peak that calibrates `base` (what the
# plan does not change: parameters, gradients, the rest of the model, workspace).
#
# Times are measured where they mean something: on a GPU the planner times a few training steps
# of the model with each option applied to every block, and charges each block its share of the
# difference to the untouched step (shares by the bytes the block touches). Elsewhere a roofline
# model stands in (`_RooflineTimes`), and the plan says its times are modelled.
#
# NOTE [Fused chains as an option]
# A block whose forward runs [BatchNorm1d ->] activation -> Conv1d chains can keep only each chain's
# first input (and the batch statistics) and rebuild the rest in backward, as `fuse_` does
# (`convmem.nn.FusedNormActConv`, NOTE [Norm-activation-conv chains]): option "fuse", the block
# otherwise kept. Its kept bytes come from the estimate with every such block fused; its working
# bytes are taken as the untouched block's (its backward rebuilds one chain at a time: on the safe
# side). The time it adds is measured as the other options' are, every chained block fused at once.
# Eager fp32 only: under autocast the chains run unfused, and under torch.compile the partitioner
# chooses what to recompute, so plans for either do not offer it.
#
# NOTE [Compact max-pools in plans]
# Option "pool" is not chosen per block: with it allowed, every max-pool of the model that can be a
# `CompactMaxPool1d` (NOTE [Compact max-pool] in nn/compact_pool.py) is one in every plan, and every
# option is costed -- estimated and timed -- with the pools compact (`ChainCosts.pools` names
# them). It only takes away: a pool then keeps an int8 offset per output instead of its input and
# int64 indices, and its forward and backward are max-pool's own plus an index conversion. On
# Basenji (a MaxPool(2) after each of the first seven blocks' BatchNorm) the untouched estimate
# falls from 3.42 to 2.17 GiB and the least plan from 1.56 to 1.29 GiB: the peak with every block
# checkpointed is the first block's backward, which recomputes its pool at full length. The
# untouched model's estimate stays the `eager_peak` budgets are fractions of, and a budget it meets
# gets a plan without compact pools when every block is kept (nothing to save, no step to change).
# Compiled plans have them too (unlike "fuse"): the compact pool's autograd Function compiles, and
# saves what Inductor's own lowering would not (on Basenji 0.67 GiB less at the same step time,
# NOTE [Compact max-pool]); the judge measures the compiled step with them.
#
# NOTE [Convs by phases in plans]
# Option "phases" is not chosen per block either: with it allowed and the costs measured on a GPU,
# each dilated Conv1d that can run by phases (`Conv1dByPhases`, NOTE [Dilated convs by phases] in
# nn/conv_phases.py) has its own forward and backward timed at the input shape it sees in the
# model, as it is and by phases, and runs by phases in every plan where that measured at least 3%
# faster; every option is then costed with them so, as with the compact pools. It changes no
# bytes a step keeps (the view saves the same input; a length the dilation does not divide saves
# its zero-padded copy, which the estimate sees), only time: on an H200, tcn compiled went from
# 71.6 to 57.5 ms and wavenet from 56.0 to 37.0, which a plan can then spend on recompute. A
# plan keeps them also for a budget the untouched model meets: a faster step, same numbers.
# Without a GPU nothing is timed and nothing runs by phases: whether it pays is the card's.
# Option "depthwise" is decided the same way, per depthwise Conv1d, between cuDNN and convmem's
# Triton kernel (`FusedDepthwiseConv1d`, its activation left outside: NOTE [Depthwise under
# torch.compile] in kernels/depthwise.py); a dilated depthwise conv takes the fastest of the three
# ways. The timing is eager, one convolution alone, by the GPU's time alone (NOTE [GPU time alone]
# in plan/timing.py): timed as a loop sees it, one conv's step is its host time, and the Conformer
# conv module's k=31 convs measured 1.00 ms with PyTorch and 1.04 on the kernel (not chosen); by
# GPU time 0.87 against 0.43 (H200). In a model that host time hides behind other kernels or, under
# CUDA graphs, is gone -- or, in a compiled step that is host-bound, is what the step costs: the
# Conformer stack compiled in default mode took 29.8 ms with its convs on the kernel against 23.9
# while the kernels ran inside opaque custom ops (20.2 against 24.6 since Inductor launches them).
# So for compiled plans the timing only proposes: `optimize_` judges the untouched model compiled
# (in the plan's mode) with the swapped convolutions and without them (two more compilations) and
# plans with them only when they measured faster (the costs stay as taken); under CUDA graphs the
# Conformer stack measured 15.8 ms with them against 22.7, and Conv-TasNet's in default mode 28.7
# against 49.8 with Inductor launching the kernels.
# Option "matmul" is a third way, for a Conv1d with few input channels (`Conv1dAsMatmul`: its
# columns no larger than its output, NOTE [Conv1d as a matmul] in nn/conv_as_matmul.py), timed and
# judged the same way; a conv that more than one way can run takes the fastest.
#
# NOTE [Modules beside the blocks]
# The blocks (NOTE [Repeated blocks]) are what a user would checkpoint by hand, and what the
# harness's `torch.utils.checkpoint` anchor wraps; a model also keeps activations outside them. A
# module beside the blocks -- a child of the root or of a container on the way down to them that is
# neither a block nor holds one -- is planned as one more item when it holds parameters, runs once
# in forward, and keeps at least as much as the smallest block that keeps anything: ResNet1d's
# stem (conv, BatchNorm, ReLU, max-pool at half the input length) keeps more than any of its
# blocks, and checkpointing it too takes the all-checkpointed estimate from 0.544 to 0.429 GiB;
# Basenji's head keeps 83 MiB, its smallest block 16 MiB. Items follow forward order, so
# the chain model's prefix sums still hold; runs of several items (a checkpointed segment, the
# whole chain tiled) stay inside the blocks' Sequential (`ChainCosts.chain_span`).
#
# Everything that depends on the input grows linearly with its length (activations, their bytes,
# convolution time): costs are stored per profiled length and scaled to another, so a plan for a
# longer input does not need a new profile. Parameters, their gradients and optimizer state do not
# scale (`fixed`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..analysis.receptive_field import known_refusal, receptive_field
from ..nn._wrapper import ModuleWrapper
from ..nn.checkpointed import Checkpointed, resolve_policy
from ..nn.compact_pool import compact_pools
from ..kernels.depthwise import kernels_usable
from ..nn.conv_as_matmul import Conv1dAsMatmul, conv_as_matmul_reason
from ..nn.conv_phases import Conv1dByPhases, conv_by_phases_reason
from ..nn.fused_depthwise import FusedDepthwiseConv1d, fusable_reason
from ..nn.batch_chunked import BatchChunked, coupling_module
from ..nn.saved_precision import LowPrecisionSaved
from ..nn.tiled import Tiled
from ..profile.estimate import estimate_step, meta_clone, to_meta
from ..profile.measure import preserved
from ..profile.recorder import ModuleCall, inclusive_kept
from ..profile.step import LossFn, model_device
from ..strategies._blocks import find_blocks, find_chain, is_plain_sequential
from ..strategies._common import swap_modules
from ..strategies.fuse import chain_wrappers
from .solver import ChainProblem, Choice, peak_of
from .timing import step_seconds

__all__ = ["ItemCost", "ChainCosts", "chain_costs", "chain_span", "fused_chains", "OPTIONS"]

OPTIONS = ("selective", "checkpoint", "tile", "offload", "chunk", "fuse", "pool", "conv2d", "phases", "depthwise",
           "matmul")
LOSSY_OPTIONS = ("bf16",)  # saved activations in bfloat16: nn/saved_precision.py, only with lossy=True
_TILE_FRACTIONS = (2, 4, 8, 16, 32)  # candidate tile lengths: the input length over these
_MIN_TILE = 256
_FASTER_SHARE = 0.97  # NOTE [Convs by phases in plans]: swapped where at most this share of the time


@dataclasses.dataclass
class ItemCost:
    """One block, at the profiled length. Bytes and seconds."""

    name: str
    input_bytes: int
    output_bytes: int
    largest_activation: int
    kept_keep: int
    kept_selective: Optional[int]
    kept_checkpoint: int
    forward_s: float
    extra_s: Dict[str, float]  # option -> seconds it adds on this block ("tile:T" per tile length)
    length: int  # input samples of the block along the time axis
    tile_lengths: List[int] = dataclasses.field(default_factory=list)
    halo: int = 0
    kept_bf16: Optional[int] = None  # lossy: NOTE [Saved tensors in low precision]
    chunkable: bool = False  # NOTE [Batch-chunked recompute]: treats samples independently
    gradient_correction: int = 0  # NOTE [Measured option costs]: fitted to the all-checkpointed estimate
    alive: Dict[str, int] = dataclasses.field(default_factory=dict)  # option -> bytes left alive to forward's end
    kept_fused: Optional[int] = None  # NOTE [Fused chains as an option]; None: no chain in the block
    kept_untouched: Optional[int] = None  # NOTE [Compact max-pools in plans]: kept_keep before the swap

    @property
    def kept_before(self) -> int:
        """What the block keeps in the untouched model (the costs may be taken with the pools compact)."""
        return self.kept_untouched if self.kept_untouched is not None else self.kept_keep

    @property
    def gradients(self) -> int:
        """Bytes of gradients alive while this block runs backward: its output's, its input's and
        the largest internal one."""
        return max(0, self.input_bytes + self.output_bytes + self.largest_activation + self.gradient_correction)


@dataclasses.dataclass
class ChainCosts:
    """The blocks of a model and what each option costs on each; `problem` turns them into a solver input."""

    model: str
    chain: Optional[str]  # the Sequential holding the blocks, when runs of them may be one segment
    items: List[ItemCost]
    base: int  # NOTE [Chain cost model]
    forward_base: int
    fixed: int  # the part of base that does not grow with the input length
    eager_peak: int  # estimate of the untouched model
    length: int  # input length the costs were taken at
    times: str  # "measured on <device>" or "modelled"
    # The whole chain tiled: [tile_length, batch_chunk (or None), kept, working, extra seconds] each.
    chain_tiles: List[List[Any]] = dataclasses.field(default_factory=list)
    eager_step_s: Optional[float] = None
    batch: int = 1
    pools: List[str] = dataclasses.field(default_factory=list)  # NOTE [Compact max-pools in plans]
    phased: List[str] = dataclasses.field(default_factory=list)  # NOTE [Convs by phases in plans]
    depthwise: List[str] = dataclasses.field(default_factory=list)  # ... on convmem's depthwise kernel
    matmul: List[str] = dataclasses.field(default_factory=list)  # ... as a matmul over their columns

    def swapped_convs(self) -> Dict[str, List[str]]:
        """The Conv1ds these costs were taken with swapped, per option of `FASTER_CONVS`."""
        return {option: list(getattr(self, field)) for option, field, _, _ in _FASTER}

    def scale(self, length: int) -> float:
        return length / self.length

    def chain_span(self) -> Tuple[int, int]:
        """Items ``[start, stop)`` inside `chain`, the only ones runs of several items may span
        (NOTE [Modules beside the blocks]); an empty span without a chain."""
        return chain_span([it.name for it in self.items], self.chain)

    def problem(self, allow: Sequence[str], length: Optional[int] = None) -> ChainProblem:
        """The solver's input for inputs of `length` (default: the profiled one) with the `allow`ed options."""
        f = self.scale(length) if length is not None else 1.0

        def b(n: float) -> int:
            return int(math.ceil(n * f))

        choices: List[Choice] = []
        items = self.items
        for i, it in enumerate(items):
            g = it.gradients
            choices.append(Choice(i, i + 1, "keep", b(it.kept_keep), b(it.kept_keep + g), 0.0))
            if "selective" in allow and it.kept_selective is not None:
                choices.append(Choice(i, i + 1, "selective", b(it.kept_selective), b(it.kept_keep + g),
                                      it.extra_s["selective"] * f, alive=b(it.alive.get("selective", 0))))
            if "chunk" in allow and it.chunkable and self.batch > 1:
                for size in chunk_sizes(self.batch):  # NOTE [Chunk sizes]
                    # `size` samples at a time: the input kept, its gradient and the output's at full
                    # batch, that many samples' activations and gradients (NOTE [Batch-chunked recompute]).
                    working = it.kept_checkpoint + it.input_bytes + it.output_bytes + (it.kept_keep + g) * size / self.batch
                    choices.append(Choice(i, i + 1, "chunk", b(it.kept_checkpoint), b(working),
                                          _chunk_extra_s(it, size, self.batch) * f,
                                          batch_chunk=None if size == 1 else size,
                                          alive=b(it.alive.get("checkpoint", 0))))
            if "fuse" in allow and it.kept_fused is not None:
                choices.append(Choice(i, i + 1, "fuse", b(it.kept_fused), b(it.kept_keep + g),
                                      it.extra_s.get("fuse", 0.0) * f))
            if "bf16" in allow and it.kept_bf16 is not None:
                choices.append(Choice(i, i + 1, "bf16", b(it.kept_bf16), b(it.kept_keep + g), it.extra_s.get("bf16", 0.0) * f))
            if "offload" in allow and "offload" in it.extra_s:
                previous = items[i - 1].kept_keep if i > 0 else 0
                choices.append(Choice(i, i + 1, "offload", 0, b(it.kept_keep + previous + g), it.extra_s["offload"] * f,
                                      alive=b(it.alive.get("checkpoint", 0))))
            if "tile" in allow:
                for t in it.tile_lengths:
                    window = min(1.0, (t + it.halo) / it.length)
                    choices.append(Choice(i, i + 1, "tile", b(it.kept_checkpoint),
                                          b(it.kept_checkpoint + it.kept_keep * window + g),
                                          it.extra_s[f"tile:{t}"] * f, tile_length=max(1, int(t * f)),
                                          alive=b(it.alive.get("checkpoint", 0))))
        first, last = self.chain_span()
        if "checkpoint" in allow:
            for i in range(len(items)):
                stop_max = last if first <= i < last else i + 1
                inside, extra, grads, alive = 0, 0.0, 0, 0
                for k in range(i, stop_max):
                    inside += items[k].kept_keep
                    extra += items[k].extra_s.get("checkpoint", 0.0)
                    grads = max(grads, items[k].gradients)
                    alive += items[k].alive.get("checkpoint", 0)
                    choices.append(Choice(i, k + 1, "checkpoint", b(items[i].kept_checkpoint), b(inside + grads),
                                          extra * f, alive=b(alive)))
        if "tile" in allow and last > first:
            for t, chunk, kept, working, extra in self.chain_tiles:
                choices.append(Choice(first, last, "tile", b(kept), b(working), extra * f,
                                      tile_length=max(1, int(t * f)), batch_chunk=chunk))
        base = self.fixed + b(self.base - self.fixed)
        forward_base = self.fixed + b(self.forward_base - self.fixed)
        return ChainProblem(len(items), base, choices, forward_base)

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ChainCosts":
        data = dict(data)
        data["items"] = [ItemCost(**item) for item in data["items"]]
        data["chain_tiles"] = [list(v) for v in data.get("chain_tiles", [])]
        return cls(**data)


def plannable_items(model: nn.Module) -> Tuple[List[str], Optional[str]]:
    """The blocks the planner chooses for (NOTE [Repeated blocks]) and, when they are all the
    parameter-holding items of one plain Sequential, that Sequential's name."""
    names = find_blocks(model)
    if not names:
        chain = find_chain(model)
        if chain is None:
            return [], None
        seq = model.get_submodule(chain)
        return [f"{chain}.{i}" for i in range(len(seq))], chain
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) == 1:
        parent = parents.pop()
        if parent and is_plain_sequential(model.get_submodule(parent)):
            seq = model.get_submodule(parent)
            if len(names) == len(seq) and all(f"{parent}.{i}" in names for i in range(len(seq))):
                return names, parent
    return names, None


def chain_span(items: Sequence[str], chain: Optional[str]) -> Tuple[int, int]:
    """Indices ``[start, stop)`` of the `items` that are items of the Sequential `chain`
    (consecutive: items are in forward order); ``(0, 0)`` without a chain."""
    inside = [i for i, name in enumerate(items) if chain and name.rpartition(".")[0] == chain]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _beside_blocks(model: nn.Module, names: Sequence[str], calls: Dict[str, ModuleCall]) -> List[str]:
    """Modules beside the blocks worth planning as items of their own (NOTE [Modules beside the blocks])."""
    if not names:
        return []
    ancestors = {""}
    for name in names:
        parts = name.split(".")
        ancestors.update(".".join(parts[:k]) for k in range(1, len(parts)))
    smallest = min((k for k in (inclusive_kept(calls[n]) for n in names) if k > 0), default=None)
    if smallest is None:
        return []  # (a chain of plain layers whose items keep nothing: no measure of a block's worth)
    found = []
    for parent_name in sorted(ancestors):
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full in ancestors or full in names or isinstance(child, (ModuleWrapper, nn.ModuleList, nn.ModuleDict)):
                continue
            call = calls.get(full)
            if call is None or next(child.parameters(), None) is None or inclusive_kept(call) < smallest:
                continue
            found.append(full)
    return found


def fused_chains(model: nn.Module, name: str) -> Dict[str, nn.Module]:
    """The `FusedNormActConv` wrappers that fuse the chains of block `name`, by their names in
    `model`; empty when it has none (NOTE [Fused chains as an option])."""
    wrappers = chain_wrappers(model.get_submodule(name), include_root=True)
    return {f"{name}.{inner}" if inner else name: wrapper for inner, wrapper in wrappers.items()}


def _forward_end(estimate) -> int:
    """Bytes live when forward ends (the loss begins): what the step keeps, plus resident memory."""
    index = estimate.phase_starts.get("loss", len(estimate.timeline))
    return estimate.timeline[max(0, min(index, len(estimate.timeline)) - 1)]


def _fit_gradients(items: List[ItemCost], chain: Optional[str], base: int, forward_base: int, estimate) -> None:
    """Correct the gradient bytes of the block whose backward sets the peak with every block
    checkpointed, so that the chain model reproduces that estimate, and every other block's by the
    same ratio (NOTE [Measured option costs]).

    What a block holds besides its activations while its backward runs (gradients of its output,
    its input, an internal activation) depends on the order its ops free things in; the untouched
    estimate calibrates `base`, and this one the block that matters most for small budgets.
    """
    probe = ChainCosts("", None, items, base, forward_base, 0, 0, 1, "modelled")
    problem = probe.problem(("checkpoint",))
    singles = [c for c in problem.choices if c.option == "checkpoint" and c.stop == c.start + 1]
    if len(singles) != len(items):
        return
    prefix, worst, where = 0, -1, None
    for c in singles:
        if prefix + c.working > worst:
            worst, where = prefix + c.working, c.start
        prefix += c.kept
    predicted = peak_of(problem, singles)
    if where is None or problem.base + worst < predicted:
        return  # the forward sets that peak, not a block's backward
    delta = estimate.peak_bytes - predicted
    fitted = items[where]
    ratio = (fitted.gradients + delta) / fitted.gradients if fitted.gradients else 1.0
    for it in items:  # blocks free their gradients in much the same order: the same share for all
        if it.gradients:
            it.gradient_correction = int(it.gradients * (ratio - 1))
    fitted.gradient_correction = delta


def _forward_peak(estimate) -> int:
    return max(estimate.timeline[: estimate.phase_starts.get("loss", len(estimate.timeline))], default=0)


def _alive(items: List[ItemCost], estimates: Dict[str, Any], forward_base: int) -> None:
    """Bytes an option leaves alive until the end of forward without keeping them.

    A block's outputs that the model collects until its end (WaveNet's skip connections) are kept
    by the block's own ops when it runs untouched, and counted in its kept bytes; checkpointed,
    the block keeps only its input, but the outputs stay alive all the same until forward ends.
    The estimate with the option on every block shows them at its forward peak beyond the kept
    bytes; each block gets a share by its output bytes.
    """
    outputs = sum(it.output_bytes for it in items) or 1
    for option, est in estimates.items():
        kept = sum((it.kept_checkpoint if option == "checkpoint" else (it.kept_selective or 0)) for it in items)
        extra = max(0, _forward_peak(est) - forward_base - kept)
        for it in items:
            it.alive[option] = extra * it.output_bytes // outputs


def _kept_by_forward_end(plain, option, calls: Dict[str, ModuleCall], names: Sequence[str]) -> Dict[str, int]:
    """Bytes each block holds under an option whose kept tensors the recorder cannot see.

    What selective checkpointing keeps of a block's inside (the convolution outputs its policy
    caches) is held by the checkpoint itself, and what `LowPrecisionSaved` keeps goes through its
    own saved-tensor hooks, inside the recorder's: the estimate does not charge either to the
    block. The bytes are still live at the end of forward: the saving is the difference of live
    bytes there between the untouched step and the step with the option on every block, shared
    among the blocks by what they keep untouched.
    """
    kept = {n: inclusive_kept(calls[n]) for n in names}
    total = sum(kept.values()) or 1
    saving = max(0, _forward_end(plain) - _forward_end(option))
    return {n: max(0, kept[n] - saving * kept[n] // total) for n in names}


def _largest_output(call: ModuleCall) -> int:
    return max([call.output_bytes] + [_largest_output(c) for c in call.children])


def _first_calls(calls: Sequence[ModuleCall]) -> Dict[str, ModuleCall]:
    first: Dict[str, ModuleCall] = {}
    counts: Dict[str, int] = {}
    for call in calls:
        if call.in_backward or not call.grad_enabled:
            continue
        counts[call.name] = counts.get(call.name, 0) + 1
        first.setdefault(call.name, call)
    return {name: call for name, call in first.items() if counts[name] == 1}


def _estimate_with(model: nn.Module, inputs, loss_fn, autocast, wrap) -> Optional[Any]:
    """The estimate of a meta copy of `model` with ``wrap(copy)`` applied; None if it cannot run."""
    clone = meta_clone(model)
    try:
        wrap(clone)
        return estimate_step(clone, inputs, loss_fn, autocast_dtype=autocast)
    except Exception as error:  # an option that cannot run on this model is simply not offered
        warnings.warn(f"optimize_: option not available on {type(model).__name__}: {error}", stacklevel=4)
        return None


def _wrap_items(names: Sequence[str], make):
    def wrap(clone: nn.Module) -> None:
        swap_modules(clone, {n: make(clone.get_submodule(n)) for n in names})
    return wrap


def _elem_length(call: ModuleCall, axis: int = -1) -> int:
    return int(call.input_shapes[0][axis]) if call.input_shapes and call.input_shapes[0] else 0


def chain_costs(model: nn.Module, inputs: Sequence[Any], loss_fn: Optional[LossFn] = None,
                allow: Sequence[str] = OPTIONS, autocast: Optional[torch.dtype] = None,
                measure_times: Optional[bool] = None, progress=None) -> ChainCosts:
    """Per block of `model`, what each allowed option keeps and costs (NOTE [Measured option costs])."""
    blocks = plannable_items(model)
    pools = compact_pools(model) if "pool" in allow else {}
    faster = {}  # NOTE [Convs by phases in plans]
    if set(FASTER_CONVS) & set(allow) and (measure_times if measure_times is not None else _on_cuda(model, inputs)):
        faster = faster_convs(model, inputs, autocast, allow, progress or (lambda text: None))
    convs = {name: wrapper for chosen in faster.values() for name, wrapper in chosen.items()}
    if not pools and not convs:
        return _chain_costs(model, blocks, inputs, loss_fn, allow, autocast, measure_times, progress)
    # NOTE [Compact max-pools in plans], NOTE [Convs by phases in plans]: every option is costed
    # with them; the untouched model's estimate stays what budgets are fractions of.
    untouched = estimate_step(meta_clone(model), to_meta(tuple(inputs)), loss_fn, autocast_dtype=autocast)
    undo = swap_modules(model, {**pools, **convs})
    try:
        costs = _chain_costs(model, blocks, inputs, loss_fn, allow, autocast, measure_times, progress)
    finally:
        undo()
    costs.eager_peak = untouched.peak_bytes
    costs.pools = sorted(pools)
    for option, field, _, _ in _FASTER:
        setattr(costs, field, sorted(faster.get(option, {})))
    calls = _first_calls(untouched.calls)
    for it in costs.items:
        it.kept_untouched = inclusive_kept(calls[it.name]) if it.name in calls else None
    return costs


def _on_cuda(model: nn.Module, inputs: Sequence[Any]) -> bool:
    return model_device(model, inputs).type == "cuda"


# The convolutions `faster_convs` may swap, each a way of computing the same sums: its option name,
# the ChainCosts field naming the Conv1ds swapped so, what to call it in the progress lines, and the
# wrapper of a conv (or None where it cannot run it).
def _by_phases(conv: nn.Module, device: torch.device) -> Optional[nn.Module]:
    return Conv1dByPhases(conv) if conv_by_phases_reason(conv) is None else None


def _on_the_kernel(conv: nn.Module, device: torch.device) -> Optional[nn.Module]:
    usable = fusable_reason(conv) is None and kernels_usable(device)
    return FusedDepthwiseConv1d.from_conv1d(conv) if usable else None


def _as_matmul(conv: nn.Module, device: torch.device) -> Optional[nn.Module]:
    return Conv1dAsMatmul(conv) if conv_as_matmul_reason(conv) is None else None


_FASTER = (("phases", "phased", "by phases", _by_phases),
           ("depthwise", "depthwise", "on convmem's depthwise kernel", _on_the_kernel),
           ("matmul", "matmul", "as a matmul", _as_matmul))
FASTER_CONVS = tuple(option for option, *_ in _FASTER)  # options that swap Conv1ds where they measured faster


def faster_convs(model: nn.Module, inputs: Sequence[Any], autocast: Optional[torch.dtype], allow: Sequence[str],
                 say=lambda text: None) -> Dict[str, Dict[str, nn.Module]]:
    """Per option of `allow` among `FASTER_CONVS`, the Conv1ds of `model` that measured
    faster so (NOTE [Convs by phases in plans]): ``{option: {name: wrapper}}``, nothing swapped.

    Each convolution's forward and backward is timed at the input it sees in one forward of
    `inputs`, as it is and each way it can run, by the GPU's time alone (NOTE [GPU time alone] in
    plan/timing.py); it takes the fastest way where that is at least 3% faster than as it is."""
    ways = {option: (words, wrap) for option, _, words, wrap in _FASTER if option in allow}
    device = model_device(model, inputs)
    candidates = {name: m for name, m in model.named_modules() if type(m) is nn.Conv1d
                  and any(wrap(m, device) is not None for _, wrap in ways.values())}
    chosen: Dict[str, Dict[str, nn.Module]] = {option: {} for option in ways}
    if not candidates:
        return chosen
    seen: Dict[str, Tuple[torch.Size, torch.dtype]] = {}  # the input of each one's first call

    def record(name: str, args) -> None:
        seen.setdefault(name, (args[0].shape, args[0].dtype))

    hooks = [conv.register_forward_pre_hook(lambda module, args, name=name: record(name, args))
             for name, conv in candidates.items()]
    try:
        with preserved(model), torch.no_grad(), (
                torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()):
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    fastest: Dict[Tuple, Optional[str]] = {}  # convolutions alike in shape and input answer once
    for name, conv in candidates.items():
        if name not in seen:
            continue
        shape, dtype = seen[name]
        key = (shape, dtype, conv.in_channels, conv.out_channels, conv.kernel_size, conv.dilation, conv.padding,
               conv.groups, conv.bias is None)
        if key not in fastest:
            alone = copy.deepcopy(conv)
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            plain = step_seconds(alone, [x], repeats=5, warmup=2, autocast=autocast, gpu_only=True)
            wrapped = {option: wrap(alone, device) for option, (_, wrap) in ways.items()}
            times = {option: step_seconds(way, [x], repeats=5, warmup=2, autocast=autocast, gpu_only=True)
                     for option, way in wrapped.items() if way is not None}
            best = min(times, key=times.get)
            fastest[key] = best if times[best] <= _FASTER_SHARE * plain else None
            say(f"{name} (dilation {conv.dilation[0]}, groups {conv.groups}): {plain * 1e3:.2f} ms as it is, "
                + ", ".join(f"{t * 1e3:.2f} ms {ways[option][0]}" for option, t in times.items()))
            del alone, x
        if fastest[key] is not None:
            chosen[fastest[key]][name] = ways[fastest[key]][1](conv, device)
    return chosen


def _chain_costs(model: nn.Module, blocks: Tuple[List[str], Optional[str]], inputs: Sequence[Any],
                 loss_fn: Optional[LossFn], allow: Sequence[str], autocast: Optional[torch.dtype],
                 measure_times: Optional[bool], progress) -> ChainCosts:
    say = progress or (lambda text: None)
    names, chain = blocks
    inputs = tuple(inputs)
    meta_inputs = to_meta(inputs)
    say("estimating the untouched step")
    plain = estimate_step(meta_clone(model), meta_inputs, loss_fn, autocast_dtype=autocast)
    calls = _first_calls(plain.calls)
    names = [n for n in names if n in calls]
    if chain is not None and len(names) != len(model.get_submodule(chain)):
        chain = None
    order = {id(call): i for i, call in enumerate(plain.calls)}
    names = sorted(names + _beside_blocks(model, names, calls), key=lambda n: order[id(calls[n])])
    length = int(inputs[0].shape[-1]) if isinstance(inputs[0], torch.Tensor) else 0

    kept_sel: Dict[str, int] = {}
    option_estimates: Dict[str, Any] = {}
    if "selective" in allow and names and resolve_policy("selective") == "selective":
        say("estimating selective recompute")
        est = _estimate_with(model, meta_inputs, loss_fn, autocast, _wrap_items(names, lambda m: Checkpointed(m, "selective")))
        if est is not None:
            kept_sel = _kept_by_forward_end(plain, est, calls, names)
            option_estimates["selective"] = est
    kept_bf16: Dict[str, int] = {}
    if "bf16" in allow and names:
        say("estimating bfloat16 saved tensors")
        est = _estimate_with(model, meta_inputs, loss_fn, autocast, _wrap_items(names, LowPrecisionSaved))
        if est is not None:
            kept_bf16 = _kept_by_forward_end(plain, est, calls, names)
    kept_fused: Dict[str, int] = {}
    chained = [n for n in names if fused_chains(model, n)] if "fuse" in allow and autocast is None else []
    if chained:
        say("estimating fused activation chains")
        est = _estimate_with(model, meta_inputs, loss_fn, autocast, lambda clone: swap_modules(
            clone, {k: v for n in chained for k, v in fused_chains(clone, n).items()}))
        if est is not None:
            fused_calls = _first_calls(est.calls)
            kept_fused = {n: inclusive_kept(fused_calls[n]) for n in chained if n in fused_calls}
    say("estimating checkpointing")
    est = _estimate_with(model, meta_inputs, loss_fn, autocast, _wrap_items(names, lambda m: Checkpointed(m, "full")))
    if est is None:
        raise RuntimeError(f"optimize_: cannot estimate {type(model).__name__} with its blocks checkpointed")
    kept_ckpt = {n: inclusive_kept(c) for n, c in _first_calls(est.calls).items() if n in names}
    option_estimates["checkpoint"] = est

    items = []
    for n in names:
        call = calls[n]
        items.append(ItemCost(
            name=n, input_bytes=kept_ckpt.get(n, 0), output_bytes=call.output_bytes,
            largest_activation=max((_largest_output(c) for c in call.children), default=0),
            kept_keep=inclusive_kept(call), kept_selective=kept_sel.get(n), kept_checkpoint=kept_ckpt.get(n, 0),
            forward_s=0.0, extra_s={}, length=_elem_length(call), kept_bf16=kept_bf16.get(n),
            kept_fused=kept_fused.get(n),
            chunkable="chunk" in allow and coupling_module(model.get_submodule(n)) is None,
        ))

    chain_tiles: List[List[Any]] = []
    if "tile" in allow:
        shapes = {n: tuple(calls[n].input_shapes[0]) for n in names if calls[n].input_shapes}
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        _tile_options(model, meta_inputs, loss_fn, autocast, items, chain, chain_tiles, shapes, dtype, say)

    # base: the untouched estimate's peak, less what the chain model says all-keep holds.
    keep_only = ChainCosts(type(model).__name__, chain, items, 0, 0, 0, plain.peak_bytes, length, "modelled").problem(())
    all_keep = [c for c in keep_only.choices if c.option == "keep"]
    forward_peak = _forward_peak(plain)
    base = plain.peak_bytes - peak_of(keep_only, all_keep)
    forward_base = max(base, forward_peak - sum(it.kept_keep for it in items))
    _alive(items, option_estimates, forward_base)
    _fit_gradients(items, chain, base, forward_base, option_estimates["checkpoint"])
    fixed = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in model.parameters())
    fixed += sum(b.numel() * b.element_size() for b in model.buffers())
    for tile in chain_tiles:
        tile[3] -= base  # the estimate's peak, less what the plan does not change

    costs = ChainCosts(type(model).__name__, chain, items, base, forward_base, min(fixed, base), plain.peak_bytes, length,
                       "modelled", chain_tiles,
                       batch=int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() >= 2 else 1)
    if measure_times is None:
        measure_times = _on_cuda(model, inputs)
    if measure_times:
        _measured_times(model, inputs, loss_fn, allow, costs, say, autocast)
    else:
        _roofline_times(costs, allow)
    return costs


def _tile_options(model, meta_inputs, loss_fn, autocast, items: List[ItemCost], chain: Optional[str],
                  chain_tiles: List[List[Any]], it_shapes: Dict[str, tuple], dtype: torch.dtype,
                  say) -> None:
    """Tile lengths each block (and the whole chain) can run at, and what they keep (NOTE [Measured option costs])."""
    tileable = [it for it in items if known_refusal(model.get_submodule(it.name)) is None and it.length > 0]
    for it in tileable:
        it.tile_lengths = [it.length // d for d in _TILE_FRACTIONS if it.length // d >= _MIN_TILE]
    for it in tileable:
        # The receptive-field analysis on a meta input of the block's shape (no values, no memory)
        # gives the halo each backward window recomputes; a block it finds non-local is not tiled.
        shape = it_shapes.get(it.name)
        try:
            x = torch.empty(shape, device="meta", dtype=dtype)
            field = receptive_field(meta_clone(model.get_submodule(it.name)), x, probe_values=False)
        except Exception as error:
            warnings.warn(f"optimize_: cannot analyse {it.name!r} for tiling: {error}", stacklevel=3)
            field = None
        if field is None or not field.local:
            it.tile_lengths = []
            continue
        it.halo = int(field.left + field.right)
        it.tile_lengths = [t for t in it.tile_lengths if t >= 2 * it.halo and t % max(1, field.period) == 0]
    first, last = chain_span([it.name for it in items], chain)
    if last == first or known_refusal(model.get_submodule(chain)) is not None:
        return
    length = items[first].length
    batch = int(meta_inputs[0].shape[0]) if meta_inputs and meta_inputs[0].dim() >= 2 else 1
    # Batch chunks of one sample (NOTE [Batch chunks] in nn/tiled.py) at the two longest tiles:
    # the least memory per tile length, for budgets below what whole-batch windows reach.
    candidates = [(length // d, None) for d in _TILE_FRACTIONS if length // d >= _MIN_TILE]
    if batch > 1:
        candidates += [(t, 1) for t, _ in candidates[:2]]
    for t, chunk in candidates:
        say(f"estimating the chain tiled at {t}" + (f", batch chunks of {chunk}" if chunk else ""))
        est = _estimate_with(model, meta_inputs, loss_fn, autocast,
                             _wrap_items([chain], lambda m: Tiled(m, t, batch_chunk=chunk)))
        if est is None:
            return
        call = _first_calls(est.calls).get(chain)
        if call is None:
            return
        chain_tiles.append([t, chunk, inclusive_kept(call), est.peak_bytes, 0.0])


# Roofline stand-ins when there is no GPU to time on (NOTE [Measured option costs]): a forward that
# reads and writes each kept activation about three times at HBM speed, backward twice that, PCIe
# for offload, and a fixed cost per tile window.
_HBM_BYTES_PER_S = 2.0e12
_PCIE_BYTES_PER_S = 25e9
_SELECTIVE_SHARE = 0.3  # of a block's forward spent in the cheap ops selective recompute redoes
_WINDOW_S = 2e-4


# NOTE [Chunk sizes]
# Option "chunk" recomputes a block in backward a few samples at a time (`BatchChunked`). One sample
# at a time holds the least, and pays the most calls: wav2vec 2.0's first two layers chunked so
# took its step from 22.7 to 30.1 ms on an H200, to keep 2.98 GiB where checkpointing them keeps
# 3.96. Chunks of a quarter or half the batch hold more and cost less, so the planner offers them
# too, as choices of their own. Only one sample at a time is timed (every chunkable block chunked
# at once, NOTE [Measured option costs]); a chunk size's extra time is the checkpoint's plus the
# measured excess of one-sample chunks over it in proportion to the calls beyond the first:
# ``checkpoint + (chunk_1 - checkpoint) * (ceil(batch / size) - 1) / (batch - 1)``. Its backward
# holds `size` samples' worth of the block's activations and gradients.
def chunk_sizes(batch: int) -> List[int]:
    """Samples per chunk offered for a batch of `batch`: one, a quarter and half of it (NOTE [Chunk sizes])."""
    return sorted({1} | {s for s in (batch // 4, batch // 2) if 1 < s < batch})


def _chunk_extra_s(it: "ItemCost", size: int, batch: int) -> float:
    """NOTE [Chunk sizes]."""
    checkpoint = it.extra_s.get("checkpoint", 0.0)
    one = it.extra_s.get("chunk", checkpoint)
    return checkpoint + max(0.0, one - checkpoint) * (math.ceil(batch / size) - 1) / (batch - 1)


def _touched(it: ItemCost) -> int:
    return it.kept_keep + it.output_bytes


def _roofline_times(costs: ChainCosts, allow: Sequence[str]) -> None:
    if not costs.items:
        return
    for it in costs.items:
        f = 3 * _touched(it) / _HBM_BYTES_PER_S
        it.forward_s = f
        it.extra_s["checkpoint"] = f
        it.extra_s["selective"] = _SELECTIVE_SHARE * f
        it.extra_s["fuse"] = _SELECTIVE_SHARE * f  # the chains' norms and activations again, in backward
        it.extra_s["bf16"] = 3 * it.kept_keep / _HBM_BYTES_PER_S  # cast down in forward, up in backward
        it.extra_s["chunk"] = f + costs.batch * _WINDOW_S
        it.extra_s["offload"] = max(0.0, 2 * it.kept_keep / _PCIE_BYTES_PER_S - 3 * f) + 1e-4
        for t in it.tile_lengths:
            windows = math.ceil(it.length / t)
            it.extra_s[f"tile:{t}"] = f * (1 + it.halo / t) + windows * _WINDOW_S
    total = sum(it.forward_s for it in costs.items)
    length = costs.items[0].length
    halo = max((it.halo for it in costs.items), default=0)
    for tile in costs.chain_tiles:
        t, chunk = tile[0], tile[1]
        windows = 2 * math.ceil(length / t) * (costs.batch if chunk else 1)
        tile[4] = total * (1 + halo / t) + windows * _WINDOW_S
    costs.eager_step_s = 3 * total
    costs.times = "modelled"


def _measured_times(model: nn.Module, inputs, loss_fn, allow, costs: ChainCosts, say, autocast=None) -> None:
    """Per option, a few steps of the model with the option on every block; each block is charged
    its share of the difference to the untouched step (NOTE [Measured option costs])."""
    names = [it.name for it in costs.items]
    weights = [_touched(it) for it in costs.items]
    total_w = float(sum(weights)) or 1.0

    def timed(label: str, replacements) -> Optional[float]:
        say(f"timing {label}")
        undo = swap_modules(model, replacements) if replacements else (lambda: None)
        try:
            return step_seconds(model, inputs, loss_fn, autocast=autocast)
        except Exception as error:
            warnings.warn(f"optimize_: could not time {label}: {error}", stacklevel=4)
            return None
        finally:
            undo()

    _roofline_times(costs, allow)  # fallbacks for anything that cannot be timed
    eager = timed("the untouched step", {})
    if eager is None:
        return  # the roofline stands in
    costs.eager_step_s = eager
    for it, w in zip(costs.items, weights):
        it.forward_s = eager * w / total_w / 3

    def charge(option: str, t: Optional[float], items: Sequence[ItemCost]) -> None:
        if t is None:
            return
        share = sum(_touched(it) for it in items) or 1
        for it in items:
            it.extra_s[option] = max(0.0, (t - eager) * _touched(it) / share)

    charge("checkpoint", timed("checkpointing", {n: Checkpointed(model.get_submodule(n), "full") for n in names}), costs.items)
    if "selective" in allow and any(it.kept_selective is not None for it in costs.items):
        charge("selective", timed("selective recompute",
                                  {n: Checkpointed(model.get_submodule(n), "selective") for n in names}), costs.items)
    chunked = [it for it in costs.items if it.chunkable]
    if "chunk" in allow and chunked and costs.batch > 1:
        charge("chunk", timed("batch-chunked recompute", {it.name: BatchChunked(model.get_submodule(it.name), 1)
                                                          for it in chunked}), chunked)
    fused = [it for it in costs.items if it.kept_fused is not None]
    if "fuse" in allow and fused:
        wrappers = {k: v for it in fused for k, v in fused_chains(model, it.name).items()}
        charge("fuse", timed("fused activation chains", wrappers), fused)
    if "bf16" in allow and any(it.kept_bf16 is not None for it in costs.items):
        charge("bf16", timed("bfloat16 saved tensors", {n: LowPrecisionSaved(model.get_submodule(n)) for n in names}),
               costs.items)
    if "offload" in allow:
        from ..nn.offloaded import OffloadGroup, Offloaded

        group = OffloadGroup()
        charge("offload", timed("offload", {n: Offloaded(model.get_submodule(n), group=group) for n in names}),
               costs.items)
    if "tile" in allow:
        for rank in range(len(_TILE_FRACTIONS)):
            group = [it for it in costs.items if len(it.tile_lengths) > rank]
            if not group:
                break
            t = timed(f"tiled blocks (1/{_TILE_FRACTIONS[rank]} of their length)",
                      {it.name: Tiled(model.get_submodule(it.name), it.tile_lengths[rank]) for it in group})
            if t is not None:
                share = sum(_touched(it) for it in group) or 1
                for it in group:
                    it.extra_s[f"tile:{it.tile_lengths[rank]}"] = max(0.0, (t - eager) * _touched(it) / share)
        for tile in costs.chain_tiles:
            t = timed(f"the chain tiled at {tile[0]}" + (f", batch chunks of {tile[1]}" if tile[1] else ""),
                      {costs.chain: Tiled(model.get_submodule(costs.chain), tile[0], batch_chunk=tile[1])})
            if t is not None:
                tile[4] = max(0.0, t - eager)
    costs.times = f"measured on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
