"""A plan: which option on which block, what it is predicted to cost, and how to put it on a model.

A `Plan` is data: it names the model's blocks and, per run of blocks, the option chosen (keep,
selective, checkpoint, offload, tile at a length), the max-pools it runs compact, the Conv1ds it
computes as conv2d, the dilated ones it computes by phases, the depthwise ones it runs on convmem's
kernel and those with few input channels it computes as a matmul. It round-trips through `to_dict`/`from_dict` (JSON-safe) and
`convmem.apply_(model, plan)` puts it on a fresh instance of the same model, so a plan made once, on
a profiling machine, is used in a training script.

# NOTE [A plan checks the model it is applied to]
# A plan applied to another model would wrap the wrong modules. `apply_` first compares the
# model's structure with the one the plan was made on -- the qualified names and classes of every
# module inside the chain -- and raises naming the first module that differs, before anything
# changes.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .._units import format_bytes
from ..nn._wrapper import ModuleWrapper
from ..nn.batch_chunked import BatchChunked
from ..nn.checkpointed import Checkpointed
from ..nn.compact_pool import CompactMaxPool1d, compact_pool_reason
from ..nn.conv_as_2d import Conv1dAs2d, conv_as_2d_reason
from ..nn.conv_as_matmul import Conv1dAsMatmul, conv_as_matmul_reason
from ..nn.conv_phases import Conv1dByPhases, conv_by_phases_reason
from ..nn.fused_depthwise import FusedDepthwiseConv1d, fusable_reason
from ..nn.eager_island import EagerIsland
from ..nn.saved_precision import LowPrecisionSaved
from ..nn.tiled import Tiled
from ..strategies._common import swap_modules
from .costs import ChainCosts, chain_span, fused_chains
from .solver import Choice

__all__ = ["Plan", "PlanSegment", "apply_", "structure_of", "ISLAND_OPTIONS"]

_VERSION = 1
ISLAND_OPTIONS = ("offload", "chunk")  # apply_ runs them as EagerIsland: NOTE [Eager islands in compiled plans]

# The modules a plan swaps one by one, inside the blocks: (its field of names, what it does to one,
# why a module cannot be so, the wrapper, the way it computes a Conv1d -- one way per Conv1d).
_SWAPS = (
    ("pools", "runs the max-pool {!r} compactly", compact_pool_reason, CompactMaxPool1d, None),
    ("convs_2d", "computes the Conv1d {!r} as a conv2d", conv_as_2d_reason, Conv1dAs2d, "as a conv2d"),
    ("convs_by_phases", "computes the Conv1d {!r} by phases", conv_by_phases_reason, Conv1dByPhases, "by phases"),
    ("convs_depthwise", "runs the Conv1d {!r} on convmem's depthwise kernel", fusable_reason,
     FusedDepthwiseConv1d.from_conv1d, "on the depthwise kernel"),
    ("convs_as_matmul", "computes the Conv1d {!r} as a matmul", conv_as_matmul_reason, Conv1dAsMatmul, "as a matmul"),
)
# the Plan field of the Conv1ds each option of costs.FASTER_CONVS swaps (NOTE [Convs by phases in plans])
CONV_FIELDS = {"phases": "convs_by_phases", "depthwise": "convs_depthwise", "matmul": "convs_as_matmul"}


@dataclasses.dataclass(frozen=True)
class PlanSegment:
    """Blocks ``[start, stop)`` of the chain and the option chosen for them."""

    start: int
    stop: int
    option: str
    tile_length: Optional[int] = None
    batch_chunk: Optional[int] = None  # samples per backward recomputation of a tiled or chunked segment
    kept_bytes: int = 0  # predicted: held from forward to backward
    working_bytes: int = 0  # predicted: held while its backward runs
    extra_s: float = 0.0  # predicted extra step time

    @classmethod
    def from_choice(cls, c: Choice) -> "PlanSegment":
        return cls(c.start, c.stop, c.option, c.tile_length, c.batch_chunk, c.kept, c.working, c.extra_s)

    @property
    def label(self) -> str:
        if self.option == "chunk" and self.batch_chunk:  # NOTE [Chunk sizes] in costs.py
            return f"chunk {self.batch_chunk}"
        if self.option != "tile":
            return self.option
        return f"tile {self.tile_length}" + (f", batch chunk {self.batch_chunk}" if self.batch_chunk else "")


@dataclasses.dataclass
class Plan:
    """What `convmem.optimize_` chose, and what it predicts. Bytes and seconds."""

    model: str
    items: List[str]  # qualified names of the blocks, in forward order
    chain: Optional[str]  # the Sequential holding them, when runs of several are segments
    segments: List[PlanSegment]
    budget_bytes: int
    length: int  # input length the plan is for
    predicted_peak_bytes: int
    predicted_extra_s: float
    eager_peak_bytes: int  # estimate of the untouched model at `length`
    estimated_peak_bytes: Optional[int] = None  # estimate of the optimized model (convmem.profile)
    measured_peak_bytes: Optional[int] = None  # on a GPU, after applying
    measured_step_s: Optional[float] = None
    measured_compiled: bool = False  # the measurement ran under torch.compile
    measured_compile_mode: Optional[str] = None  # ... in this mode (None: the default one)
    eager_measured_peak_bytes: Optional[int] = None
    eager_step_s: Optional[float] = None
    lossy_gradient_error: Optional[float] = None  # lossy options: relative L2 error of all gradients, measured
    times: str = "modelled"
    structure: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    costs: Optional[ChainCosts] = None
    pools: List[str] = dataclasses.field(default_factory=list)  # run compact: NOTE [Compact max-pools in plans]
    # Conv1ds computed as conv2d for Inductor's layouts: NOTE [Conv layouts in compiled plans]
    convs_2d: List[str] = dataclasses.field(default_factory=list)
    # dilated Conv1ds computed by phases, where that measured faster: NOTE [Convs by phases in plans]
    convs_by_phases: List[str] = dataclasses.field(default_factory=list)
    # depthwise Conv1ds on convmem's Triton kernel, where that measured faster: the same NOTE
    convs_depthwise: List[str] = dataclasses.field(default_factory=list)
    # Conv1ds with few input channels as one matmul, where that measured faster: the same NOTE
    convs_as_matmul: List[str] = dataclasses.field(default_factory=list)
    # made for compiled training: chunked blocks compile on their own in their islands (NOTE [Compiled chunks])
    compiled: bool = False

    # ------------------------------------------------------------------ what it says
    def explain(self) -> str:
        """Per block: the choice, kept bytes before and after, predicted extra time; then the peaks."""
        lines = [f"convmem plan for {self.model} (input length {self.length}, budget {format_bytes(self.budget_bytes)})"]
        by_item = {it.name: it for it in (self.costs.items if self.costs else [])}
        scale = self.costs.scale(self.length) if self.costs else 1.0
        rows = []
        for seg in self.segments:
            names = self.items[seg.start:seg.stop]
            before = sum(by_item[n].kept_before for n in names if n in by_item) * scale if by_item else None
            label = seg.label if len(names) == 1 else f"{seg.label} ({len(names)} blocks)"
            first = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            rows.append((first, label, format_bytes(before), format_bytes(seg.kept_bytes), f"{seg.extra_s * 1e3:.2f} ms"))
        header = ("block", "choice", "kept before", "kept after", "extra time")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for r in [header] + rows:
            lines.append("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        lines.append(f"  predicted peak {format_bytes(self.predicted_peak_bytes)} (untouched: "
                     f"{format_bytes(self.eager_peak_bytes)}); predicted extra time {self.predicted_extra_s * 1e3:.2f} ms "
                     f"({self.times})")
        if self.pools:
            shown = ", ".join(self.pools[:4]) + (f" and {len(self.pools) - 4} more" if len(self.pools) > 4 else "")
            lines.append(f"  max-pools keeping int8 window offsets instead of their input and int64 indices: {shown}")
        if self.convs_by_phases:
            lines.append(f"  {len(self.convs_by_phases)} dilated Conv1d computed by phases, as undilated conv2d "
                         "(their forward and backward measured faster so)")
        if self.convs_depthwise:
            lines.append(f"  {len(self.convs_depthwise)} depthwise Conv1d on convmem's Triton kernel "
                         "(their forward and backward measured faster so)")
        if self.convs_as_matmul:
            lines.append(f"  {len(self.convs_as_matmul)} Conv1d with few input channels computed as one matmul over "
                         "their unfolded input (their forward and backward measured faster so)")
        proposed = [n for names in self.costs.swapped_convs().values() for n in names] if self.costs else []
        swapped = {n for field in CONV_FIELDS.values() for n in getattr(self, field)}
        left = [n for n in proposed if n not in swapped]
        if self.compiled and left:  # NOTE [Convs by phases in plans]: the compiled step decided
            graphs = ("" if self.measured_compile_mode == "reduce-overhead" else
                      "; under CUDA graphs (compiled='reduce-overhead') the host time would not count")
            lines.append(f"  {len(left)} Conv1d measured faster alone (by phases, on convmem's depthwise kernel or "
                         "as a matmul) "
                         f"left as they are: the untouched model compiled measured no faster with them{graphs}")
        if self.convs_2d:
            lines.append(f"  {len(self.convs_2d)} Conv1d computed as conv2d, for torch.compile's channels-last layouts "
                         "(the compiled step measured faster so)")
        islands = sum(s.stop - s.start for s in self.segments if s.option in ISLAND_OPTIONS)
        if islands:  # NOTE [Eager islands in compiled plans]
            apart = "; chunked blocks compile on their own there (NOTE [Compiled chunks])" if self.compiled else ""
            lines.append(f"  {islands} offloaded or chunked block{'s' if islands > 1 else ''} run outside the graphs "
                         f"of torch.compile (EagerIsland: the graph breaks around each){apart}")
        if self.estimated_peak_bytes is not None:
            lines.append(f"  estimate of the optimized model (convmem.profile): {format_bytes(self.estimated_peak_bytes)}")
        if any(s.option == "bf16" for s in self.segments):
            error = (f"relative gradient error {self.lossy_gradient_error:.2e} (L2, all gradients) on the example inputs"
                     if self.lossy_gradient_error is not None else "gradient error not measured (meta inputs)")
            lines.append(f"  LOSSY: bfloat16 saved tensors change gradients (outputs unchanged); {error}")
        if self.measured_peak_bytes is not None:
            eager = (f" (untouched {format_bytes(self.eager_measured_peak_bytes)}, {self.eager_step_s * 1e3:.1f} ms)"
                     if self.eager_measured_peak_bytes is not None and self.eager_step_s is not None else "")
            mode = f"(mode={self.measured_compile_mode!r})" if self.measured_compile_mode else ""
            how = f" under torch.compile{mode}" if self.measured_compiled else ""
            lines.append(f"  measured{how}: peak {format_bytes(self.measured_peak_bytes)}, step "
                         f"{self.measured_step_s * 1e3:.1f} ms{eager}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    # ------------------------------------------------------------------ data
    def swapped_modules(self) -> Dict[str, List[str]]:
        """The names of the modules the plan swaps inside the blocks, by its field of each kind, in
        `_SWAPS` order (pools, convs_2d, then CONV_FIELDS')."""
        return {field: list(getattr(self, field)) for field, *_ in _SWAPS}

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["version"] = _VERSION
        data["segments"] = [dataclasses.asdict(s) for s in self.segments]
        data["structure"] = [list(s) for s in self.structure]
        data["costs"] = self.costs.to_dict() if self.costs is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Plan":
        data = dict(data)
        version = data.pop("version", None)
        if version != _VERSION:
            raise ValueError(f"Plan.from_dict: this convmem reads plans of version {_VERSION}, got {version!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Plan.from_dict: unknown keys {unknown}")
        data["segments"] = [PlanSegment(**s) for s in data["segments"]]
        data["structure"] = [tuple(s) for s in data.get("structure", [])]
        data["costs"] = ChainCosts.from_dict(data["costs"]) if data.get("costs") else None
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _roots(items: Sequence[str], chain: Optional[str]) -> List[str]:
    """The containers whose whole contents a plan depends on: the chain and the modules beside it
    (NOTE [Modules beside the blocks]), or the blocks' parents."""
    if chain:
        first, last = chain_span(items, chain)
        return [chain] + [name for i, name in enumerate(items) if not first <= i < last]
    return list(dict.fromkeys(name.rpartition(".")[0] for name in items))


def structure_of(model: nn.Module, items: Sequence[str], chain: Optional[str]) -> List[Tuple[str, str]]:
    """(name, class) of every module inside the containers that hold the blocks: what a plan must
    find again (NOTE [A plan checks the model it is applied to])."""
    out = []
    for root in _roots(items, chain):
        module = model.get_submodule(root) if root else model
        for name, sub in module.named_modules():
            if isinstance(sub, ModuleWrapper):
                continue
            full = ".".join(p for p in (root, name) if p)
            out.append((full.replace(".wrapped", "").replace("wrapped.", ""), type(sub).__name__))
    return out


def _check_structure(model: nn.Module, plan: Plan) -> None:
    """NOTE [A plan checks the model it is applied to]."""
    for name, cls in plan.structure:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"apply_: this plan was made for a {plan.model} with a module {name!r} ({cls}); "
                f"{type(model).__name__} has no module of that name"
            ) from None
        if isinstance(module, ModuleWrapper):
            raise ValueError(f"apply_: {name!r} is already wrapped by convmem ({type(module).__name__}); "
                             "call convmem.restore_(model) first")
        if type(module).__name__ != cls:
            raise ValueError(
                f"apply_: this plan was made for a {plan.model} whose module {name!r} is a {cls}; "
                f"here it is a {type(module).__name__}"
            )
    if plan.chain:
        expected = sum(1 for name, _ in plan.structure
                       if name.startswith(plan.chain + ".") and name.count(".") == plan.chain.count(".") + 1)
        have = len(model.get_submodule(plan.chain))
        if have != expected:
            raise ValueError(f"apply_: {plan.chain!r} has {have} items here, the plan was made for {expected}")
    for field, what, reason_of, _, _ in _SWAPS:
        for name in getattr(plan, field):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"apply_: this plan {what.format(name)}; {type(model).__name__} "
                                 "has no module of that name") from None
            reason = reason_of(module)
            if reason is not None:
                raise ValueError(f"apply_: this plan {what.format(name)}; here it is {reason}")
    way_of: Dict[str, str] = {}
    for field, _, _, _, way in _SWAPS:
        for name in getattr(plan, field) if way is not None else ():
            if name in way_of:
                raise ValueError(f"apply_: this plan computes the Conv1d {name!r} both {way_of[name]} and {way}; "
                                 "a convolution runs one way")
            way_of[name] = way
    planned = {name for name, _ in plan.structure}
    for name, cls in structure_of(model, plan.items, plan.chain):
        if name not in planned:
            raise ValueError(
                f"apply_: this {type(model).__name__} has a module {name!r} ({cls}) that the {plan.model} "
                "the plan was made for does not have"
            )


def _item_wrappers(model: nn.Module, plan: Plan, inside: List[PlanSegment], multi: bool) -> Dict[str, nn.Module]:
    """The wrapper of every item a segment wraps one by one, by name (runs of the chain: `apply_`)."""
    replacements: Dict[str, nn.Module] = {}
    group = None
    for seg in plan.segments:
        names = plan.items[seg.start:seg.stop]
        if seg.option == "tile" and len(names) > 1:
            continue  # the whole chain: apply_
        if seg.option == "checkpoint" and len(names) > 1:
            continue  # a run of the chain: apply_
        for name in names:
            module = model.get_submodule(name)
            if seg.option == "keep":
                continue
            if seg.option == "selective":
                replacements[name] = Checkpointed(module, "selective")
            elif seg.option == "checkpoint":
                if not multi or seg not in inside:
                    replacements[name] = Checkpointed(module, "full")
            elif seg.option == "tile":
                replacements[name] = Tiled(module, seg.tile_length, name=name)
            elif seg.option == "chunk":  # NOTE [Chunk sizes]; NOTE [Eager islands in compiled plans]; [Compiled chunks]
                chunked = BatchChunked(module, seg.batch_chunk or 1, compile_block=plan.compiled)
                replacements[name] = EagerIsland(chunked)
            elif seg.option == "fuse":
                replacements.update(fused_chains(model, name))  # NOTE [Fused chains as an option]
            elif seg.option == "bf16":
                replacements[name] = LowPrecisionSaved(module)
            elif seg.option == "offload":
                from ..nn.offloaded import OffloadGroup, Offloaded
                group = group or OffloadGroup()
                replacements[name] = EagerIsland(Offloaded(module, group=group))
            else:
                raise ValueError(f"apply_: unknown option {seg.option!r} in the plan")
    return replacements


def apply_(model: nn.Module, plan: Plan) -> nn.Module:
    """Put `plan` on `model` in place (a fresh instance of the model it was made for); returns `model`.

    Exact: outputs, gradients and buffers are those of the untouched model; ``convmem.restore_``
    takes the plan off again. Offloaded and batch-chunked blocks run eagerly also when the model is
    compiled (`EagerIsland`, NOTE [Eager islands in compiled plans]). Raises, before changing
    anything, when `model` is not the model the plan was made for (NOTE [A plan checks the model it
    is applied to]).

    Example::

        >>> plan = convmem.optimize_(model, x, budget="4GiB")
        >>> open("plan.json", "w").write(plan.to_json())
        >>> convmem.apply_(fresh_model, convmem.Plan.from_json(open("plan.json").read()))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_: plan must be a convmem Plan (Plan.from_dict reads a saved one), got {type(plan).__name__}")
    _check_structure(model, plan)
    multi = any(seg.stop - seg.start > 1 for seg in plan.segments)
    first, last = chain_span(plan.items, plan.chain)
    # the chain's segments; the modules beside it take theirs one by one (NOTE [Modules beside the blocks])
    inside = [seg for seg in plan.segments if first <= seg.start < last]
    # modules inside the blocks first, then the blocks' wrappers around them
    undo_inner = swap_modules(model, {name: wrap(model.get_submodule(name))
                                      for field, _, _, wrap, _ in _SWAPS for name in getattr(plan, field)})
    try:
        replacements = _item_wrappers(model, plan, inside, multi)
    except Exception:
        undo_inner()
        raise
    undo_blocks = swap_modules(model, replacements)

    def undo() -> None:
        undo_blocks()
        undo_inner()

    try:
        if multi and inside:
            seq = model.get_submodule(plan.chain)
            if len(inside) == 1 and inside[0].option == "tile":
                only = inside[0]
                swap_modules(model, {plan.chain: Tiled(seq, only.tile_length, batch_chunk=only.batch_chunk, name=plan.chain)})
            else:
                sizes = [s.stop - s.start for s in inside]
                flags = [s.option == "checkpoint" for s in inside]
                swap_modules(model, {plan.chain: Checkpointed(seq, "full", sizes, recompute=flags)})
    except Exception:
        undo()
        raise
    return model
