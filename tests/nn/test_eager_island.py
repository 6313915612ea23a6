"""EagerIsland: a module that runs eagerly inside a compiled model (NOTE [Eager islands in compiled
plans]): the batch-chunked or offloaded module inside it does its work under torch.compile, with the
untouched model's outputs, gradients and buffers, in float64."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import convmem
from _compare import assert_same_step, seeded_randn, twin
from convmem.nn import BatchChunked, EagerIsland, Offloaded
from convmem.nn import batch_chunked
from convmem.nn._wrapper import wrapper_state

needs_inductor = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="inductor needs a C compiler")


def _model() -> nn.Module:
    """Conv, GroupNorm over a length the compiled code around the island sees whole, a BatchNorm
    outside the island (its statistics must advance once a step)."""
    torch.manual_seed(0)
    return nn.Sequential(
        # no bias before the BatchNorm: its gradient is zero up to rounding, which compiled
        # reductions round otherwise (1e-18 against 1e-18)
        nn.Conv1d(3, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.GELU(),
        nn.Sequential(nn.Conv1d(8, 8, 5, padding=2, dilation=1), nn.GroupNorm(2, 8), nn.GELU()),
        nn.Sequential(nn.Conv1d(8, 8, 3, padding=2, dilation=2), nn.SiLU()),
        nn.Conv1d(8, 2, 1),
    ).double()


def _count_chunked_backwards(monkeypatch) -> list:
    calls = []
    backward = batch_chunked._Chunked.backward

    def counted(ctx, *grads):
        calls.append(ctx.wrapper.batch_chunk)
        return backward(ctx, *grads)

    monkeypatch.setattr(batch_chunked._Chunked, "backward", staticmethod(counted))
    return calls


def _islands(model: nn.Module, island: bool) -> nn.Module:
    chunked = BatchChunked(model[3], 2)
    offloaded = Offloaded(model[4], min_bytes=0, _offload_cpu_tensors=True)  # CPU "offload": copies
    model[3] = EagerIsland(chunked) if island else chunked
    model[4] = EagerIsland(offloaded) if island else offloaded
    return model


def test_an_island_is_its_module_eagerly():
    reference = _model()
    model = _islands(twin(reference), island=True)
    assert set(wrapper_state(model).values()) == {"EagerIsland", "BatchChunked", "Offloaded"}
    assert list(model.state_dict()) == list(reference.state_dict())
    inputs = (seeded_randn(5, 3, 37).requires_grad_(),)
    assert_same_step(reference, model, inputs, steps=2)
    assert convmem.restore_(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]


@needs_inductor
@pytest.mark.parametrize("island", [True, False])
def test_under_torch_compile_only_an_island_keeps_its_wrapper_at_work(island, monkeypatch):
    # Without the island, Dynamo traces through BatchChunked, which steps aside in compiled code:
    # the step is still exact, but nothing is recomputed in chunks and nothing offloaded.
    calls = _count_chunked_backwards(monkeypatch)
    packed = []
    reference = _model()
    model = _islands(twin(reference), island)
    group = model[4].wrapped.group if island else model[4].group
    pack = group._pack
    monkeypatch.setattr(group, "_pack", lambda call, t: packed.append(t.shape) or pack(call, t))
    torch._dynamo.reset()
    model.compile()  # in place: state_dict keys unchanged
    inputs = (seeded_randn(5, 3, 37).requires_grad_(),)
    assert_same_step(reference, model, inputs, steps=2)  # BatchNorm statistics advance once a step
    if island:
        assert calls == [2, 2], "the chunked block's backward ran in chunks of two, once a step"
        assert packed, "the offloaded block's saved tensors went through the offload hooks"
    else:
        assert calls == [] and packed == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_compiled_islands_chunk_and_offload_exactly(monkeypatch):
    calls = _count_chunked_backwards(monkeypatch)
    reference = _model().cuda()
    model = _islands(twin(reference), island=True)
    offloaded = model[4].wrapped
    pack = offloaded.group._pack
    packed = []
    monkeypatch.setattr(offloaded.group, "_pack", lambda call, t: packed.append(t.device.type) or pack(call, t))
    torch._dynamo.reset()
    model.compile()
    inputs = (seeded_randn(5, 3, 1031).cuda().requires_grad_(),)
    assert_same_step(reference, model, inputs, steps=2)
    assert calls == [2, 2] and "cuda" in packed
