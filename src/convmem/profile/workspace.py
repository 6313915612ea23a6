"""Scratch memory that CUDA libraries take through PyTorch's allocator, modelled for the estimate.

# NOTE [cuDNN workspace]
# cuDNN convolutions allocate a workspace through the caching allocator for the duration of the
# call; it shows in ``max_memory_allocated`` but in no tensor, so tensor-level tools miss it
# (pytorch issues 26950, 49207). Measured per op on an H200 (torch 2.11, cuDNN 9.19,
# benchmarks/op_probe.py), a dense convolution's forward or backward takes about 1.5 to 2 times
# its largest operand (tcn 2x, wav2vec 2.0's first layer 1.5x); depthwise and 1x1 convolutions of
# Conv-TasNet take almost none. 1.5x is the fraction that keeps every zoo model's estimate within
# a few percent of the measured peak (docs/BENCHMARKS.md, "Estimate accuracy").
#
# Steps that run batch norm (cuDNN) or a matrix product (cuBLAS) also keep about 64 MiB of library
# workspace allocated from the first call on (measured: 65-68 MiB above parameters and inputs on
# resnet1d, conformer_conv and basenji, none on the zoo models without either).
"""
from __future__ import annotations

import dataclasses

import torch

aten = torch.ops.aten

_CONVOLUTIONS = frozenset({aten.convolution.default, aten.convolution_backward.default})
_LIBRARY_OPS = frozenset({
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "mm", "addmm", "bmm", "baddbmm",
})


@dataclasses.dataclass(frozen=True)
class CudaModel:
    """What the estimate assumes about the CUDA side of a step (NOTE [cuDNN workspace]).

    conv_workspace_fraction: cuDNN scratch per convolution call, as a fraction of the bytes of the
        call's largest operand; it counts while the call runs.
    library_workspace_bytes: workspace kept from the first batch norm or matrix product on.
    """

    conv_workspace_fraction: float = 1.5
    library_workspace_bytes: int = 64 * 2**20

    def __post_init__(self):
        if self.conv_workspace_fraction < 0 or self.library_workspace_bytes < 0:
            raise ValueError("workspace sizes cannot be negative")

    def workspace_bytes(self, func, args, kwargs, out) -> int:
        """Scratch bytes `func` holds while it runs."""
        if func not in _CONVOLUTIONS or self.conv_workspace_fraction == 0:
            return 0
        tensors = [a for a in args[:3] if isinstance(a, torch.Tensor)]
        if isinstance(out, (tuple, list)):
            tensors += [t for t in out if isinstance(t, torch.Tensor)]
        elif isinstance(out, torch.Tensor):
            tensors.append(out)
        largest = max((t.numel() * t.element_size() for t in tensors), default=0)
        return int(self.conv_workspace_fraction * largest)

    def persistent_bytes(self, func) -> int:
        """Bytes a library keeps from the first call of `func` on (0 for most ops)."""
        return self.library_workspace_bytes if func._opname in _LIBRARY_OPS else 0


DEFAULT_CUDA_MODEL = CudaModel()
