"""The chain solver against exhaustive search (NOTE [Chain cost model] in plan/solver.py).

Random small chains: every option kind (keep, selective, offload on one item; checkpoint over runs
of 1..n items; tile on one item or the whole chain), random kept/working/extra/alive bytes, random
base and forward_base. For every budget where the answer changes (each plan's peak, one byte below
it, below the smallest feasible budget) `solve(..., grain=1)` must find the least extra time that
`brute_force` finds, and `min_peak(..., grain=1)` the smallest peak of any plan, the fastest such plan. Extra times are
small integers so that sums are exact and ties are ties.
"""
from __future__ import annotations

import random
from typing import Iterator, List, Optional

import pytest

from convmem.plan.solver import ChainProblem, Choice, Solution, brute_force, min_peak, peak_of, solve

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a dev dependency; the seeded sweep below runs without it
    given = None


# ---------------------------------------------------------------------------------------- helpers
def _all_plans(problem: ChainProblem) -> Iterator[List[Choice]]:
    """Every cover of items [0, n) by consecutive choices; written apart from the solver's own."""
    by_start = {}
    for c in problem.choices:
        by_start.setdefault(c.start, []).append(c)

    def rest(start: int) -> Iterator[List[Choice]]:
        if start == problem.n_items:
            yield []
            return
        for c in by_start.get(start, []):
            for tail in rest(c.stop):
                yield [c] + tail

    return rest(0)


def _reference_peak(problem: ChainProblem, plan: List[Choice]) -> int:
    """NOTE [Chain cost model], term by term: end of forward, then the backward of each segment."""
    end = max(problem.base, problem.forward_base) + sum(c.kept + c.alive for c in plan)
    backward = [problem.base + sum(t.kept for t in plan[:s]) + plan[s].working for s in range(len(plan))]
    return max([end] + backward)


def _choice(rng: random.Random, start: int, stop: int, option: str, tile_length: Optional[int] = None) -> Choice:
    return Choice(
        start, stop, option,
        kept=rng.randint(0, 40), working=rng.randint(0, 70), extra_s=float(rng.randint(0, 9)),
        tile_length=tile_length, alive=rng.randint(1, 12) if rng.random() < 0.3 else 0,
    )


def random_problem(rng: random.Random, n: int) -> ChainProblem:
    choices: List[Choice] = []
    for i in range(n):
        for option, p in (("keep", 0.9), ("selective", 0.5), ("offload", 0.4)):
            if rng.random() < p:
                choices.append(_choice(rng, i, i + 1, option))
        if rng.random() < 0.35:
            choices.append(_choice(rng, i, i + 1, "tile", tile_length=rng.choice((64, 128, 256))))
        for stop in range(i + 1, n + 1):
            if rng.random() < 0.45:
                choices.append(_choice(rng, i, stop, "checkpoint"))
    if rng.random() < 0.5:
        choices.append(_choice(rng, 0, n, "tile", tile_length=rng.choice((64, 128))))
    rng.shuffle(choices)  # the solver must not depend on the order choices come in
    base = rng.randint(0, 30)
    forward_base = rng.choice([None, base, base + rng.randint(1, 25), rng.randint(0, base)])
    return ChainProblem(n, base, choices, forward_base)


def _budgets(peaks: List[int], rng: random.Random) -> List[int]:
    """Budgets where the answer changes: at and just below every distinct peak, and below them all."""
    distinct = sorted(set(peaks))
    budgets = {distinct[0] - 1, distinct[0] - 17, 0, distinct[-1] + 5}
    for p in distinct:
        budgets.update((p, p - 1))
    budgets = sorted(budgets)
    return budgets if len(budgets) <= 14 else sorted(rng.sample(budgets, 14) + [distinct[0], distinct[0] - 1])


def _assert_valid(problem: ChainProblem, solution: Solution) -> None:
    """A solution covers the chain with the problem's own choices, and says its own peak and time."""
    position = 0
    for c in solution.segments:
        assert c in problem.choices
        assert c.start == position
        position = c.stop
    assert position == problem.n_items
    assert solution.peak == peak_of(problem, solution.segments) == _reference_peak(problem, solution.segments)
    assert solution.extra_s == sum(c.extra_s for c in solution.segments)


def check_against_brute_force(problem: ChainProblem, rng: random.Random) -> None:
    plans = list(_all_plans(problem))
    for plan in plans[:200]:
        assert peak_of(problem, plan) == _reference_peak(problem, plan)

    floor = min_peak(problem, grain=1)
    if not plans:
        assert floor is None
        assert solve(problem, 10**9, grain=1) is None and brute_force(problem, 10**9) is None
        return
    peaks = [peak_of(problem, plan) for plan in plans]
    assert floor is not None, "min_peak found no plan, but there is one"
    _assert_valid(problem, floor)
    assert floor.peak == min(peaks)
    # of the plans with the least peak, the fastest (exact sums: extra times are small integers)
    assert floor.extra_s == min(sum(c.extra_s for c in p) for p, peak in zip(plans, peaks) if peak == floor.peak)

    for budget in _budgets(peaks, rng):
        expected = brute_force(problem, budget)
        got = solve(problem, budget, grain=1)
        best = min((sum(c.extra_s for c in p) for p, peak in zip(plans, peaks) if peak <= budget), default=None)
        assert (expected is None) == (best is None)  # brute_force itself against the enumeration above
        assert (got is None) == (expected is None), f"budget {budget}: solve {got}, brute force {expected}"
        if got is None:
            assert budget < floor.peak
            continue
        _assert_valid(problem, got)
        assert got.peak <= budget
        assert got.extra_s == expected.extra_s == best, f"budget {budget}: solve {got}, brute force {expected}"
    # At the smallest feasible budget there is a plan, one byte below there is none.
    assert solve(problem, floor.peak, grain=1) is not None
    assert solve(problem, floor.peak - 1, grain=1) is None


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", range(6))
def test_solve_and_min_peak_match_brute_force_on_random_chains(seed):
    rng = random.Random(1000 + seed)
    for case in range(60):
        n = 1 + case % 6
        check_against_brute_force(random_problem(rng, n), rng)


def test_single_item_and_keep_only_chains():
    # One item, one option: the peak is the larger of the forward's end and its backward.
    problem = ChainProblem(1, 10, [Choice(0, 1, "keep", kept=5, working=8, extra_s=0.0)], forward_base=14)
    assert peak_of(problem, problem.choices) == max(14 + 5, 10 + 8)
    assert solve(problem, 19, grain=1).peak == 19
    assert solve(problem, 18, grain=1) is None
    assert min_peak(problem, grain=1).peak == 19
    # Keep everywhere: backward of the last block holds everything kept before it.
    keep = [Choice(i, i + 1, "keep", kept=3, working=7, extra_s=0.0) for i in range(4)]
    problem = ChainProblem(4, 100, keep)
    assert min_peak(problem, grain=1).peak == 100 + 3 * 3 + 7


def test_checkpoint_trades_time_for_memory():
    keep = [Choice(i, i + 1, "keep", kept=10, working=12, extra_s=0.0) for i in range(2)]
    span = Choice(0, 2, "checkpoint", kept=1, working=15, extra_s=5.0)
    last = Choice(1, 2, "checkpoint", kept=1, working=8, extra_s=2.0)
    problem = ChainProblem(2, 100, keep + [span, last])
    # keep, keep: the last backward holds 10 kept + 12 working -> 122, no extra time.
    assert solve(problem, 122, grain=1).segments == keep
    # keep, checkpoint: max(100 + 12, 100 + 10 + 8) = 118 for 2 s; both as one segment: 115 for 5 s.
    assert solve(problem, 121, grain=1).segments == [keep[0], last]
    assert solve(problem, 117, grain=1).segments == [span]
    assert solve(problem, 114, grain=1) is None
    assert min_peak(problem, grain=1).segments == [span]


def test_default_grain_is_within_budget_and_never_beats_exact():
    """The default grain (budget / 4096) may lose optimality, never feasibility of what it returns."""
    rng = random.Random(7)
    for case in range(80):
        small = random_problem(rng, 1 + case % 6)
        scale = 10**6
        problem = ChainProblem(
            small.n_items, small.base * scale + rng.randint(0, scale),
            [Choice(c.start, c.stop, c.option, c.kept * scale + rng.randint(0, scale // 100),
                    c.working * scale + rng.randint(0, scale // 100), c.extra_s, c.tile_length,
                    alive=c.alive * scale) for c in small.choices],
            small.forward_base * scale,
        )
        exact_floor = min_peak(problem, grain=1)
        if exact_floor is None:
            assert min_peak(problem) is None
            continue
        rough_floor = min_peak(problem)
        assert rough_floor is not None and rough_floor.peak >= exact_floor.peak
        _assert_valid(problem, rough_floor)
        for budget in (exact_floor.peak, rough_floor.peak, int(rough_floor.peak * 1.3)):
            exact = solve(problem, budget, grain=1)
            rough = solve(problem, budget)
            if rough is not None:
                _assert_valid(problem, rough)
                assert rough.peak <= budget
                assert rough.extra_s >= exact.extra_s


def test_choices_outside_the_chain_are_refused():
    with pytest.raises(ValueError, match="outside the chain"):
        ChainProblem(2, 0, [Choice(1, 3, "checkpoint", 1, 1, 0.0)])
    with pytest.raises(ValueError, match="outside the chain"):
        ChainProblem(2, 0, [Choice(1, 1, "keep", 1, 1, 0.0)])


def test_no_plan_covers_the_chain():
    # Item 1 has no option at all: nothing covers the chain, whatever the budget.
    problem = ChainProblem(3, 0, [Choice(0, 1, "keep", 1, 1, 0.0), Choice(2, 3, "keep", 1, 1, 0.0)])
    assert min_peak(problem, grain=1) is None
    assert solve(problem, 10**12, grain=1) is None
    assert brute_force(problem, 10**12) is None


def test_empty_chain_agrees_with_peak_of():
    problem = ChainProblem(0, 10, [], forward_base=20)
    assert peak_of(problem, []) == 20
    assert brute_force(problem, 15) is None
    assert min_peak(problem).peak == 20
    assert solve(problem, 15) is None


def test_star_import():
    namespace: dict = {}
    exec("from convmem.plan.solver import *", namespace)
    assert "solve" in namespace


# ------------------------------------------------------------------------------------- hypothesis
if given is not None:
    def _choices_strategy(n: int):
        def one(start: int, stop: int, option: str):
            return st.builds(
                Choice, st.just(start), st.just(stop), st.just(option),
                kept=st.integers(0, 40), working=st.integers(0, 70),
                extra_s=st.integers(0, 9).map(float),
                tile_length=st.just(128 if option == "tile" else None),
                alive=st.one_of(st.just(0), st.integers(0, 12)),
            )

        slots = [(i, i + 1, o) for i in range(n) for o in ("keep", "selective", "offload", "tile")]
        slots += [(i, j, "checkpoint") for i in range(n) for j in range(i + 1, n + 1)]
        slots += [(0, n, "tile")]
        return st.tuples(*[st.one_of(st.none(), one(*s)) for s in slots]).map(
            lambda cs: [c for c in cs if c is not None])

    @st.composite
    def problems(draw):
        n = draw(st.integers(1, 5))
        base = draw(st.integers(0, 30))
        forward_base = draw(st.one_of(st.none(), st.integers(0, 60)))
        return ChainProblem(n, base, draw(_choices_strategy(n)), forward_base)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problems(), st.randoms(use_true_random=False))
    def test_property_solve_matches_brute_force(problem, rng):
        check_against_brute_force(problem, rng)
