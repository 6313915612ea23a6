"""Argument checks shared by modules, strategies, kernels and the zoo."""
from __future__ import annotations

import numbers
from typing import Any

__all__ = ["positive_int"]


def positive_int(value: Any, what: str) -> int:
    """`value` as an int of at least 1: a TypeError for anything not an integer (a bool included),
    a ValueError for one below 1; `what` names the argument in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{what} must be a positive integer (>= 1), got {value}")
    return int(value)
