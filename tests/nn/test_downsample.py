"""DownsampleConv1d and its pooling: lengths, what each mode computes, the low-pass's response."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convmem._metrics import relative_error, sqnr_db
from convmem.nn.downsample import MODES, DownsampleConv1d, downsample, lowpass_filter


def _conv(**kwargs) -> nn.Conv1d:
    torch.manual_seed(0)
    return nn.Conv1d(2, 3, 5, **kwargs).double()


def _input(length: int, channels: int = 2) -> torch.Tensor:
    return torch.randn(3, channels, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 7])
def test_every_mode_gives_ceil_of_length_over_factor(mode, factor):
    for length in (1, 2, 5, 13, 31, 64):  # shorter than the factor, odd, prime, divisible
        assert downsample(_input(length), factor, mode).shape == (3, 2, math.ceil(length / factor))


def test_modes_compute_what_they_say():
    x = _input(12)
    blocks = x.view(3, 2, 4, 3)
    assert torch.equal(downsample(x, 3, "avg"), blocks.mean(-1))
    assert torch.equal(downsample(x, 3, "max"), blocks.amax(-1))
    assert torch.equal(downsample(x, 3, "strided"), blocks[..., 0])
    # A short last block is averaged over the samples it has.
    assert torch.allclose(downsample(x[..., :11], 3, "avg")[..., -1], x[..., 9:11].mean(-1))


@pytest.mark.parametrize("mode", MODES)
def test_factor_one_is_the_identity(mode):
    x = _input(17)
    assert torch.equal(downsample(x, 1, mode), x)


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_lowpass_passes_the_band_and_stops_aliases(factor):
    taps = lowpass_filter(factor)
    assert taps.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(taps, taps.flip(0))  # linear phase: no delay on the kept samples
    n = torch.arange(4096, dtype=torch.float64)
    nyquist = 0.5 / factor  # cycles per sample, after decimation
    for ratio, kind in ((0.25, "pass"), (0.6, "pass"), (1.3, "stop"), (1.8, "stop")):
        tone = torch.cos(2 * math.pi * ratio * nyquist * n).view(1, 1, -1)
        out = downsample(tone, factor, "lowpass")[..., 64:-64]  # away from the edges
        kept = tone[..., ::factor][..., 64:-64]
        if kind == "pass":
            assert relative_error(out, kept) < 1e-2
        else:
            assert out.norm() / kept.norm() < 10 ** (-40 / 20)


def test_lowpass_keeps_a_constant_exactly_at_the_edges():
    x = torch.full((1, 1, 23), 2.5, dtype=torch.float64)
    assert torch.allclose(downsample(x, 4, "lowpass"), torch.full((1, 1, 6), 2.5, dtype=torch.float64), atol=1e-12)


def test_downsampled_conv_is_the_conv_on_the_pooled_input():
    conv = _conv(stride=2, padding=1)
    layer = DownsampleConv1d(conv, 3, "avg")
    x = _input(50)
    assert torch.equal(layer(x), conv(downsample(x, 3, "avg")))
    assert layer.conv is conv  # same parameters, no copy
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias"}  # the filter is not state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", [0, 2, "same", "valid"])
def test_restore_length_gives_the_original_output_length(mode, padding):
    for stride in ((1,) if padding == "same" else (1, 2, 3)):
        conv = _conv(stride=stride, padding=padding)
        layer = DownsampleConv1d(conv, 2, mode, restore_length=True)
        for length in (23, 40):
            x = _input(length)
            assert layer(x).shape == conv(x).shape


def test_restore_length_is_close_for_a_slow_signal():
    conv = _conv(padding=2)
    t = torch.arange(400, dtype=torch.float64)
    x = torch.stack([torch.sin(2 * math.pi * t / 97), torch.cos(2 * math.pi * t / 61)]).expand(3, 2, 400)
    layer = DownsampleConv1d(conv, 2, "lowpass", restore_length=True)
    # The 5-tap kernel spans 10 samples now; on a signal this slow that changes little.
    assert sqnr_db(layer(x)[..., 20:-20], conv(x)[..., 20:-20]) > 20


@pytest.mark.parametrize("mode", MODES)
def test_gradients_flow_in_every_mode(mode):
    layer = DownsampleConv1d(_conv(padding=2), 3, mode, restore_length=True)
    assert torch.autograd.gradcheck(layer, (_input(11)[:1].requires_grad_(),))
    x = _input(20).requires_grad_()
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.conv.weight.grad is not None


@pytest.mark.parametrize("factor", [0, -2, 1.5, 2.0, True, "2"])
def test_bad_factor_is_rejected(factor):
    with pytest.raises((TypeError, ValueError), match="factor"):
        DownsampleConv1d(_conv(), factor)
    with pytest.raises((TypeError, ValueError), match="factor"):
        downsample(_input(8), factor)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        DownsampleConv1d(_conv(), 2, "bilinear")
    with pytest.raises(TypeError, match="nn.Conv1d"):
        DownsampleConv1d(nn.Linear(3, 3), 2)
    with pytest.raises(TypeError, match="restore_length"):
        DownsampleConv1d(_conv(), 2, restore_length="yes")
    with pytest.raises(ValueError, match="batch, channels, length"):
        downsample(torch.zeros(4, 8), 2)
