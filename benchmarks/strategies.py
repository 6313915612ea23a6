"""What a benchmark row runs: the anchors a user would otherwise reach for, and convmem's strategies.

Each entry maps a name to ``prepare(entry) -> Prepared | None`` (None: not applicable to this
model, e.g. ``checkpoint_sequential`` on a model whose blocks are not one Sequential chain).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from convmem.nn._wrapper import ModuleWrapper, replace_submodule


def compile_warmup(mode: Optional[str]) -> int:
    """Steps before the measured one under torch.compile in `mode`: optimize_'s rule (CUDA graph
    trees warm up in the first call, record in the second, replay from the third)."""
    from convmem.strategies.optimize import _GRAPH_WARMUP, _GRAPHED_MODES

    return _GRAPH_WARMUP if mode in _GRAPHED_MODES else 1


class Prepared:
    """One training step of a (transformed) zoo model: zero_grad, forward, loss, backward."""

    def __init__(self, model: nn.Module, inputs, loss_fn, autocast_dtype=None, forward=None, note="",
                 warmup_steps=1):
        self.model = model
        self.warmup_steps = warmup_steps  # steps before the measured one (graphs capture in the second)
        self.inputs = inputs
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.forward = model if forward is None else forward
        self.note = note

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.forward(*self.inputs))
        loss.backward()


class _TorchCheckpointed(ModuleWrapper):
    """``torch.utils.checkpoint`` (non-reentrant) around one block: the anchor users write by hand."""

    def forward(self, *args, **kwargs):
        return checkpoint(self.wrapped, *args, use_reentrant=False, **kwargs)


class _TorchCheckpointSequential(ModuleWrapper):
    def __init__(self, chain: nn.Sequential):
        super().__init__(chain)
        self.segments = max(1, round(math.sqrt(len(chain))))

    def forward(self, x):
        return checkpoint_sequential(self.wrapped, self.segments, x, use_reentrant=False)


def eager(entry) -> Prepared:
    return Prepared(entry.model, entry.inputs, entry.loss_fn)


def bf16_autocast(entry) -> Prepared:
    return Prepared(entry.model, entry.inputs, entry.loss_fn, autocast_dtype=torch.bfloat16)


def torch_checkpoint_blocks(entry) -> Prepared:
    for name in entry.blocks:
        replace_submodule(entry.model, name, _TorchCheckpointed(entry.model.get_submodule(name)))
    return Prepared(entry.model, entry.inputs, entry.loss_fn, note=f"{len(entry.blocks)} blocks")


def torch_checkpoint_sequential(entry) -> Optional[Prepared]:
    if entry.chain is None:
        return None
    chain = entry.model.get_submodule(entry.chain)
    wrapper = _TorchCheckpointSequential(chain)
    replace_submodule(entry.model, entry.chain, wrapper)
    return Prepared(entry.model, entry.inputs, entry.loss_fn, note=f"{wrapper.segments} segments of {len(chain)}")


def compiled(budget: Optional[float] = None, mode: Optional[str] = None) -> Callable:
    """torch.compile of the model, with Inductor's activation memory budget or a compile mode
    ("reduce-overhead": CUDA graphs, whose pool the harness adds to the peak)."""

    def prepare(entry) -> Prepared:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = 1.0 if budget is None else budget
        forward = torch.compile(entry.model, mode=mode)
        note = "; ".join(([] if budget is None else [f"activation_memory_budget={budget}"]) + ([f"mode={mode}"] if mode else []))
        return Prepared(entry.model, entry.inputs, entry.loss_fn, forward=forward, note=note,
                        warmup_steps=compile_warmup(mode))

    return prepare


ANCHORS: Dict[str, Callable] = {
    "eager_fp32": eager,
    "bf16_autocast": bf16_autocast,
    "torch_checkpoint_blocks": torch_checkpoint_blocks,
    "checkpoint_sequential_sqrt": torch_checkpoint_sequential,
}

COMPILE_ANCHORS: Dict[str, Callable] = {
    "compile_default": compiled(None),
    "compile_budget_0.5": compiled(0.5),
    "compile_budget_0.1": compiled(0.1),
}


# ------------------------------------------------------------------------------ convmem

def convmem_checkpoint(policy: str, compile_model: bool = False, by_module: bool = True,
                       compile_mode: Optional[str] = None, save_outputs_compiled: bool = True,
                       inductor_budget: Optional[float] = None) -> Callable:
    """`checkpoint_` on every block, optionally compiled (`inductor_budget`: with Inductor's
    activation memory budget set too, the two composed)."""

    def prepare(entry) -> Prepared:
        import convmem
        from convmem.nn.checkpointed import Checkpointed

        convmem.checkpoint_(entry.model, policy=policy, example_inputs=entry.inputs)
        for m in entry.model.modules():
            if isinstance(m, Checkpointed):
                m._by_module = by_module  # False: PyTorch's dispatch-mode selective checkpointing
                # False: the partitioner may recompute block outputs (NOTE [Block outputs under torch.compile])
                m._save_outputs_compiled = save_outputs_compiled
        if inductor_budget is not None:
            import torch._functorch.config as functorch_config

            functorch_config.activation_memory_budget = inductor_budget  # harness.free_between_rows resets it
        forward = torch.compile(entry.model, mode=compile_mode) if compile_model else None
        note = ("torch.compile" + (f"(mode={compile_mode})" if compile_mode else "")) if compile_model else ""
        note += f"; activation_memory_budget={inductor_budget}" if inductor_budget is not None else ""
        return Prepared(entry.model, entry.inputs, entry.loss_fn, forward=forward, note=note,
                        warmup_steps=compile_warmup(compile_mode))

    return prepare


def convmem_tile(tile_length: int) -> Callable:
    def prepare(entry) -> Optional[Prepared]:
        import warnings

        import convmem
        from convmem.nn.tiled import Tiled

        with warnings.catch_warnings(record=True):  # refusals are expected here; the row says what was tiled
            warnings.simplefilter("always")
            convmem.tile_(entry.model, tile_length, example_inputs=entry.inputs)
        tiled = [n for n, m in entry.model.named_modules() if isinstance(m, Tiled)]
        if not tiled:
            return None  # not length-local in training (BatchNorm, GroupNorm over time)
        return Prepared(entry.model, entry.inputs, entry.loss_fn, note=f"tiled: {', '.join(tiled)}")

    return prepare


def convmem_tiled_model(tile_length: int, selective: bool = False, compiled: bool = False, full_blocks: int = 0,
                        **options) -> Callable:
    """The whole model as one tiled module (``convmem.nn.Tiled(model, n, **options)``): only the
    model's input and output exist at full length. Local models only (tcn, wavenet, hifigan).
    `full_blocks`: that many of the model's blocks, evenly spread, checkpointed in full (they keep
    only their input in a window); `selective`: its (other) blocks selectively checkpointed, so that
    a window keeps less; `compiled`: the model compiled in place (``model.compile(dynamic=False)``:
    one graph per window shape) before it is tiled, so that every window runs compiled."""

    def prepare(entry) -> Optional[Prepared]:
        import convmem
        from convmem.nn.tiled import Tiled

        model = entry.model
        full = {entry.blocks[round(i * len(entry.blocks) / full_blocks)] for i in range(full_blocks)}
        if full:
            convmem.checkpoint_(model, policy="full", filter_fn=lambda m, fqn: fqn in full)
        if selective:
            rest = set(entry.blocks) - full
            convmem.checkpoint_(model, policy="selective", filter_fn=lambda m, fqn: fqn in rest)
        if compiled:
            model.compile(dynamic=False)
        model = Tiled(model, tile_length, **options)
        extra = "".join(f", {k}={v}" for k, v in options.items())
        inner = "checkpoint_(model, 'selective')" if selective else "model"
        if full:
            inner = f"checkpoint_({len(full)} of {len(entry.blocks)} blocks 'full'" + (", the rest 'selective')" if selective else ")")
        inner = f"compile({inner})" if compiled else inner
        return Prepared(model, entry.inputs, entry.loss_fn, note=f"Tiled({inner}{extra})",
                        warmup_steps=2 if options.get("cuda_graphs") else 1)

    return prepare


def convmem_fused_chains(entry) -> Optional[Prepared]:
    """fuse_'s [BatchNorm ->] activation -> Conv1d chains alone (dense convs only: no depthwise kernel)."""
    import convmem
    from convmem.nn import FusedNormActConv

    convmem.fuse_(entry.model, filter_fn=lambda conv, fqn: conv.groups == 1, pools=False)
    chains = sum(m.chains for m in entry.model.modules() if isinstance(m, FusedNormActConv))
    if not chains:
        return None
    return Prepared(entry.model, entry.inputs, entry.loss_fn, note=f"{chains} chains fused")


def _with_swaps(prepare: Callable, find: Callable, what: str) -> Callable:
    """`prepare` on the model with the modules `find(model)` names swapped in (None when it names
    none); the note counts them: "7 max-pools compact"."""

    def prepare_swapped(entry) -> Optional[Prepared]:
        from convmem.strategies._common import swap_modules

        swaps = find(entry.model)
        if not swaps:
            return None
        swap_modules(entry.model, swaps)
        prepared = prepare(entry)
        if prepared is not None:
            prepared.note = "; ".join(n for n in (prepared.note, f"{len(swaps)} {what}") if n)
        return prepared

    return prepare_swapped


def with_compact_pools(prepare: Callable) -> Callable:
    """`prepare` on the model with every max-pool compact (NOTE [Compact max-pool] in nn/compact_pool.py)."""
    from convmem.nn.compact_pool import compact_pools

    return _with_swaps(prepare, compact_pools, "max-pools compact")


def with_convs_as_2d(prepare: Callable) -> Callable:
    """`prepare` on the model with every Conv1d computed as a conv2d (NOTE [Conv1d as conv2d under
    torch.compile] in nn/conv_as_2d.py)."""
    from convmem.nn.conv_as_2d import convs_as_2d

    return _with_swaps(prepare, convs_as_2d, "Conv1d as conv2d")


CONVMEM: Dict[str, Callable] = {
    "convmem_checkpoint_full": convmem_checkpoint("full"),
    "convmem_checkpoint_selective": convmem_checkpoint("selective"),
    "convmem_checkpoint_selective_sac": convmem_checkpoint("selective", by_module=False),
    "convmem_selective_compiled": convmem_checkpoint("selective", compile_model=True),
    "convmem_tile_8192": convmem_tile(8192),
}


def convmem_depthwise(rank: Optional[int]) -> Callable:
    """Dense convs -> depthwise-separable (lossy unless full rank): memory and speed of the result."""

    def prepare(entry) -> Optional[Prepared]:
        import warnings

        import convmem

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = convmem.to_depthwise_separable_(entry.model, rank=rank)
        if not report.rows:
            return None
        return Prepared(entry.model, entry.inputs, entry.loss_fn, note=f"{len(report.rows)} convs converted")

    return prepare


LOSSY: Dict[str, Callable] = {
    "eager_fp32": eager,
    "convmem_depthwise_rank1": convmem_depthwise(1),
    "convmem_depthwise_full_rank": convmem_depthwise(None),
}
