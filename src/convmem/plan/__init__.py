"""The planner behind `convmem.optimize_`: option costs per block, the chain solver, plans."""
from .costs import ChainCosts, ItemCost, chain_costs
from .plan import Plan, PlanSegment, apply_
from .solver import ChainProblem, Choice, Solution, brute_force, min_peak, solve

__all__ = [
    "ChainCosts", "ItemCost", "chain_costs", "Plan", "PlanSegment", "apply_",
    "ChainProblem", "Choice", "Solution", "brute_force", "min_peak", "solve",
]
