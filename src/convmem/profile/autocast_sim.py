"""CUDA autocast, simulated for meta tensors.

# NOTE [Simulated autocast]
# ``torch.autocast("cuda")`` only acts on CUDA tensors, so a meta run under it computes in fp32
# and over-counts every saved activation by 2x. This mode applies CUDA autocast's casting rules
# (aten/src/ATen/autocast_mode.cpp) at the torch-function level, *above* autograd, exactly where
# autocast casts: conv and matmul inputs go to the low-precision dtype (weights through a cache,
# as autocast caches casts of leaf parameters for the whole region), norms, losses and
# reductions that autocast runs in fp32 get fp32 inputs, and the "promote" ops cast to the widest
# input. Autograd then saves the cast copies, as it does under real autocast. A recompute in
# backward (checkpointing, tiling) runs after the forward's region has ended: like
# torch.utils.checkpoint with real autocast, it captures the state in forward (`autocast_state`)
# and enters it again around the recompute (`autocast_region`), simulated on meta as on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
from torch.overrides import TorchFunctionMode

_LOWER_PRECISION = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "_convolution", "conv_tbc", "prelu", "addmm", "addmv", "addr", "matmul",
    "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linear", "addbmm", "baddbmm", "bmm",
    "chain_matmul", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "scaled_dot_product_attention",
})
_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm",
    "group_norm", "norm", "frobenius_norm", "nuclear_norm", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "cross_entropy_loss", "upsample_linear1d", "upsample_nearest1d",
    # autocast passes dtype=float32 to these ("fp32_set_opt_dtype"): the result is fp32.
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum",
})
_PROMOTE = frozenset({
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
    "scatter_add", "tensordot", "cat", "stack",
})
_LOW = (torch.float16, torch.bfloat16)


class SimulatedAutocast(TorchFunctionMode):
    """``with SimulatedAutocast(torch.bfloat16):`` casts as CUDA autocast would, on any device."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if dtype not in _LOW:
            raise ValueError(f"autocast dtype must be float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self._weight_cache: Dict[int, torch.Tensor] = {}

    def _to(self, value, dtype, eligible):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dtype in eligible and value.dtype != dtype:
                if value.is_leaf and value.requires_grad:
                    key = id(value)
                    if key not in self._weight_cache:
                        self._weight_cache[key] = value.to(dtype)
                    return self._weight_cache[key]
                return value.to(dtype)
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self._to(v, dtype, eligible) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _LOWER_PRECISION:
            # autocast leaves float64 alone and casts fp32 (and the other low dtype).
            eligible = (torch.float32,) + _LOW
            args, kwargs = self._to(args, self.dtype, eligible), self._to(kwargs, self.dtype, eligible)
        elif name in _FP32:
            args, kwargs = self._to(args, torch.float32, _LOW), self._to(kwargs, torch.float32, _LOW)
        elif name in _PROMOTE:
            floats = [t.dtype for t in _flat_tensors(args) if t.is_floating_point()]
            if floats and len(set(floats)) > 1:
                widest = max(floats, key=lambda d: (torch.finfo(d).bits, d == torch.float32))
                eligible = tuple(d for d in set(floats) if d != widest)
                args = self._to(args, widest, eligible)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self._weight_cache.clear()
        return super().__exit__(*exc)


def _flat_tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _flat_tensors(a)


def autocast_state(device_type: str) -> Optional[Dict[str, Any]]:
    """Autocast as it is now for `device_type`, for code that recomputes in backward (where the
    forward's autocast region is over) to enter the same again with `autocast_region`."""
    if not torch.amp.is_autocast_available(device_type):
        # The meta device of convmem.profile's estimate, where CUDA autocast is simulated by a
        # function mode that a recompute re-enters as it would CUDA's (NOTE [Simulated autocast]).
        modes = torch.overrides._get_current_function_mode_stack()
        simulated = [m for m in modes if isinstance(m, SimulatedAutocast)]
        return {"simulated": simulated[-1].dtype} if simulated else None
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def autocast_region(state: Optional[Dict[str, Any]]) -> contextlib.AbstractContextManager:
    """Autocast as `autocast_state` found it in forward (a fresh region: casts are cached anew)."""
    if state is None:
        return contextlib.nullcontext()
    if "simulated" in state:
        return SimulatedAutocast(state["simulated"])
    return torch.autocast(**state)
