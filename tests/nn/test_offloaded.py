"""Offloaded: exact gradients and buffers, storages copied once and views restored, the prefetch order,
retain_graph, autocast, nesting with checkpointing, and the no-op cases. CPU tests run the pack and
unpack path on CPU tensors (NOTE [Offloading CPU tensors in tests]); CUDA tests skip without a GPU."""
from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch

import convmem
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from _compare import assert_same_step, seeded_randn, step_results
from convmem.nn import Checkpointed, OffloadGroup, Offloaded, restore_
from convmem.nn.offloaded import DEFAULT_MIN_BYTES

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _block(channels=4, seed=0):
    """conv -> tanh -> conv: saves the block input and the tanh output (twice: tanh, conv2)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(channels, channels, 3, padding=1), nn.Tanh(), nn.Conv1d(channels, channels, 3, padding=1)
    ).double()


class ConvBNBlock(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.gelu(self.bn(self.conv1(x)))))


def _offloaded(module, group=None, min_bytes=0):
    return Offloaded(module, min_bytes=min_bytes, group=group, _offload_cpu_tensors=True)


def _chain(n=3, group=None):
    reference = nn.Sequential(*[_block(seed=i) for i in range(n)])
    group = group or OffloadGroup(record_events=True)
    optimized = nn.Sequential(*[_offloaded(copy.deepcopy(b), group) for b in reference])
    return reference, optimized, group


def _stored(group):
    """Every storage the calls of the group's current chain hold off the device (alive while their graph is)."""
    stored, call = [], group._last() if group._last is not None else None
    while call is not None:
        stored += call.stored.values()
        call = call.before()
    return stored


def test_gradcheck_on_a_tiny_block():
    block = _offloaded(_block())
    assert torch.autograd.gradcheck(block, (seeded_randn(2, 4, 5).requires_grad_(),))
    assert block.group.bytes_offloaded > 0


def test_chain_is_exact_and_prefetches_in_backward_order():
    reference, optimized, group = _chain()
    assert_same_step(reference, optimized, [seeded_randn(2, 4, 9)])
    # Backward reaches the last call first: it and the one before it are copied back; then each
    # earlier call as backward reaches the one after it. Nothing was fetched on demand.
    assert group.events == [("prefetch", 2), ("prefetch", 1), ("prefetch", 0)]


def test_no_prefetch_copies_each_call_back_when_reached():
    reference, optimized, group = _chain(group=OffloadGroup(prefetch=0, record_events=True))
    assert_same_step(reference, optimized, [seeded_randn(2, 4, 9)])
    assert group.events == [("prefetch", 2), ("prefetch", 1), ("prefetch", 0)]


def test_steps_restart_the_chain_and_batchnorm_updates_once():
    reference = nn.Sequential(ConvBNBlock(), ConvBNBlock()).double()
    group = OffloadGroup(record_events=True)
    optimized = nn.Sequential(*[_offloaded(copy.deepcopy(b), group) for b in reference])
    assert_same_step(reference, optimized, [seeded_randn(3, 4, 11)], steps=3)
    assert group.events == [("prefetch", 1), ("prefetch", 0)] * 3


def test_storages_are_copied_once_and_views_come_back_as_views():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 3, padding=1).double()

        def forward(self, x):
            h = self.conv(x)  # saved by mul (twice), by sin (as a view) and by bmm (transposed)
            ht = h.transpose(1, 2)
            return (h * h).sum() + h[:, :, 2:].sin().sum() + torch.bmm(ht, h).sum()

    module = Views()
    block = _offloaded(copy.deepcopy(module))
    assert_same_step(module, block, [seeded_randn(2, 3, 7)])
    # h alone (the input requires grad in assert_same_step: a leaf, kept where it is).
    assert block.group.bytes_offloaded == 2 * 3 * 7 * 8, block.group.bytes_offloaded


def test_a_block_output_saved_by_the_next_block_is_copied_once():
    relu = lambda: nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU()).double()  # ReLU saves its output
    reference = nn.Sequential(relu(), relu())
    group = OffloadGroup()
    optimized = nn.Sequential(*[_offloaded(copy.deepcopy(b), group) for b in reference])
    assert_same_step(reference, optimized, [seeded_randn(2, 4, 9)])
    # block 0: the ReLU output; block 1: its input (the same storage) and its ReLU output.
    assert group.bytes_offloaded == 2 * (2 * 4 * 9 * 8)


def test_a_storage_written_in_place_between_saves_is_copied_again():
    class InPlace(nn.Module):
        def forward(self, x):
            h = x * 2
            a = h.sin()  # saves h at version 0
            h.add_(1)  # bumps the version: sin's saved h is stale (autograd would refuse it)
            b = h.cos()  # saves h at version 1: a new copy, not the first one
            return a.detach().sum() + b.sum()

    block = _offloaded(InPlace())
    x = seeded_randn(2, 3, 5).requires_grad_()
    block(x).backward()
    expected = x.detach() * 2 + 1
    assert torch.allclose(x.grad, -2 * expected.sin(), rtol=0, atol=1e-14)
    assert block.group.bytes_offloaded == 2 * x.numel() * 8


def test_parameters_and_buffers_are_never_copied():
    module = ConvBNBlock().double()
    block = _offloaded(module)
    group = block.group
    copied = []
    copy_off = group._copy_off
    group._copy_off = lambda storage, tensor, index: copied.append(tensor.untyped_storage().data_ptr()) or copy_off(
        storage, tensor, index
    )
    x = seeded_randn(2, 4, 6)
    block(x * 1).sum().backward()  # x * 1: the block input is not a leaf, so it is copied too
    resident = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    assert copied and not resident & set(copied)
    # conv1's input, conv1's output (BatchNorm's input), BatchNorm's output (GELU's input), GELU's
    # output (conv2's input), the ReLU's output: 2 x 4 x 6 doubles each; BatchNorm's saved batch
    # statistics are 4 numbers each.
    assert group.bytes_offloaded == 5 * (2 * 4 * 6 * 8) + 2 * 4 * 8


def test_same_module_called_twice():
    block = _block()

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.tanh(self.inner(x)))

    group = OffloadGroup(record_events=True)
    assert_same_step(Twice(block), Twice(_offloaded(copy.deepcopy(block), group)), [seeded_randn(2, 4, 9)])
    assert group.events == [("prefetch", 1), ("prefetch", 0)]


def test_retain_graph_backward_twice():
    reference, optimized, group = _chain()
    x = seeded_randn(2, 4, 9)
    grads = []
    for model in (reference, optimized):
        xi = x.clone().requires_grad_()
        loss = model(xi).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert group.events == [("prefetch", 2), ("prefetch", 1), ("prefetch", 0)] * 2


def test_device_copies_are_dropped_after_use_and_host_copies_with_the_graph():
    _, optimized, group = _chain()
    loss = optimized(seeded_randn(2, 4, 9)).sum()
    stored = _stored(group)
    assert stored and all(s.restored is None and s.host is not None for s in stored)
    loss.backward(retain_graph=True)
    assert all(s.restored is None for s in stored)  # every saved tensor unpacked once: dropped
    del loss, stored
    gc.collect()
    assert not _stored(group)


def test_a_saved_tensor_backward_reaches_outside_the_outputs_is_fetched_on_demand():
    class Stash(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1).double()

        def forward(self, x):
            self.stash = self.conv(x).tanh()  # tanh saves its output; the loss uses only the stash
            return self.stash * 0

    group = OffloadGroup(record_events=True)
    block = _offloaded(Stash(), group)
    x = seeded_randn(2, 4, 9).requires_grad_()
    block(x)
    block.wrapped.stash.sum().backward()
    assert group.events == [("fetch", 0)]
    conv = block.wrapped.conv
    expected = torch.autograd.grad(conv(x).tanh().sum(), x)[0]
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-14)


def test_autocast_is_bitwise_unchanged():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 4, 3, padding=1))
    block = _offloaded(copy.deepcopy(module))
    x = seeded_randn(2, 4, 17, dtype=torch.float32)
    results = []
    for m in (module, block):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        results.append([y] + [p.grad for p in m.parameters()])
    assert block.group.bytes_offloaded > 0
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_offloaded_inside_a_checkpointed_region_is_exact():
    reference = nn.Sequential(ConvBNBlock(), ConvBNBlock()).double()
    group = OffloadGroup()
    inner = copy.deepcopy(reference)
    optimized = Checkpointed(nn.Sequential(_offloaded(inner[0], group), _offloaded(inner[1], group)))
    assert_same_step(reference, optimized, [seeded_randn(3, 4, 11)], steps=2)


def test_checkpointed_inside_offloaded_offloads_its_inputs():
    reference = nn.Sequential(ConvBNBlock(), ConvBNBlock()).double()
    group = OffloadGroup(record_events=True)
    optimized = nn.Sequential(*[_offloaded(Checkpointed(copy.deepcopy(b)), group) for b in reference])
    assert_same_step(reference, optimized, [seeded_randn(3, 4, 11)], steps=2)
    # The second block's input (the first block's output) is the one tensor kept: on the host.
    assert group.bytes_offloaded == 2 * 3 * 4 * 11 * 8
    assert group.events == [("prefetch", 1)] * 2


def test_torch_checkpoint_in_the_forward_is_exact():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _block(seed=1), _block(seed=2)

        def forward(self, x):
            return self.b(checkpoint(self.a, x, use_reentrant=False))

    module = Inner()
    assert_same_step(module, _offloaded(copy.deepcopy(module)), [seeded_randn(2, 4, 9)])


def test_no_grad_and_cpu_tensors_are_left_alone():
    block = _block()
    x = seeded_randn(2, 4, 9)
    group = OffloadGroup(record_events=True)
    plain = Offloaded(copy.deepcopy(block), min_bytes=0, group=group)  # CPU tensors: nothing to free
    assert_same_step(block, plain, [x])
    with torch.no_grad():
        assert torch.equal(_offloaded(copy.deepcopy(block), group)(x), block(x))
    assert group.bytes_offloaded == 0 and group.events == []


def test_min_bytes_keeps_small_storages():
    block = _offloaded(_block(), min_bytes=2 * 4 * 9 * 8 + 1)
    step_results(block, [seeded_randn(2, 4, 9)])
    assert block.group.bytes_offloaded == 0
    assert Offloaded(_block()).min_bytes == DEFAULT_MIN_BYTES == 2**20


def test_meta_device_simulates_the_moves_for_the_estimate():
    # NOTE [Offload on the meta device]: what would move is released at pack time and allocated
    # again when backward reaches the call, so the no-GPU estimate sees what CUDA would hold.
    group = OffloadGroup(record_events=True)
    block = Offloaded(_block().to("meta"), min_bytes=0, group=group)
    x = torch.empty(2, 4, 9, dtype=torch.float64, device="meta", requires_grad=True)
    block(x).sum().backward()
    assert group.bytes_offloaded > 0 and group.bytes_restored == group.bytes_offloaded
    assert group.events == [("prefetch", 0)]


def test_estimate_of_an_offloaded_model_keeps_nothing_offloaded():
    from convmem.profile.estimate import estimate_step

    entry = convmem.zoo.get("tcn", "default", device="meta")
    plain = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    convmem.offload_(entry.model)
    offloaded = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    # Measured on an H200 (benchmarks/results/offload.csv): 12.77 GiB untouched, 2.29 GiB offloaded.
    assert offloaded.peak_bytes < 0.25 * plain.peak_bytes
    assert offloaded.kept_bytes < 0.05 * plain.kept_bytes


def test_state_dict_keys_and_restore():
    module = ConvBNBlock()
    block = _offloaded(module)
    assert block.state_dict().keys() == module.state_dict().keys()
    block.load_state_dict(module.state_dict())
    holder = nn.Sequential(block)
    assert restore_(holder)[0] is module
    assert "min_bytes=0" in repr(block)


def test_copies_share_a_fresh_group_and_pickle():
    _, optimized, group = _chain()
    clone = copy.deepcopy(optimized)
    assert clone[0].group is clone[1].group is not group
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded[0].group is loaded[2].group and loaded[0].group.prefetch == 1
    assert pickle.loads(pickle.dumps(group)).record_events


@pytest.mark.parametrize("kwargs, error, match", [
    ({"min_bytes": -1}, ValueError, "min_bytes"),
    ({"min_bytes": "1MiB"}, ValueError, "min_bytes"),
    ({"min_bytes": True}, ValueError, "min_bytes"),
    ({"group": "shared"}, TypeError, "OffloadGroup"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Offloaded(_block(), **kwargs)


@pytest.mark.parametrize("prefetch", [-1, 1.0, None])
def test_bad_prefetch(prefetch):
    with pytest.raises(ValueError, match="prefetch"):
        OffloadGroup(prefetch=prefetch)


@needs_cuda
def test_cuda_matches_eager_and_frees_device_memory():
    torch.manual_seed(0)
    model = nn.Sequential(*[ConvBNBlock(64) for _ in range(4)]).cuda()
    group = OffloadGroup(record_events=True)
    optimized = nn.Sequential(*[Offloaded(copy.deepcopy(b), min_bytes=0, group=group) for b in model])
    x = torch.randn(4, 64, 8192, device="cuda")
    assert_same_step(model, optimized, [x], tol=1e-5, steps=2)
    assert group.bytes_offloaded > 0
    assert ("fetch", 0) not in group.events
