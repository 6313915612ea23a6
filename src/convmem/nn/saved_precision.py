"""`LowPrecisionSaved`: keep a module's saved activations in bfloat16 between forward and backward (lossy).

# NOTE [Saved tensors in low precision]
# Autograd keeps a module's activations from forward to backward only to compute gradients. Under
# ``saved_tensors_hooks`` each saved float32 (or float64) activation is cast to `dtype` (bfloat16 by
# default: the same exponent range as float32, 8 bits of mantissa) when it is saved, and cast back
# when backward unpacks it. Forward is untouched: outputs, losses and BatchNorm statistics are
# exactly those of the module. Gradients change: they are computed from activations rounded to
# `dtype` (relative error about 2**-9 per element for bfloat16), so this is a lossy strategy,
# opt-in through ``convmem.optimize_(..., lossy=True)``, which measures and reports the gradient
# error it causes on the example inputs (relative L2 error of all gradients together).
#
# Kept: half the bytes for float32 activations. Not cast: parameters (leaves that require grad),
# tensors below `min_bytes`, integer and already low-precision tensors, and the inputs of
# normalization layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm): their backward centres what
# they saved by its mean, and when the mean is large against the spread (a conv output with a large
# bias before BatchNorm) the rounding is all that is left -- on a conv -> BatchNorm block, casting
# the BatchNorm input made the input gradient 45x off instead of 2e-3. A tensor saved twice (or
# two saves of one view) is cast once per forward call. During backward each activation exists
# in float32 again while the op that unpacked it runs, as without the wrapper.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ._wrapper import ModuleWrapper

__all__ = ["LowPrecisionSaved"]

_CASTABLE = (torch.float32, torch.float64)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class _Cast:
    __slots__ = ("low", "dtype")

    def __init__(self, low: torch.Tensor, dtype: torch.dtype):
        self.low = low
        self.dtype = dtype


class LowPrecisionSaved(ModuleWrapper):
    """Run ``wrapped`` with its saved float activations kept in `dtype` (lossy: gradients change,
    outputs do not). NOTE [Saved tensors in low precision].

    Args:
        wrapped: any module, ``x: (batch, channels, length) -> ...``.
        dtype: ``torch.bfloat16`` (default) or ``torch.float16`` (narrower range: large
            activations may overflow).
        min_bytes: saved tensors smaller than this stay as they are.

    `state_dict()` keys are those of `wrapped`; ``convmem.restore_`` takes the wrapper out.
    """

    def __init__(self, wrapped: nn.Module, dtype: torch.dtype = torch.bfloat16, min_bytes: int = 1 << 16):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"LowPrecisionSaved: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"LowPrecisionSaved: min_bytes must be an int >= 0, got {min_bytes!r}")
        super().__init__(wrapped)
        self.dtype = dtype
        self.min_bytes = min_bytes

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, min_bytes={self.min_bytes}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.wrapped(*args, **kwargs)
        # storage -> {(offset, shape, stride, version): cast}; weak, so a freed storage whose
        # address is reused is never mistaken for the old one.
        casts = WeakIdKeyDictionary()
        exact = WeakIdKeyDictionary()  # storages of normalization inputs: never cast

        def mark(module, inputs):
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    exact[t.untyped_storage()] = True

        def pack(tensor: torch.Tensor) -> Any:
            if (tensor.dtype not in _CASTABLE or (tensor.is_leaf and tensor.requires_grad)
                    or tensor.numel() * tensor.element_size() < self.min_bytes or type(tensor) is not torch.Tensor
                    or tensor.untyped_storage() in exact):
                return tensor
            views = casts.setdefault(tensor.untyped_storage(), {})
            key = (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor._version)
            cast = views.get(key)
            if cast is None:
                with torch.no_grad():
                    cast = _Cast(tensor.to(self.dtype), tensor.dtype)
                views[key] = cast
            return cast

        def unpack(saved: Any) -> torch.Tensor:
            if isinstance(saved, _Cast):
                with torch.no_grad():
                    return saved.low.to(saved.dtype)
            return saved

        handles = [m.register_forward_pre_hook(mark) for m in self.wrapped.modules() if isinstance(m, _NORMS)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return self.wrapped(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

