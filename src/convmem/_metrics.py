"""Error metrics used by every strategy's report and test: one definition each."""
from __future__ import annotations

import math

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
