"""`BatchChunked`: recompute a module's backward a few samples at a time; exact results.

# NOTE [Batch-chunked recompute]
# Checkpointing a module keeps only its input, but its backward recomputes the module for the whole
# batch and holds all of that at once. When the module treats the samples of a batch independently
# (convolutions, GroupNorm and LayerNorm normalise each sample on its own, pointwise ops), backward
# can recompute and back-propagate `batch_chunk` samples at a time instead: the gradient of the
# input is the concatenation of the chunks' input gradients, and parameter gradients are the sums
# of the chunks'. Backward memory falls by the number of chunks. Forward runs once for the whole
# batch under no_grad (it keeps nothing but the input), as in NOTE [Tiled autograd] in tiled.py,
# whose length tiling this is along the batch axis instead: it needs no locality in time, so it
# serves blocks that tiling refuses -- wav2vec 2.0's first layer, a GroupNorm over 320,000 samples.
#
# Exact only for modules that do not couple samples. Refused at construction: BatchNorm in train
# mode (batch statistics), active Dropout (masks would be drawn per chunk). Checked at the first call
# of every input signature (`verify=True`): the first two samples run together and one at a time,
# under no_grad, and must agree to within floating-point reassociation; a module that couples them
# anyway (a custom ``x - x.mean(0)``) is refused with the difference found. The input must carry
# the batch on axis 0, as must every output, and no other tensor argument may be passed.
#
# NOTE [Compiled chunks]
# Under torch.compile a BatchChunked runs in an eager island (NOTE [Eager islands in compiled plans]
# in eager_island.py), and the module it wraps then runs at eager speed, forward and the chunks'
# recompute and backward alike: on an H200 wav2vec 2.0's first layer (a Conv1d, a GroupNorm over
# 64,000 steps and a GELU) in chunks of four samples took 2.6 ms more than the same layer
# checkpointed compiled (benchmarks/results/plan_probe.csv). With ``compile_block=True`` the
# wrapped module is called through its own ``torch.compile`` (default mode, static shapes, made at
# the first call, not a submodule: the state_dict keeps its keys): the full-batch forward under no_grad and
# each chunk's recompute and backward (AOTAutograd's compiled backward, run by the chunk's
# `torch.autograd.grad`) are compiled graphs of their own, while the chunking itself -- which Dynamo
# would trace away -- stays in the island's eager code. Dynamo compiles nested calls inside a
# `torch.compiler.disable`d frame (tests/nn/test_batch_chunked.py counts the frames). Shapes are
# static: the full batch, the chunk and a shorter last chunk compile once each (with the batch
# dynamic, Inductor in torch 2.13 failed on wav2vec 2.0's first layer: "cannot determine truth value
# of Relational"). Results are the compiled module's: equal to the eager module's up to
# floating-point reassociation, as compiled code is. On the meta device (convmem's estimate) the
# module runs as it is. `optimize_` sets it on the chunked blocks of plans made for compiled
# training (`Plan.compiled`). On the H200 it won back 0.3-0.6 ms of the 2.6 (same file: the step
# with wav2vec 2.0's first two layers chunked, 28.9 against 29.6 ms eagerly chunked).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..profile.autocast_sim import autocast_region, autocast_state
from ._wrapper import ModuleWrapper
from .tiled import samples_coupled

__all__ = ["BatchChunked"]

# NOTE [Compiled chunks]: each wrapper's compiled module, kept off the wrapper so that neither its
# state_dict nor a deepcopy of the model sees it (a copy compiles its own at its first call)
_COMPILED: "weakref.WeakKeyDictionary[BatchChunked, nn.Module]" = weakref.WeakKeyDictionary()


def coupling_module(module: nn.Module) -> Optional[Tuple[str, str]]:
    """``(qualified name, reason)`` of a submodule that couples the samples of a batch, or None."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and (sub.training or not sub.track_running_stats):
            return name, "BatchNorm in train mode normalises with statistics over the whole batch"
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            return name, "active Dropout would draw other masks per chunk"
    return None


class _Chunked(torch.autograd.Function):
    """NOTE [Batch-chunked recompute]. Inputs: the wrapper, x, the parameters that need grad."""

    @staticmethod
    def forward(ctx, wrapper: "BatchChunked", x: torch.Tensor, *params: torch.Tensor):
        ctx.wrapper = wrapper
        ctx.save_for_backward(x)
        ctx.autocast = autocast_state(x.device.type)
        with torch.no_grad():
            out = wrapper._block(x)(x)
        flat, spec = tree_flatten(out)
        if not all(isinstance(t, torch.Tensor) for t in flat):
            raise ValueError("BatchChunked: every output of the module must be a tensor (batch on axis 0)")
        wrapper._spec = spec  # read back by BatchChunked.forward right after apply
        return tuple(flat)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        (x,) = ctx.saved_tensors
        wrapper = ctx.wrapper
        params = wrapper._params()
        chunk = wrapper.batch_chunk
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        grad_params: List[Optional[torch.Tensor]] = [None] * len(params)
        autocast = autocast_region(ctx.autocast)  # as in forward, simulated on meta: NOTE [Tiled autograd]
        for start in range(0, x.shape[0], chunk):
            stop = min(start + chunk, x.shape[0])
            with torch.enable_grad(), autocast:
                xc = x[start:stop].detach().requires_grad_(grad_x is not None)
                outs = [t for t in tree_flatten(wrapper._block(xc)(xc))[0] if isinstance(t, torch.Tensor)]
            pairs = [(o, g[start:stop]) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if not pairs:
                continue
            leaves = ([xc] if grad_x is not None else []) + list(params)
            found = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
            if grad_x is not None:
                if found[0] is not None:
                    grad_x[start:stop] = found[0]
                found = found[1:]
            for i, g in enumerate(found):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (None, grad_x, *grad_params)


class BatchChunked(ModuleWrapper):
    """Run `wrapped` for the whole batch in forward, and recompute its backward `batch_chunk` samples
    at a time (NOTE [Batch-chunked recompute]): backward memory falls by the number of chunks;
    outputs and gradients equal the untouched module's up to floating-point reassociation.

    Args:
        wrapped: a module that treats samples independently, ``x: (batch, ...) -> (batch, ...)``.
        batch_chunk: samples per backward recomputation (>= 1).
        verify: compare two samples together and apart at the first call of each input signature.
        compile_block: call `wrapped` through its own ``torch.compile`` in forward and in the chunks'
            backward (NOTE [Compiled chunks]): for a BatchChunked in an eager island of a compiled model.

    `state_dict()` keys are those of `wrapped`; ``convmem.restore_`` takes the wrapper out.
    """

    def __init__(self, wrapped: nn.Module, batch_chunk: int = 1, *, verify: bool = True, compile_block: bool = False):
        if isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int) or batch_chunk < 1:
            raise ValueError(f"BatchChunked: batch_chunk must be a positive int, got {batch_chunk!r}")
        coupled = coupling_module(wrapped)
        if coupled is not None:
            name, reason = coupled
            raise ValueError(f"BatchChunked: cannot split the batch of {type(wrapped).__name__}: "
                             f"{name or 'the module itself'!r}: {reason}")
        super().__init__(wrapped)
        self.batch_chunk = batch_chunk
        self.verify = verify
        self.compile_block = compile_block
        self._verified: Dict[Any, bool] = {}
        self._spec = None

    def extra_repr(self) -> str:
        return f"batch_chunk={self.batch_chunk}" + (", compile_block=True" if self.compile_block else "")

    def _block(self, x: torch.Tensor) -> nn.Module:
        """The module forward and backward run on `x`: `wrapped`, or its compiled self (NOTE [Compiled
        chunks]); on the meta device, where convmem's estimate runs the step, `wrapped`."""
        if not self.compile_block or x.is_meta:
            return self.wrapped
        compiled = _COMPILED.get(self)
        if compiled is None:
            compiled = _COMPILED[self] = torch.compile(self.wrapped, dynamic=False)
        return compiled

    def _params(self) -> List[nn.Parameter]:
        return [p for p in self.wrapped.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if (args or kwargs or not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] <= self.batch_chunk
                or not torch.is_grad_enabled() or torch.compiler.is_compiling()):
            if args or kwargs:
                raise ValueError("BatchChunked: the module must take one tensor (batch on axis 0) and nothing else")
            return self.wrapped(x)
        coupled = coupling_module(self.wrapped)  # modes may have changed since construction
        if coupled is not None:
            raise ValueError(f"BatchChunked: cannot split the batch: {coupled[0]!r}: {coupled[1]}")
        if self.verify and not x.is_meta:
            self._check(x)
        flat = _Chunked.apply(self, x, *self._params())
        return tree_unflatten(list(flat), self._spec)

    def _check(self, x: torch.Tensor) -> None:
        key = ("verified", x.dtype, x.device.type, tuple(x.shape[1:]), self.training)
        if key in self._verified:
            return
        problem = samples_coupled(self.wrapped, x[:2])  # Tiled's check: NOTE [Batch chunks] in tiled.py
        if problem is not None:
            raise ValueError(f"BatchChunked: {type(self.wrapped).__name__}: {problem}; it cannot be chunked exactly")
        self._verified[key] = True
