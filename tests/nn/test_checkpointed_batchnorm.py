"""Checkpointed and BatchNorm: statistics updated once, and nothing kept for it from forward to backward.

NOTE [Buffers are updated once] in convmem/nn/checkpointed.py: the recompute of a train-mode
BatchNorm gets its statistics put back right after each call; no copy lives from forward to
backward, so a checkpointed block keeps exactly what ``torch.utils.checkpoint`` keeps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import convmem
from _compare import assert_same_step, seeded_randn, step_results
from convmem.nn._wrapper import ModuleWrapper, replace_submodule
from convmem.nn.checkpointed import Checkpointed, selective_available
from convmem.profile import estimate_step

needs_selective = pytest.mark.skipif(not selective_available(), reason="selective checkpointing needs PyTorch >= 2.5")
POLICIES = ["full", pytest.param("selective", marks=needs_selective)]


class ConvBN(nn.Module):
    def __init__(self, channels=4, momentum=0.1):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm1d(channels, momentum=momentum)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.bn(self.conv1(x))))


class SharedBN(nn.Module):
    """One BatchNorm called twice inside the block."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm1d(channels, momentum=None)

    def forward(self, x):
        return self.bn(F.gelu(self.bn(self.conv(x))) + x)


class Nested(nn.Module):
    """A checkpointed block inside a checkpointed block, BatchNorm in both."""

    def __init__(self, inner, channels=4):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.inner = inner
        self.conv = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return self.conv(self.inner(torch.tanh(self.bn(x))))


class OutsideToo(nn.Module):
    """A BatchNorm called inside the checkpointed block and once more outside it."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.norm = block.bn

    def forward(self, x):
        return self.norm(self.block(x))


def _seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).double()


def _assert_buffers_bitwise(reference, optimized):
    expected, actual = reference.state_dict(), optimized.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_statistics_advance_once_bitwise(policy, momentum):
    block = _seeded(ConvBN, momentum=momentum)
    wrapped = Checkpointed(copy.deepcopy(block), policy)
    assert_same_step(block, wrapped, [seeded_randn(3, 4, 11)], steps=3)
    _assert_buffers_bitwise(block, wrapped)
    assert wrapped.wrapped.bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("policy", POLICIES)
def test_batchnorm_called_twice_in_the_block(policy):
    block = _seeded(SharedBN)
    wrapped = Checkpointed(copy.deepcopy(block), policy)
    assert_same_step(block, wrapped, [seeded_randn(3, 4, 11)], steps=3)
    _assert_buffers_bitwise(block, wrapped)
    assert wrapped.wrapped.bn.num_batches_tracked.item() == 6


@pytest.mark.parametrize("policy", POLICIES)
def test_batchnorm_called_inside_and_outside_the_checkpoint(policy):
    model = _seeded(OutsideToo, _seeded(ConvBN))
    optimized = copy.deepcopy(model)
    optimized.block = Checkpointed(optimized.block, policy)
    assert_same_step(model, optimized, [seeded_randn(3, 4, 11)], steps=2)
    _assert_buffers_bitwise(model, optimized)


@pytest.mark.parametrize("policy", POLICIES)
def test_nested_checkpoints(policy):
    model = _seeded(Nested, _seeded(ConvBN))
    optimized = copy.deepcopy(model)
    optimized.inner = Checkpointed(optimized.inner, policy)
    optimized = Checkpointed(optimized, "full")
    assert_same_step(model, optimized, [seeded_randn(3, 4, 11)], steps=2)
    _assert_buffers_bitwise(model, optimized)


@pytest.mark.parametrize("policy", POLICIES)
def test_eval_mode_batchnorm(policy):
    block = _seeded(ConvBN)
    step_results(block, [seeded_randn(3, 4, 11, seed=1)])  # running statistics away from their initial values
    block.eval()
    wrapped = Checkpointed(copy.deepcopy(block), policy)
    assert_same_step(block, wrapped, [seeded_randn(3, 4, 11)], steps=2)
    _assert_buffers_bitwise(block, wrapped)


def test_second_backward_recomputes_from_the_same_statistics():
    block = _seeded(ConvBN)
    wrapped = Checkpointed(copy.deepcopy(block))
    x = seeded_randn(3, 4, 11).requires_grad_()
    for model in (block, wrapped):
        loss = model(x).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_buffers_bitwise(block, wrapped)
    for (name, p), q in zip(block.named_parameters(), wrapped.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), name


def test_a_recompute_that_raises_leaves_the_statistics_alone():
    block = Checkpointed(_seeded(ConvBN))
    loss = block(seeded_randn(3, 4, 11).requires_grad_()).square().mean()
    after_forward = copy.deepcopy(block.state_dict())

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = block.wrapped.bn.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        loss.backward()
    handle.remove()
    _assert_buffers_bitwise_dict(after_forward, block.state_dict())


def _assert_buffers_bitwise_dict(expected, actual):
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name


# ------------------------------------------------------------------ no more memory than plain checkpoint


class _TorchCheckpointed(ModuleWrapper):
    """What a user writes by hand: non-reentrant ``torch.utils.checkpoint`` around a block."""

    def forward(self, *args, **kwargs):
        return checkpoint(self.wrapped, *args, use_reentrant=False, **kwargs)


def _bn_chain(channels=64):
    torch.manual_seed(0)
    return nn.Sequential(*(ConvBN(channels) for _ in range(4)), nn.Conv1d(channels, 1, 1))


def _estimates(make, wrap_convmem, wrap_plain, inputs):
    ours, plain = make(), make()
    wrap_convmem(ours)
    wrap_plain(plain)
    return estimate_step(ours, inputs, None), estimate_step(plain, inputs, None)


def test_checkpointed_batchnorm_blocks_keep_what_plain_checkpoint_keeps():
    # On the meta device: the estimate's simulated allocator sees every storage from forward to
    # backward. Copies of running statistics held until backward (the old mechanism: 42 KiB more
    # on conformer_conv measured on an H200) would show up here as extra bytes.
    x = torch.empty(4, 64, 4096, device="meta")

    def wrap_convmem(chain):
        for i in range(4):
            chain[i] = Checkpointed(chain[i])

    def wrap_plain(chain):
        for i in range(4):
            chain[i] = _TorchCheckpointed(chain[i])

    ours, plain = _estimates(lambda: _bn_chain().to("meta"), wrap_convmem, wrap_plain, (x,))
    assert ours.saved_bytes == plain.saved_bytes
    assert ours.kept_bytes == plain.kept_bytes
    assert ours.peak_bytes == plain.peak_bytes
    assert ours.timeline == plain.timeline  # at every op, not only at the peak


@pytest.mark.parametrize("name", ["conformer_conv", "resnet1d"])
def test_checkpoint_full_keeps_what_plain_checkpoint_keeps_on_zoo_models(name):
    def make():
        return convmem.zoo.get(name, "default", device="meta")

    ours, plain = make(), make()
    convmem.checkpoint_(ours.model, policy="full", example_inputs=ours.inputs)
    for block in plain.blocks:
        replace_submodule(plain.model, block, _TorchCheckpointed(plain.model.get_submodule(block)))
    a = estimate_step(ours.model, ours.inputs, ours.loss_fn)
    b = estimate_step(plain.model, plain.inputs, plain.loss_fn)
    assert any(isinstance(m, nn.BatchNorm1d) for m in ours.model.modules())
    assert (a.peak_bytes, a.kept_bytes) == (b.peak_bytes, b.kept_bytes)
