"""Scratch memory that CUDA libraries take through PyTorch's allocator, modelled for the estimate.

# NOTE [cuDNN workspace]
# cuDNN convolutions allocate a workspace through the caching allocator for the duration of the
# call; it shows in ``max_memory_allocated`` but in no tensor, so tensor-level tools miss it
# (pytorch issues 26950, 49207). Its size depends on the algorithm cuDNN's heuristics pick. The
# figures below were calibrated against measured CUDA peaks (docs/BENCHMARKS.md, "Estimate
# accuracy"); `CudaModel` keeps them in one place so a user can override them.
"""
from __future__ import annotations

import dataclasses

import torch

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class CudaModel:
    """What the estimate assumes about the CUDA side of a step.

    conv_workspace_fraction: cuDNN scratch space per convolution call, as a fraction of the bytes
    of the call's largest operand (input, output or, in backward, their gradients).
    """

    conv_workspace_fraction: float = 0.0

    def workspace_bytes(self, func, args, kwargs, out) -> int:
        if self.conv_workspace_fraction <= 0:
            return 0
        if func in (aten.convolution.default, aten.convolution_backward.default):
            tensors = [a for a in args[:3] if isinstance(a, torch.Tensor)]
            largest = max((t.numel() * t.element_size() for t in tensors), default=0)
            return int(self.conv_workspace_fraction * largest)
        return 0


DEFAULT_CUDA_MODEL = CudaModel()
