"""BatchChunked: exact outputs and gradients, memory of one chunk, refusals (NOTE [Batch-chunked recompute])."""
import copy
import shutil

import pytest
import torch
from torch import nn

import convmem
from _compare import assert_same_step
from convmem.nn import EagerIsland
from convmem.nn.batch_chunked import BatchChunked
from convmem.profile.estimate import estimate_step


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.GroupNorm(2, 8), nn.GELU(),
                         nn.Conv1d(8, 3, 3, padding=1)).double()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_outputs_and_every_gradient_equal_the_untouched_module(chunk):
    block = _block()
    x = torch.randn(5, 3, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(chunk))
    assert_same_step(block, BatchChunked(copy.deepcopy(block), chunk), [x], steps=2)


@pytest.mark.parametrize("compile_block", [False, True])
def test_zoo_w2v2_first_layer_is_exact_and_chunks_backward(compile_block):
    # compiled, with static shapes: with the batch dynamic Inductor failed on this layer (torch 2.13,
    # "cannot determine truth value of Relational"): NOTE [Compiled chunks]
    if compile_block and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler")
    torch._dynamo.reset()
    entry = convmem.zoo.get("w2v2_fe", dtype=torch.float64)
    chunked = copy.deepcopy(entry.model)
    chunked.conv_layers[0] = BatchChunked(chunked.conv_layers[0], 1, compile_block=compile_block)
    assert_same_step(entry.model, chunked, entry.inputs, entry.loss_fn, steps=2)
    assert list(chunked.state_dict()) == list(entry.model.state_dict())
    assert type(convmem.restore_(chunked).conv_layers[0]).__name__ == "Wav2Vec2ConvLayer"


def test_estimate_holds_one_chunk_of_the_block():
    entry = convmem.zoo.get("w2v2_fe", "default", device="meta")
    plain = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    entry.model.conv_layers[0] = BatchChunked(entry.model.conv_layers[0], 1)
    chunked = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    assert chunked.peak_bytes < 0.8 * plain.peak_bytes


def test_refuses_what_couples_samples():
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        BatchChunked(nn.Sequential(nn.Conv1d(2, 2, 3), nn.BatchNorm1d(2)), 1)
    with pytest.raises(ValueError, match="Dropout"):
        BatchChunked(nn.Sequential(nn.Conv1d(2, 2, 3), nn.Dropout(0.1)), 1)
    BatchChunked(nn.Sequential(nn.Conv1d(2, 2, 3), nn.BatchNorm1d(2)).eval(), 1)  # eval: per sample

    class MeanOverBatch(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    chunked = BatchChunked(nn.Sequential(nn.Conv1d(2, 2, 3), MeanOverBatch()), 1)
    with pytest.raises(ValueError, match="couples the samples"):
        chunked(torch.randn(4, 2, 9, requires_grad=True))
    with pytest.raises(ValueError, match="positive int"):
        BatchChunked(_block(), 0)


needs_inductor = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="inductor needs a C compiler")


def _count_compiled_frames(monkeypatch):
    """Frames Inductor compiles for the modules `torch.compile` is called on from here on."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compile_(module, backend=counter, **kwargs))
    return counter


@needs_inductor
def test_a_compiled_block_is_exact_and_runs_compiled_forward_and_in_each_chunk(monkeypatch):
    # NOTE [Compiled chunks]: the no_grad forward and the chunks' recompute are compiled frames
    counter = _count_compiled_frames(monkeypatch)
    torch._dynamo.reset()
    block = _block()
    chunked = BatchChunked(copy.deepcopy(block), 2, compile_block=True)
    x = torch.randn(5, 3, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_same_step(block, chunked, [x], steps=2)
    assert counter.frame_count >= 2, "forward under no_grad and the chunks with grad compile apart"
    assert list(chunked.state_dict()) == list(block.state_dict())
    assert "compile_block=True" in repr(chunked)
    copy.deepcopy(chunked)  # the compiled module is not part of the wrapper


@needs_inductor
def test_a_compiled_block_inside_an_island_of_a_compiled_model_compiles_apart(monkeypatch):
    calls = []
    backward = convmem.nn.batch_chunked._Chunked.backward

    def counted(ctx, *grads):
        calls.append(ctx.wrapper.batch_chunk)
        return backward(ctx, *grads)

    monkeypatch.setattr(convmem.nn.batch_chunked._Chunked, "backward", staticmethod(counted))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv1d(3, 3, 3, padding=1), nn.GELU(), _block(), nn.Conv1d(3, 2, 1)).double()
    model = copy.deepcopy(reference)
    model[2] = EagerIsland(BatchChunked(model[2], 2, compile_block=True))
    torch._dynamo.reset()
    model.compile()
    counter = _count_compiled_frames(monkeypatch)  # the island's module, compiled at its first call
    x = torch.randn(5, 3, 41, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    assert_same_step(reference, model, [x], steps=2)
    assert calls == [2, 2], "the chunked block's backward ran in chunks of two, once a step"
    assert counter.frame_count >= 2, "Dynamo compiles the block inside the island's disabled frame"


def test_on_the_meta_device_a_compiled_block_runs_as_it_is(monkeypatch):
    counter = _count_compiled_frames(monkeypatch)
    entry = convmem.zoo.get("w2v2_fe", "default", device="meta")
    plain = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    entry.model.conv_layers[0] = BatchChunked(entry.model.conv_layers[0], 1, compile_block=True)
    assert estimate_step(entry.model, entry.inputs, entry.loss_fn).peak_bytes < 0.8 * plain.peak_bytes
    assert counter.frame_count == 0
