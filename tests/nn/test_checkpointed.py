"""Checkpointed: exact gradients, buffers updated once, the selective probe's choices, segments."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from _compare import assert_same_step
from convmem.nn import checkpointed as checkpointed_module
from convmem.nn.checkpointed import Checkpointed, selective_available
from convmem.zoo.tcn import TCNBlock
from convmem.zoo.wavenet import WaveNetLayer

needs_selective = pytest.mark.skipif(not selective_available(), reason="selective checkpointing needs PyTorch >= 2.5")
POLICIES = ["full", pytest.param("selective", marks=needs_selective)]


def _x(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


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
    x = _x(2, 4, 7).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("early_stop", [True, False])
def test_batchnorm_statistics_updated_once(policy, early_stop):
    block = _block()
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        assert_same_step(block, Checkpointed(copy.deepcopy(block), policy), [_x(3, 4, 11)], steps=3)


def test_plain_checkpoint_updates_batchnorm_twice():
    # The problem the test above guards against (pytorch issue 96136), so that it can fail.
    block, twin = _block(), _block()
    x = _x(3, 4, 11).requires_grad_()
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
    assert_same_step(block, Checkpointed(copy.deepcopy(block)), [_x(2, 4, 9)], steps=2)
    # Plain checkpointing gets the gradients wrong here: the test above can fail.
    x = _x(2, 4, 9).requires_grad_()
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
    assert_same_step(Seeded(block), Seeded(Checkpointed(copy.deepcopy(block), policy)), [_x(2, 4, 16)])


def test_without_rng_replay_the_dropout_test_fails():
    block = _block(DropoutBlock)
    x = _x(2, 4, 16).requires_grad_()
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
    assert checkpointed_module._probe_kept_ops(_block(TCNBlock, 4, 3, 2), (_x(2, 4, 9),), {}) == (True, False)
    # WaveNet layer: tanh and sigmoid save their outputs, computed from the dilated conv's output;
    # the skip and residual 1x1 outputs are not needed.
    layer = _block(WaveNetLayer, 4, 8, 4, 2, 1)
    assert checkpointed_module._probe_kept_ops(layer, (_x(2, 4, 9),), {}) == (True, False, False)


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
    assert checkpointed_module._probe_kept_ops(block, (_x(2, 4, 9),), {}) == (False, False)
    assert_same_step(block, Checkpointed(copy.deepcopy(block), "selective"), [_x(2, 4, 9)])


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
        assert_same_step(block, wrapped, [_x(2, 4, 9)])


def test_selective_without_pytorch_support_falls_back_to_full(monkeypatch):
    monkeypatch.setattr(checkpointed_module, "create_selective_checkpoint_contexts", None)
    block = _block()
    with pytest.warns(UserWarning, match="PyTorch >= 2.5.*policy='full'"):
        wrapped = Checkpointed(copy.deepcopy(block), "selective")
    assert wrapped.policy == "full"
    assert_same_step(block, wrapped, [_x(2, 4, 9)], steps=2)


@pytest.mark.parametrize("policy", POLICIES)
def test_segments_of_a_sequential(policy):
    torch.manual_seed(0)
    chain = nn.Sequential(ConvBNBlock(), nn.MaxPool1d(2), ConvBNBlock(), ConvBNBlock(), nn.GELU()).double()
    wrapped = Checkpointed(copy.deepcopy(chain), policy, segments=(2, 1, 2))
    assert "segments=(2, 1, 2)" in repr(wrapped)
    assert_same_step(chain, wrapped, [_x(2, 4, 17)], steps=3)


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
        assert torch.equal(wrapped(_x(2, 4, 5)), block(_x(2, 4, 5)))


def test_forward_passes_keyword_arguments():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x, *, scale):
            return torch.sigmoid(self.conv(x)) * scale

    gate = _block(Gate)
    wrapped = Checkpointed(copy.deepcopy(gate))
    x, scale = _x(2, 4, 5).requires_grad_(), _x(2, 4, 5, seed=1).requires_grad_()
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
