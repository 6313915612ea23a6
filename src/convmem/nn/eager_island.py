"""`EagerIsland`: a module that runs eagerly inside a model trained under torch.compile.

# NOTE [Eager islands in compiled plans]
# Offload and batch chunks act through saved-tensor hooks and an autograd Function that step aside
# in compiled code (there is nothing for them to do in a graph Inductor partitions itself), so a
# compiled model cannot go below what its compiled step keeps: on an H200, wav2vec 2.0's feature
# encoder keeps at least 3.97 GiB compiled, its first layer's GroupNorm over 64,000 samples held
# whole in backward, where eagerly that layer in chunks of four samples takes the step to 2.98 GiB.
# `EagerIsland` runs its module eagerly wherever it is called: its forward is
# `torch.compiler.disable`d, so Dynamo breaks the graph around the call, compiles what comes before
# and after, and the module -- with the wrapper inside it doing its work -- runs eagerly, its
# backward through autograd between the compiled backward graphs. Outputs and gradients are the
# wrapped module's. An island costs what eager mode costs on it, the compiled speed of that module
# (a BatchChunked can win part of it back by compiling its module apart: NOTE [Compiled chunks] in
# batch_chunked.py) and a graph break (a few launches of host time); `optimize_` plans compiled
# models with islands only for budgets that no fully compiled plan meets (NOTE [Plans for compiled
# models] in strategies/optimize.py). Eagerly an island is the module itself (one function call more).
# ``torch.compile(fullgraph=True)`` refuses a graph break, and so refuses a model holding an island.
"""
from __future__ import annotations

from typing import Any

import torch

from ._wrapper import ModuleWrapper

__all__ = ["EagerIsland"]


class EagerIsland(ModuleWrapper):
    """Run `wrapped` eagerly, also when the model around it is compiled (NOTE [Eager islands in
    compiled plans]): a `BatchChunked` or `Offloaded` keeps doing its work under torch.compile.

    Example::

        >>> model.blocks[0] = EagerIsland(BatchChunked(model.blocks[0], 2))
        >>> compiled = torch.compile(model)  # blocks[0] runs eagerly, in chunks of two samples in backward

    `state_dict()` keys are those of `wrapped`; ``convmem.restore_`` takes the wrapper out.
    """

    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)
