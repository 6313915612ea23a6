"""Tiled(cuda_graphs=True): the bookkeeping of graphed windows, on the CPU (NOTE [Graphed windows]).

A stand-in capture re-runs the window into the same output tensors on every replay, as a CUDA graph
overwrites its static outputs: a result consumed after the next replay of its graph, a parameter
gradient kept without a copy, or a stale static input would change the numbers. The real CUDA
capture is exercised by tests/gpu/test_graphed_windows.py on the GPU machine.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import convmem
from _compare import assert_same_step, seeded_randn, twin
from convmem.nn._window_graphs import WindowGraphs
from convmem.nn.tiled import Tiled


def replaying_capture(fn, static_inputs, pool):
    outputs = fn(*static_inputs)

    def replay():
        for out, new in zip(outputs, fn(*static_inputs)):
            if out is not None:
                out.copy_(new)

    return replay, outputs


def graphed(module: nn.Module, tile_length: int, **options) -> Tiled:
    tiled = Tiled(module, tile_length, **options)
    tiled.graphs = WindowGraphs("test", capture=replaying_capture, device_type="cpu")
    return tiled


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        weight_norm(nn.Conv1d(3, 8, 5, padding=4, dilation=2)), nn.GELU(),
        nn.Conv1d(8, 8, 3, stride=2, padding=1), nn.Tanh(),
        nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1),
    ).double()


@pytest.mark.parametrize("length, tile, chunk", [(997, 96, None), (1024, 128, 1), (333, 64, 2)])
def test_graphed_windows_equal_untiled_over_steps(length, tile, chunk):
    model = stack()
    tiled = graphed(twin(model), tile, batch_chunk=chunk, forward_tile_length=tile)
    x = seeded_randn(3, 3, length)
    assert_same_step(model, tiled, [x], steps=3)
    assert tiled.graphs.captures > 0 and tiled.graphs.replays > 0
    kinds = [key[0] for key in tiled.graphs._graphs]  # in capture order: forward windows first
    assert kinds[0] == "forward" and set(kinds) == {"forward", "backward"}


def test_zoo_tcn_graphed():
    entry = convmem.zoo.get("tcn", dtype=torch.float64)
    model = entry.model
    tiled = graphed(twin(model), 128, batch_chunk=1)
    assert_same_step(model, tiled, entry.inputs, entry.loss_fn, steps=2)
    assert tiled.graphs.replays > 0


def test_replaced_parameters_drop_the_graphs():
    model = stack()
    tiled = graphed(twin(model), 100)
    x = seeded_randn(2, 3, 600)
    tiled(x).sum().backward()
    tiled(x).sum().backward()
    assert tiled.graphs.captures > 0
    with torch.no_grad():  # new tensors, new addresses: every capture is stale
        for m in (model, tiled.wrapped):
            m[2].weight = nn.Parameter(m[2].weight * 0.5)
    before = tiled.graphs.captures
    assert_same_step(model, tiled, [x], steps=2)
    assert tiled.graphs.captures > before


def test_capture_failure_turns_graphs_off_with_one_warning():
    def failing_capture(fn, static_inputs, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = stack()
    tiled = Tiled(twin(model), 100)
    tiled.graphs = WindowGraphs("stack", capture=failing_capture, device_type="cpu")
    x = seeded_randn(2, 3, 700)
    with pytest.warns(UserWarning, match="stack: a window could not be captured.*not permitted") as record:
        assert_same_step(model, tiled, [x], steps=3)
    assert tiled.graphs.captures == 0 and "not permitted" in tiled.graphs.refused
    assert len(record) == 1  # no capture is tried again


def test_tensor_arguments_turn_graphs_off():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1).double()

        def forward(self, x, scale):
            return self.conv(x) * scale

    module = Scaled()
    tiled = graphed(twin(module), 64)
    x, scale = seeded_randn(2, 2, 300), seeded_randn(2, 1)
    expected = module(x, scale)
    for _ in range(3):
        assert torch.allclose(tiled(x, scale), expected, rtol=0, atol=1e-12)
    assert tiled.graphs.captures == 0 and tiled.graphs.replays == 0


def test_release_and_copies():
    model = stack()
    tiled = graphed(twin(model), 100)
    x = seeded_randn(2, 3, 500)
    for _ in range(2):
        tiled(x).sum().backward()
    assert tiled.graphs._graphs
    copied = copy.deepcopy(tiled)
    assert copied.graphs is not tiled.graphs and not copied.graphs._graphs
    restored = pickle.loads(pickle.dumps(tiled.graphs))  # graphs are not pickled with a module
    assert not restored._graphs and restored.device_type == "cpu"
    tiled.release_graphs()
    assert not tiled.graphs._graphs
    assert torch.allclose(copied(x), model(x), rtol=0, atol=1e-12)


def test_cuda_graphs_argument():
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        Tiled(nn.Conv1d(1, 1, 3), 16, cuda_graphs="yes")
    tiled = Tiled(nn.Conv1d(1, 1, 3), 16, cuda_graphs=True)
    assert "cuda_graphs=True" in repr(tiled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(1, 1, 100)
        assert tiled(x).shape == (1, 1, 98)  # on the CPU the windows simply run eagerly
    assert tiled.graphs.captures == 0


# ------------------------------------------------------------------------- real CUDA graphs (GPU only)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("chunk", [None, 1])
def test_cuda_graphs_equal_untiled_float64(chunk):
    entry = convmem.zoo.get("tcn", dtype=torch.float64, device="cuda")
    model = entry.model
    tiled = Tiled(twin(model), 1024, batch_chunk=chunk, cuda_graphs=True)
    x = seeded_randn(2, 1, 3001).cuda()  # three windows: first, middle and last differ in shape
    assert_same_step(model, tiled, [x], entry.loss_fn, steps=3)
    assert tiled.last_windows == 3
    assert tiled.graphs.captures > 0 and tiled.graphs.replays > 0
    assert tiled.graphs.pool_bytes() > 0
    tiled.release_graphs()
    assert tiled.graphs.pool_bytes() == 0


@cuda
@pytest.mark.filterwarnings("error::UserWarning")
def test_cuda_graphs_under_bf16_autocast_match_eager_windows():
    entry = convmem.zoo.get("tcn", device="cuda")
    plain = Tiled(twin(entry.model), 128, batch_chunk=1)
    graphed_ = Tiled(twin(entry.model), 128, batch_chunk=1, cuda_graphs=True)
    results = []
    for tiled in (plain, graphed_):
        for _ in range(3):
            tiled.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = tiled(entry.inputs[0])
            entry.loss_fn(out).backward()
        results.append([out.float()] + [p.grad for p in tiled.parameters()])
    assert graphed_.graphs.replays > 0
    for a, e in zip(*results):
        assert torch.allclose(a, e, rtol=1e-3, atol=1e-3)


@cuda
def test_cuda_capture_failure_falls_back():
    class Synchronizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x):
            torch.cuda.synchronize()  # not allowed while a stream is capturing
            return self.conv(x)

    module = Synchronizing().double().cuda()
    tiled = Tiled(twin(module), 64, cuda_graphs=True, verify=False)
    x = seeded_randn(2, 2, 400).cuda()
    with pytest.warns(UserWarning, match="could not be captured"):
        assert_same_step(module, tiled, [x], steps=3)
    assert tiled.graphs.captures == 0


@cuda
@pytest.mark.filterwarnings("error::UserWarning")
def test_cuda_graphs_of_compiled_checkpointed_windows_equal_untiled_float64():
    # The configuration of docs/BENCHMARKS.md's tcn result, small: half the blocks checkpointed in
    # full and half selectively, compiled in place, tiled with batch chunks, windows replayed.
    entry = convmem.zoo.get("tcn", dtype=torch.float64, device="cuda")
    model = twin(entry.model)
    half = set(entry.blocks[::2])
    convmem.checkpoint_(model, policy="full", filter_fn=lambda m, fqn: fqn in half)
    convmem.checkpoint_(model, policy="selective", filter_fn=lambda m, fqn: fqn in set(entry.blocks) - half)
    model.compile(dynamic=False)
    tiled = Tiled(model, 1024, batch_chunk=1, forward_tile_length=1024, cuda_graphs=True)
    x = seeded_randn(2, 1, 3001).cuda()
    assert_same_step(entry.model, tiled, [x], entry.loss_fn, steps=3)
    assert tiled.graphs.captures > 0 and tiled.graphs.replays > 0
