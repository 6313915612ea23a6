"""CUDA graphs of a tiled module's windows: one capture per window shape, replayed for every window.

# NOTE [Graphed windows]
# A tiled step runs the same module on many windows of the same shape, and every window pays the
# CPU's time to issue its few hundred kernels from Python: where that is longer than the GPU's time
# for the window (batch chunks, checkpointed blocks inside the tiles, small modules), the step is
# the CPU's. On an H200 a tcn step in 8192-sample windows took 101.0 ms of CPU for a 128.2 ms step;
# graphed, 6.0 ms of CPU (the step, GPU-bound, 125.1 ms); selective blocks in 21846-sample windows
# of one sample went from 219 to 138 ms (docs/BENCHMARKS.md, "Exact length tiling"). With
# ``Tiled(..., cuda_graphs=True)`` each window shape is captured once into a CUDA graph and replayed:
# forward windows (the no-grad call) and backward windows (the recompute with autograd and
# ``torch.autograd.grad`` of that window's slice of the output gradient, to the window's input and
# the parameters). A window's input and output-gradient slice are copied into the graph's static
# input tensors before a replay; its results (the window's outputs, or its input and parameter
# gradients) are the graph's static outputs, consumed before the same graph is replayed again.
#
# - Warm-up: a key (window shape and dtype, crops, which gradients, autocast, the module's input
#   signature and modes) runs eagerly through the first call of the module (a training step's forward and
#   backward) and is captured when a later call meets it, so lazy initialisation (cuDNN plans,
#   workspaces, torch.compile) happens outside any capture. Capturing in the second call also
#   captures in execution order, forward windows first: their large no-grad blocks come into the
#   pool first and the backward windows' smaller blocks are carved out of them, where the other
#   order leaves segments too small to serve the forward (tcn, 8192-sample windows, H200: a 3.58
#   GiB pool when backward's windows were captured first, a 2.24 GiB peak in all since).
# - Parameters are read by address: in-place updates (every torch.optim optimizer) are seen by the
#   replays; a parameter or buffer replaced by a new tensor (``module.to(...)``, ``p.data = ...``)
#   changes the key's addresses and every captured graph is dropped and captured anew.
# - Memory: all graphs of one `Tiled` share one private memory pool, sized by the largest window's
#   activations; it stays reserved between steps (the price of replaying without allocating) until
#   ``Tiled.release_graphs()``. PyTorch's allocation counters do not see a replay's use of that
#   pool, so a measured peak must add the pool's reserved bytes (`WindowGraphs.pool_bytes`,
#   `graph_pool_bytes` in convmem/profile/measure.py; the benchmark harness does).
# - The parameters enter a backward capture as detached aliases (same memory, fresh autograd leaves,
#   through torch.func.functional_call): the parameters' own gradient-accumulator nodes, held by
#   the step's autograd graph, were made on the default stream in forward, and the engine would
#   synchronise the capture stream with it, which a capture forbids.
# - Autocast runs without its weight-cast cache inside a capture: a cached cast made outside the
#   graph would be replayed as stale memory after the weights change.
# - A window that cannot be captured (a CPU synchronisation, ``.item()``, a data-dependent shape)
#   turns graphs off for the module, with one warning naming the reason: windows run eagerly, with
#   the same results. Not only that window's key: a failed capture can leave the caching allocator
#   routing the capture stream's allocations to the pool, so no capture is tried again.
# - Only where the window's call depends on nothing but its input and the module: no tensor
#   arguments besides the sequence (they would be read by address), not under torch.compile (which
#   has its own CUDA graphs: mode="reduce-overhead").
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..profile.measure import graph_pool_bytes

__all__ = ["WindowGraphs"]

# capture(fn, static_inputs, pool) -> (replay, static_outputs). The real one captures a CUDA graph;
# tests on the CPU pass one that re-runs `fn` into the same output tensors.
Capture = Callable[[Callable[..., List[Optional[torch.Tensor]]], List[torch.Tensor], Any],
                   Tuple[Callable[[], None], List[Optional[torch.Tensor]]]]


def cuda_capture(fn, static_inputs: List[torch.Tensor], pool) -> Tuple[Callable[[], None], List[Optional[torch.Tensor]]]:
    """Capture ``fn(*static_inputs)`` into a CUDA graph drawing on memory pool `pool`."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), _autocast_without_cache():
        outputs = fn(*static_inputs)
    return graph.replay, outputs


def _autocast_without_cache() -> contextlib.AbstractContextManager:
    """The enclosing CUDA autocast again, without its cast cache (NOTE [Graphed windows])."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def module_addresses(module: nn.Module) -> Tuple[int, ...]:
    """Where the module's parameters and buffers live: what a captured graph reads."""
    return tuple(t.data_ptr() for t in module.parameters()) + tuple(b.data_ptr() for b in module.buffers())


class WindowGraphs:
    """The captured windows of one tiled module (NOTE [Graphed windows])."""

    def __init__(self, name: str, capture: Capture = cuda_capture, device_type: str = "cuda"):
        self.name = name
        self.device_type = device_type  # inputs on other devices run eagerly
        self._capture = capture
        self._graphs: Dict[Any, Tuple[Callable[[], None], List[torch.Tensor], List[Optional[torch.Tensor]]]] = {}
        self._first_call: Dict[Any, int] = {}  # the call in which each key was first met
        self._call = 0
        self.refused: Optional[str] = None  # why capturing was given up, if it was
        self._addresses: Optional[Tuple[int, ...]] = None
        self._pool = None
        self.output_structure: Dict[Any, Any] = {}  # per key, what the caller needs of a call a replay skips
        self.captures = 0  # graphs captured so far (a test and the benchmark read it)
        self.replays = 0

    def begin_call(self) -> None:
        """A new call of the module begins (NOTE [Graphed windows], warm-up)."""
        self._call += 1

    def run(self, key: Any, addresses: Tuple[int, ...], fn: Callable[..., List[Optional[torch.Tensor]]],
            inputs: Sequence[torch.Tensor]) -> Tuple[List[Optional[torch.Tensor]], bool]:
        """``fn(*inputs)``, eagerly or by replaying its graph for `key`.

        Returns the outputs and whether they are a graph's static outputs, which the next replay of
        the same key overwrites: the caller must copy or consume them before that.
        """
        if addresses != self._addresses:  # parameters moved: every graph reads stale addresses
            self.release()
            self._addresses = addresses
        graph = self._graphs.get(key)
        if graph is None:
            first = self._first_call.setdefault(key, self._call)
            if first == self._call or self.refused is not None:
                return fn(*inputs), False
            graph = self._try_capture(key, fn, inputs)
            if graph is None:
                return fn(*inputs), False
        replay, static_inputs, outputs = graph
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        replay()
        self.replays += 1
        return outputs, True

    def _try_capture(self, key, fn, inputs):
        static_inputs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs]
        if self._pool is None and self._capture is cuda_capture:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            replay, outputs = self._capture(fn, static_inputs, self._pool)
        except Exception as error:  # windows run eagerly from now on; the results are the same
            self.refused = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(
                f"{self.name}: a window could not be captured in a CUDA graph; its windows run without "
                f"graphs from now on ({self.refused})",
                stacklevel=4,
            )
            return None
        self.captures += 1
        graph = (replay, static_inputs, outputs)
        self._graphs[key] = graph
        return graph

    def __deepcopy__(self, memo) -> "WindowGraphs":  # a copied module captures its own graphs
        return WindowGraphs(self.name, self._capture, self.device_type)

    def __getstate__(self) -> Dict[str, Any]:  # graphs are not saved with a pickled module
        return {"name": self.name, "capture": self._capture, "device_type": self.device_type}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["name"], state["capture"], state["device_type"])

    def release(self) -> None:
        """Drop every graph and its memory pool (captured again when next needed)."""
        self._graphs.clear()
        self._first_call.clear()
        self._pool = None

    def pool_bytes(self) -> int:
        """Bytes the graphs' private memory pool holds on the GPU (0 before any capture)."""
        if self._pool is None or not torch.cuda.is_available():
            return 0
        return graph_pool_bytes(pools=[self._pool])
