"""Checkpointed: exact gradients, buffers updated once, the selective probe's choices, segments."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from _compare import assert_same_step, seeded_randn
from convmem.nn import checkpointed as checkpointed_module
from convmem.nn.checkpointed import Checkpointed, selective_available
from convmem.zoo.tcn import TCNBlock
from convmem.zoo.wavenet import WaveNetLayer

needs_selective = pytest.mark.skipif(not selective_available(), reason="selective checkpointing needs PyTorch >= 2.5")
POLICIES = ["full", pytest.param("selective", marks=needs_selective)]


class ConvBNBlock(nn.Module):
    """conv -> BatchNorm -> GELU -> conv, residual: what NOTE [Buffers are updated once] is about."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.bn(self.conv1(x))))


def _block(cls=ConvBNBlock, *args):
    torch.manual_seed(0)
    return cls(*args).double()


def test_gradcheck_on_a_tiny_block():
    # "full" only: gradcheck runs backward many times through one graph, and PyTorch's selective
    # checkpointing allows one backward per forward (its exactness is checked against "full" below).
    block = Checkpointed(_block()).eval()  # eval: BatchNorm is a fixed affine map, as gradcheck needs
    x = seeded_randn(2, 4, 7).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("early_stop", [True, False])
def test_batchnorm_statistics_updated_once(policy, early_stop):
    block = _block()
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        assert_same_step(block, Checkpointed(copy.deepcopy(block), policy), [seeded_randn(3, 4, 11)], steps=3)


def test_plain_checkpoint_updates_batchnorm_twice():
    # The problem the test above guards against (pytorch issue 96136), so that it can fail.
    block, twin = _block(), _block()
    x = seeded_randn(3, 4, 11).requires_grad_()
    block(x).square().mean().backward()
    checkpoint(twin, x, use_reentrant=False).square().mean().backward()
    assert block.bn.num_batches_tracked.item() == 1 and twin.bn.num_batches_tracked.item() == 2
    assert not torch.allclose(block.bn.running_mean, twin.bn.running_mean)


class SpectralBlock(nn.Module):
    """A spectral-norm conv: its power iteration updates buffers in the forward, and the weight
    depends on them. A recompute that starts from the updated buffers computes another weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv1d(4, 4, 3, padding=1))

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_buffers_the_weight_depends_on_are_replayed():
    block = _block(SpectralBlock)
    assert_same_step(block, Checkpointed(copy.deepcopy(block)), [seeded_randn(2, 4, 9)], steps=2)
    # Plain checkpointing gets the gradients wrong here: the test above can fail.
    x = seeded_randn(2, 4, 9).requires_grad_()
    twin = copy.deepcopy(block)
    block(x).square().sum().backward()
    checkpoint(twin, x, use_reentrant=False).square().sum().backward()
    assert not torch.allclose(block.conv.parametrizations.weight.original.grad,
                              twin.conv.parametrizations.weight.original.grad)


class DropoutBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.conv(F.dropout(self.dropout(F.gelu(self.conv(x))), 0.3, self.training))


class Seeded(nn.Module):
    """Seeds the RNG before every forward, so that two models draw the same dropout masks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        torch.manual_seed(1234)
        return self.model(x)


@pytest.mark.parametrize("policy", POLICIES)
def test_dropout_masks_are_replayed(policy):
    block = _block(DropoutBlock)
    assert_same_step(Seeded(block), Seeded(Checkpointed(copy.deepcopy(block), policy)), [seeded_randn(2, 4, 16)])


def test_without_rng_replay_the_dropout_test_fails():
    block = _block(DropoutBlock)
    x = seeded_randn(2, 4, 16).requires_grad_()
    twin = copy.deepcopy(block)
    torch.manual_seed(1234)
    block(x).square().sum().backward()
    torch.manual_seed(1234)
    checkpoint(twin, x, use_reentrant=False, preserve_rng_state=False).square().sum().backward()
    assert not torch.allclose(block.conv.weight.grad, twin.conv.weight.grad)


@needs_selective
def test_selective_keeps_the_conv_outputs_backward_needs():
    # TCN block x + pointwise(GELU(dilated(x))): GELU saves the dilated conv's output; the
    # pointwise conv's output feeds only the add, which saves nothing.
    kept = checkpointed_module._probe_kept_ops(_block(TCNBlock, 4, 3, 2), (seeded_randn(2, 4, 9),), {})
    assert kept.keep == (True, False) and kept.conv_calls == (("dilated", 0),)
    # WaveNet layer: tanh and sigmoid save their outputs, computed from the dilated conv's output;
    # the skip and residual 1x1 outputs are not needed.
    layer = _block(WaveNetLayer, 4, 8, 4, 2, 1)
    kept = checkpointed_module._probe_kept_ops(layer, (seeded_randn(2, 4, 9),), {})
    assert kept.keep == (True, False, False) and kept.conv_calls == (("dilated.conv", 0),)


class InplaceReLUBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


@needs_selective
def test_selective_recomputes_conv_outputs_modified_in_place():
    block = _block(InplaceReLUBlock)
    # relu_ overwrites conv1's output: keeping it would keep the ReLU's output instead.
    assert checkpointed_module._probe_kept_ops(block, (seeded_randn(2, 4, 9),), {}).keep == (False, False)
    assert_same_step(block, Checkpointed(copy.deepcopy(block), "selective"), [seeded_randn(2, 4, 9)])


class ValueDependent(nn.Module):
    """Reads a tensor value in forward: the meta probe cannot run it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.gelu(y) if y.mean().item() > -1e9 else y


@needs_selective
def test_selective_falls_back_to_full_where_the_probe_cannot_run():
    block = _block(ValueDependent)
    wrapped = Checkpointed(copy.deepcopy(block), "selective")
    with pytest.warns(UserWarning, match="ValueDependent.*policy='full'"):
        assert_same_step(block, wrapped, [seeded_randn(2, 4, 9)])


def test_selective_without_pytorch_support_falls_back_to_full(monkeypatch):
    monkeypatch.setattr(checkpointed_module, "create_selective_checkpoint_contexts", None)
    block = _block()
    with pytest.warns(UserWarning, match="PyTorch >= 2.5.*policy='full'"):
        wrapped = Checkpointed(copy.deepcopy(block), "selective")
    assert wrapped.policy == "full"
    assert_same_step(block, wrapped, [seeded_randn(2, 4, 9)], steps=2)


@pytest.mark.parametrize("policy", POLICIES)
def test_segments_of_a_sequential(policy):
    torch.manual_seed(0)
    chain = nn.Sequential(ConvBNBlock(), nn.MaxPool1d(2), ConvBNBlock(), ConvBNBlock(), nn.GELU()).double()
    wrapped = Checkpointed(copy.deepcopy(chain), policy, segments=(2, 1, 2))
    assert "segments=(2, 1, 2)" in repr(wrapped)
    assert_same_step(chain, wrapped, [seeded_randn(2, 4, 17)], steps=3)


def test_bad_segments_and_policy_are_rejected():
    chain = nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU())
    with pytest.raises(ValueError, match="cover 3 items.*has 2"):
        Checkpointed(chain, segments=(1, 2))
    with pytest.raises(ValueError, match="positive ints"):
        Checkpointed(chain, segments=(0, 2))
    with pytest.raises(ValueError, match="nn.Sequential"):
        Checkpointed(nn.Conv1d(2, 2, 1), segments=(1,))
    with pytest.raises(ValueError, match="policy must be one of"):
        Checkpointed(chain, policy="fast")


def test_state_dict_keys_are_the_wrapped_modules():
    block = _block()
    wrapped = Checkpointed(copy.deepcopy(block))
    assert list(wrapped.state_dict()) == list(block.state_dict())
    wrapped.load_state_dict(block.state_dict())


def test_no_grad_runs_the_module_directly(monkeypatch):
    block = _block()
    wrapped = Checkpointed(copy.deepcopy(block))
    monkeypatch.setattr(checkpointed_module, "checkpoint", lambda *a, **k: pytest.fail("checkpointed under no_grad"))
    with torch.no_grad():
        assert torch.equal(wrapped(seeded_randn(2, 4, 5)), block(seeded_randn(2, 4, 5)))


def test_forward_passes_keyword_arguments():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x, *, scale):
            return torch.sigmoid(self.conv(x)) * scale

    gate = _block(Gate)
    wrapped = Checkpointed(copy.deepcopy(gate))
    x, scale = seeded_randn(2, 4, 5).requires_grad_(), seeded_randn(2, 4, 5, seed=1).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(x, scale=scale).sum().backward()
    grads = (x.grad.clone(), scale.grad.clone())
    x.grad = scale.grad = None
    gate(x, scale=scale).sum().backward()
    assert torch.equal(grads[0], x.grad) and torch.equal(grads[1], scale.grad)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_the_estimate_recomputes_under_simulated_autocast(policy):
    # NOTE [Simulated autocast]: on meta tensors torch.utils.checkpoint cannot re-enter CUDA
    # autocast, so the recompute must re-enter the simulated one: else it would run in fp32 on the
    # bf16 tensors the forward saved (a dtype error), or count fp32 activations.
    from convmem.profile import estimate_step

    torch.manual_seed(0)
    blocks = [TCNBlock(32, 3, d) for d in (1, 2, 4)]
    x = torch.randn(2, 32, 4096)
    peaks = {}
    for dtype in (None, torch.bfloat16):
        model = nn.Sequential(*(Checkpointed(b, policy) for b in copy.deepcopy(blocks)))
        peaks[dtype] = estimate_step(model, (x,), autocast_dtype=dtype).peak_bytes
    plain = estimate_step(nn.Sequential(*copy.deepcopy(blocks)), (x,), autocast_dtype=torch.bfloat16).peak_bytes
    assert peaks[torch.bfloat16] < peaks[None]
    assert peaks[torch.bfloat16] < plain


class NormActBlock(nn.Module):
    """conv -> BatchNorm -> GELU -> dropout -> conv (+ x): kept conv outputs feed a norm and an add."""

    def __init__(self, padding=1, weight_norm=False):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 3, padding=padding)
        if weight_norm:
            self.conv1 = nn.utils.parametrizations.weight_norm(self.conv1)
        self.norm = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv1d(6, 4, 3, padding=1, dilation=1)

    def forward(self, x):
        return x + self.conv2(self.drop(F.gelu(self.norm(self.conv1(x)))))


def _no_dispatch_mode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("NOTE [Selective recompute by module]: no dispatch mode for plain Conv1d blocks")

    monkeypatch.setattr(checkpointed_module, "create_selective_checkpoint_contexts", refuse)


@needs_selective
@pytest.mark.parametrize("weight_norm", [False, True])
def test_selective_by_module_is_exact_without_a_dispatch_mode(monkeypatch, weight_norm):
    # NOTE [Selective recompute by module]: plain Conv1d blocks keep the needed conv outputs from
    # forward hooks and answer the recompute from them; gradients, BatchNorm statistics and dropout
    # masks equal the untouched block's.
    _no_dispatch_mode(monkeypatch)
    torch.manual_seed(0)
    block = NormActBlock(weight_norm=weight_norm).double()
    kept = checkpointed_module._probe_kept_ops(block, (seeded_randn(2, 4, 9),), {})
    assert kept.conv_calls == (("conv1", 0),)
    wrapped = Checkpointed(copy.deepcopy(block), "selective")
    assert_same_step(Seeded(block), Seeded(wrapped), [seeded_randn(3, 4, 37)], steps=3)


class UpsampleBlock(nn.Module):
    """A strided transposed conv (weight-normed) feeding a Snake-like pointwise op, then a conv."""

    def __init__(self):
        super().__init__()
        self.up = nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(4, 3, 5, stride=3, padding=1, output_padding=1))
        self.conv = nn.Conv1d(3, 3, 3, padding=2, dilation=2, groups=3)

    def forward(self, x):
        y = self.up(x)
        y = y + torch.sin(y) ** 2
        return self.conv(y) * torch.tanh(y)


@needs_selective
def test_selective_by_module_replays_transposed_convolutions(monkeypatch):
    _no_dispatch_mode(monkeypatch)
    torch.manual_seed(0)
    block = UpsampleBlock().double()
    kept = checkpointed_module._probe_kept_ops(block, (seeded_randn(2, 4, 9),), {})
    assert kept.conv_calls == (("up", 0), ("conv", 0))
    assert_same_step(block, Checkpointed(copy.deepcopy(block), "selective"), [seeded_randn(2, 4, 23)], steps=2)


@needs_selective
def test_selective_by_module_keeps_what_the_dispatch_mode_keeps(monkeypatch):
    from convmem.profile import estimate_step

    blocks = [TCNBlock(32, 3, d) for d in (1, 2)] + [NormActBlock(), WaveNetLayer(4, 8, 4, 2, 1), UpsampleBlock()]
    peaks = {}
    for by_module in (True, False):
        if not by_module:
            monkeypatch.setattr(checkpointed_module, "replayable", lambda module: False)
        for i, block in enumerate(blocks):
            x = torch.randn(2, 32 if i < 2 else 4, 2048)
            model = Checkpointed(copy.deepcopy(block), "selective")
            peaks[(by_module, i)] = estimate_step(model, (x,), loss_fn=lambda y: y[0].square().mean()
                                                  if isinstance(y, tuple) else y.square().mean()).peak_bytes
    for i in range(len(blocks)):
        assert peaks[(True, i)] == peaks[(False, i)], type(blocks[i]).__name__


@needs_selective
def test_selective_uses_the_dispatch_mode_where_a_conv_cannot_be_replayed():
    same = NormActBlock(padding="same").double()
    assert checkpointed_module._probe_kept_ops(same, (seeded_randn(2, 4, 9),), {}).conv_calls is None
    assert_same_step(Seeded(same), Seeded(Checkpointed(copy.deepcopy(same), "selective")), [seeded_randn(2, 4, 21)])
    # Under autocast the casts around each convolution would have to be replayed too.
    block = NormActBlock()
    wrapped = Checkpointed(copy.deepcopy(block), "selective")
    called = []
    original = checkpointed_module.create_selective_checkpoint_contexts

    def spy(*args, **kwargs):
        called.append(1)
        return original(*args, **kwargs)

    checkpointed_module.create_selective_checkpoint_contexts = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = wrapped(torch.randn(2, 4, 33))
        y.float().square().sum().backward()
    finally:
        checkpointed_module.create_selective_checkpoint_contexts = original
    assert called
