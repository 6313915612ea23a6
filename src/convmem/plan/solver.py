"""Which strategy where: the chain solver behind `convmem.optimize_`.

# NOTE [Chain cost model]
# The model's blocks form a chain, items 0..n-1 in forward order. A plan cuts the chain into
# consecutive segments and gives each an option; an option o on segment s costs
#
#     kept(s, o)     bytes it holds from its forward until its backward (its saved tensors),
#     working(s, o)  bytes it holds while its own backward runs (what it recomputes or fetches back,
#                    plus the gradients flowing through it),
#     extra(s, o)    seconds it adds to the step (recomputation, transfers, halos).
#
# Backward visits the segments in reverse: while segment s runs its backward, the segments before it
# still hold what they kept and the ones after it have released theirs. With `base` for what the
# chain does not change (parameters, their gradients, inputs, the rest of the model, workspace):
#
#     peak = max( forward_base + sum_s kept(s),                            # end of forward
#                 base + max_s [ sum_{t < s} kept(t) + working(s) ] )   # backward of s
#
# (`forward_base` >= `base` holds what is alive beside the kept bytes when forward peaks: outputs
# the model collects until its end, as WaveNet's skip connections.)
# This is the single-level model of optimal checkpointing for heterogeneous chains (rotor: Beaumont
# et al., "Optimal checkpointing for heterogeneous chains", 2019), with more options than
# keep/recompute: a segment may also be recomputed selectively, offloaded, or tiled along its
# length, each with its own (kept, working, extra).
#
# The prefix structure makes a dynamic programme exact: the state after the first j items is the
# bytes they keep; every segment added must fit `budget - base - prefix` with its working bytes. For
# each j the programme keeps the Pareto front of (kept bytes, extra seconds) over all plans of the
# first j items that respect the budget so far -- a plan that keeps more and costs more time can
# never complete better -- so the least-time plan of the whole chain within the budget is found
# exactly. Partial plans whose kept bytes differ by less than a `grain` (1/4096 of the budget by
# default) count as equal, so that blocks which differ by a few bytes do not multiply the front;
# grain=1 is exact, and feasibility is always checked on exact bytes. The same programme with the
# objective "least peak" finds the smallest feasible budget. `brute_force` enumerates every plan of small chains for the tests.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence

__all__ = ["Choice", "ChainProblem", "Solution", "solve", "min_peak", "brute_force", "peak_of"]

_GRAIN_STEPS = 4096

# Options on one item only; the others ("checkpoint", "tile") may span several consecutive items.
SINGLE_ITEM_OPTIONS = ("keep", "selective", "offload", "chunk", "bf16", "fuse")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The cost of running items ``[start, stop)`` as one segment with `option` (NOTE [Chain cost model])."""

    start: int
    stop: int
    option: str  # keep | selective | offload | checkpoint | tile
    kept: int
    working: int
    extra_s: float
    tile_length: Optional[int] = None
    batch_chunk: Optional[int] = None
    alive: int = 0  # bytes it leaves alive until forward ends (outputs the model collects), not kept

    @property
    def label(self) -> str:
        if self.option == "chunk" and self.batch_chunk:  # NOTE [Chunk sizes] in costs.py
            return f"chunk {self.batch_chunk}"
        if self.option != "tile":
            return self.option
        return f"tile {self.tile_length}" + (f"/{self.batch_chunk}" if self.batch_chunk else "")


@dataclasses.dataclass
class ChainProblem:
    """Every segment choice the solver may use, and the bytes outside the chain."""

    n_items: int
    base: int
    choices: List[Choice]
    forward_base: Optional[int] = None  # bytes beside the kept ones at the forward's own peak (default: base)

    def __post_init__(self) -> None:
        if self.forward_base is None:
            self.forward_base = self.base
        self.by_start: Dict[int, List[Choice]] = {}
        for c in self.choices:
            if not 0 <= c.start < c.stop <= self.n_items:
                raise ValueError(f"choice {c} lies outside the chain of {self.n_items} items")
            self.by_start.setdefault(c.start, []).append(c)


@dataclasses.dataclass
class Solution:
    segments: List[Choice]
    peak: int
    extra_s: float


def peak_of(problem: ChainProblem, segments: Sequence[Choice]) -> int:
    """The predicted peak of a plan (NOTE [Chain cost model])."""
    prefix, worst, alive = 0, 0, 0
    for seg in segments:
        worst = max(worst, prefix + seg.working)
        prefix += seg.kept
        alive += seg.alive
    return max(problem.base + worst, max(problem.base, problem.forward_base) + prefix + alive)


@dataclasses.dataclass
class _State:
    kept: int
    alive: int
    cost: float  # extra seconds (solve) or peak so far (min_peak)
    choice: Optional[Choice]
    parent: Optional["_State"]


def _front(states: List[_State], grain: int) -> List[_State]:
    """Pareto front over (kept, kept + alive, cost), bytes counted in units of `grain`: drop every
    state another one beats or equals on all three (ties: the first in sorted order wins)."""
    states.sort(key=lambda s: (s.kept // grain, (s.kept + s.alive) // grain, s.cost))
    front: List[_State] = []
    if all(s.alive == 0 for s in states):
        for s in states:
            if not front or s.cost < front[-1].cost:
                front.append(s)
        return front
    for s in states:
        total = (s.kept + s.alive) // grain
        if not any((f.kept + f.alive) // grain <= total and f.cost <= s.cost for f in front):
            front.append(s)
    return front


def _run(problem: ChainProblem, budget: Optional[int], objective: str, grain: int) -> Optional[Solution]:
    n = problem.n_items
    fronts: List[List[_State]] = [[] for _ in range(n + 1)]
    fronts[0] = [_State(0, 0, 0.0, None, None)]
    for j in range(n):
        fronts[j] = _front(fronts[j], grain)
        for state in fronts[j]:
            for c in problem.by_start.get(j, []):
                during = problem.base + state.kept + c.working
                if budget is not None and during > budget:
                    continue
                if objective == "time":
                    cost = state.cost + c.extra_s
                else:
                    cost = max(state.cost, during)
                fronts[c.stop].append(_State(state.kept + c.kept, state.alive + c.alive, cost, c, state))
    finals = []
    for state in fronts[n]:
        end = max(problem.base, problem.forward_base) + state.kept + state.alive
        if budget is not None and end > budget:
            continue
        finals.append((state.cost if objective == "time" else max(state.cost, end), state.kept, state))
    if not finals:
        return None
    _, _, best = min(finals, key=lambda f: (f[0], f[1]))
    segments: List[Choice] = []
    state = best
    while state.choice is not None:
        segments.append(state.choice)
        state = state.parent
    segments.reverse()
    return Solution(segments, peak_of(problem, segments), sum(c.extra_s for c in segments))


def _default_grain(problem: ChainProblem, budget: Optional[int]) -> int:
    scale = budget if budget is not None else problem.base + sum(c.working for c in problem.choices if c.option == "keep")
    return max(1, scale // _GRAIN_STEPS)


def solve(problem: ChainProblem, budget: int, grain: Optional[int] = None) -> Optional[Solution]:
    """The plan with the least extra time whose predicted peak is within `budget`, or None.

    `grain`: bytes below which two partial plans count as keeping the same (NOTE [Chain cost
    model]); default budget / 4096. 1 makes the search exact; the result is always within budget.
    """
    if problem.n_items == 0:
        peak = peak_of(problem, [])
        return Solution([], peak, 0.0) if peak <= budget else None
    return _run(problem, budget, "time", grain or _default_grain(problem, budget))


def min_peak(problem: ChainProblem, grain: Optional[int] = None) -> Optional[Solution]:
    """The plan with the smallest predicted peak (the smallest feasible budget), and of the plans
    with that peak the one with the least extra time; None if no plan covers the chain.

    Plans often tie on the peak: it is set by one block's backward, and the blocks after it may
    keep what they like below it. On an H200, wav2vec 2.0's least-peak plan (its first two layers in
    chunks of one sample, the rest checkpointed) predicted 3.34 GiB and 14.5 ms of extra time, and
    the plan with the first layer in chunks of four and the last five kept predicted the same peak
    at 9.7 ms."""
    if problem.n_items == 0:
        return Solution([], peak_of(problem, []), 0.0)
    least = _run(problem, None, "peak", grain or _default_grain(problem, None))
    if least is None:
        return None
    fastest = solve(problem, least.peak, grain)
    return fastest if fastest is not None and fastest.extra_s < least.extra_s else least


def _plans(problem: ChainProblem, start: int) -> Iterator[List[Choice]]:
    if start == problem.n_items:
        yield []
        return
    for c in problem.by_start.get(start, []):
        for rest in _plans(problem, c.stop):
            yield [c] + rest


def brute_force(problem: ChainProblem, budget: int) -> Optional[Solution]:
    """Every plan of the chain, the least extra time within `budget` (tests only: exponential)."""
    best: Optional[Solution] = None
    for plan in _plans(problem, 0):
        peak = peak_of(problem, plan)
        if peak > budget:
            continue
        extra = sum(c.extra_s for c in plan)
        if best is None or extra < best.extra_s - 1e-15:
            best = Solution(plan, peak, extra)
    return best
