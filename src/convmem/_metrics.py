"""Error metrics used by every strategy's report and test: one definition each."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """``||actual - expected|| / max(||expected||, floor)`` in float64.

    The floor keeps the metric finite where the reference is exactly zero (the gradient of the
    direction of a weight-norm of size one, say): there the result is the absolute error.
    """
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    denominator = max(torch.linalg.vector_norm(expected).item(), floor)
    return torch.linalg.vector_norm(actual - expected).item() / denominator


def sqnr_db(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(||ref||^2 / ||approx - ref||^2)``.

    ``inf`` when the two are equal.
    """
    reference = reference.detach().to(torch.float64)
    noise = torch.linalg.vector_norm(approximation.detach().to(torch.float64) - reference).item()
    signal = torch.linalg.vector_norm(reference).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20 * math.log10(signal / noise)


def gradient_error(reference: Dict[str, Optional[torch.Tensor]], other: Dict[str, Optional[torch.Tensor]]) -> float:
    """Relative L2 error of all gradients together, ``||a - b|| / ||b||`` over the gradients both
    dicts hold: the change in the step an optimizer takes.

    Not the worst tensor: a gradient that is zero in exact arithmetic (a conv bias before BatchNorm)
    has no scale of its own, and any rounding makes its own relative error unbounded.
    """
    diff, norm = 0.0, 0.0
    for name, ref in reference.items():
        got = other.get(name)
        if ref is None or got is None:
            continue
        ref, got = ref.detach().double(), got.detach().double()
        diff += (got - ref).pow(2).sum().item()
        norm += ref.pow(2).sum().item()
    return (diff / norm) ** 0.5 if norm > 0 else 0.0
