"""convmem.analysis.receptive_field: published receptive fields, layer formulas, verdicts that name the module."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmem import zoo
from convmem.analysis import receptive_field
from convmem.analysis.windows import plan_windows


def _x(channels, length, batch=1):
    return torch.randn(batch, channels, length)


# ---------------------------------------------------------------------------------------- zoo, published


def test_wav2vec2_feature_encoder_layer_norm():
    """wav2vec 2.0 (Baevski et al. 2020): 25 ms receptive field (400 samples at 16 kHz), 20 ms hop (320)."""
    entry = zoo.get("w2v2_fe", norm="layer")
    rf = receptive_field(entry.model, *entry.inputs)
    assert rf.local and rf.probed
    assert (rf.size, rf.stride, rf.period) == (400, Fraction(320), 320)
    assert (rf.left, rf.right) == (0, 399)


def test_wav2vec2_feature_encoder_group_norm_is_not_local():
    entry = zoo.get("w2v2_fe", norm="group", device="meta")
    rf = receptive_field(entry.model, *entry.inputs)
    assert not rf.local
    assert (rf.module, rf.module_type) == ("conv_layers.0.layer_norm", "GroupNorm")
    assert "over the whole time axis" in rf.reason
    assert "'conv_layers.0.layer_norm' (GroupNorm)" in rf.explain()


def test_wavenet_receptive_field():
    """Causal: output t sees inputs t-2062..t. With filter width 2, the receptive field is
    1 + sum of dilations (r9y9's receptive_field_size: (k - 1) * sum(d) + 1 = 2062 for the 24 layers
    with dilations 1..512, 1..512, 1..8) + 1 for the initial causal conv of width 2: 2063."""
    entry = zoo.get("wavenet")
    rf = receptive_field(entry.model, *entry.inputs)
    dilations = [2 ** (i % 10) for i in range(24)]
    assert rf.local and rf.probed
    assert rf.size == 1 + sum(dilations) + 1 == 2063
    assert (rf.left, rf.right, rf.stride, rf.period) == (2062, 0, 1, 1)


def test_convtasnet_names_the_global_layer_norm():
    entry = zoo.get("convtasnet", device="meta")
    rf = receptive_field(entry.model, *entry.inputs)
    assert not rf.local
    assert (rf.module, rf.module_type) == ("separator.norm", "GroupNorm")
    assert "gLN" in rf.reason


def test_tcn_and_hifigan():
    tcn = zoo.get("tcn", device="meta")
    rf = receptive_field(tcn.model, *tcn.inputs)
    assert (rf.left, rf.right) == (510, 510)  # 2 x (1 + 2 + ... + 128) x 2 cycles
    hifigan = zoo.get("hifigan", device="meta")
    rf = receptive_field(hifigan.model, *hifigan.inputs)
    assert rf.local and rf.stride == Fraction(1, 256) and rf.period == 1


@pytest.mark.parametrize("name", ["resnet1d", "conformer_conv", "basenji"])
def test_batch_norm_models(name):
    entry = zoo.get(name, device="meta")
    entry.model.train()
    rf = receptive_field(entry.model, *entry.inputs)
    assert not rf.local and rf.module_type == "BatchNorm1d" and "train mode" in rf.reason
    entry.model.eval()
    rf = receptive_field(entry.model, *entry.inputs)
    if name == "resnet1d":
        assert (rf.module, rf.module_type) == ("pool", "AdaptiveAvgPool1d")
    else:
        assert rf.local


# ------------------------------------------------------------------------------------------ layer formulas


@pytest.mark.parametrize("kernel, stride, dilation, padding", [(1, 1, 1, 0), (3, 1, 1, 1), (7, 3, 2, 4), (15, 4, 8, 0)])
def test_conv1d(kernel, stride, dilation, padding):
    conv = nn.Conv1d(2, 3, kernel, stride=stride, dilation=dilation, padding=padding)
    rf = receptive_field(conv, _x(2, 300))
    assert rf.local and rf.probed
    assert (rf.left, rf.right) == (padding, dilation * (kernel - 1) - padding)
    assert (rf.stride, rf.period, rf.size) == (stride, stride, dilation * (kernel - 1) + 1)


def test_transposed_conv_receptive_field_depends_on_the_phase():
    """Output j of ConvTranspose1d(k=5, stride 2) sums inputs i with 2i + m = j, m in 0..4: three
    inputs for even j, two for odd j. `size` is the largest over phases."""
    conv = nn.ConvTranspose1d(1, 1, 5, stride=2)
    rf = receptive_field(conv, _x(1, 50))
    assert rf.local and rf.stride == Fraction(1, 2) and rf.size == 3
    omap = rf.outputs[0]
    assert omap.needs(10) == (3, 5) and omap.needs(11) == (4, 5)


def test_causal_padding():
    causal = nn.Sequential(nn.ConstantPad1d((6, 0), 0.0), nn.Conv1d(1, 1, 4, dilation=2))
    rf = receptive_field(causal, _x(1, 100))
    assert (rf.left, rf.right, rf.size) == (6, 0, 7)


def test_upsample_and_pool():
    rf = receptive_field(nn.Sequential(nn.Upsample(scale_factor=4), nn.AvgPool1d(2)), _x(1, 40))
    assert rf.local and rf.stride == Fraction(1, 2)
    rf = receptive_field(nn.Upsample(scale_factor=2, mode="linear"), _x(1, 40))
    assert rf.local and rf.probed


def test_alignment_period_is_not_the_stride():
    """A stride-2 conv then a x2 transposed conv: overall stride 1, alignment period 2."""
    module = nn.Sequential(nn.Conv1d(1, 1, 3, stride=2, padding=1), nn.ConvTranspose1d(1, 1, 4, stride=2, padding=1))
    rf = receptive_field(module, _x(1, 64))
    assert (rf.stride, rf.period) == (1, 2)


class _ChannelsLast(nn.Module):
    """Linear and LayerNorm over channels on (batch, time, channels): local per time step."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(self.norm(self.conv(x).transpose(1, 2))).transpose(1, 2)


def test_per_time_step_layers_are_local():
    rf = receptive_field(_ChannelsLast(), _x(4, 64))
    assert rf.local and rf.probed and (rf.left, rf.right) == (1, 1)


def test_input_of_shape_batch_samples():
    module = nn.Sequential(_Unsqueeze(), nn.Conv1d(1, 2, 10, stride=5))
    rf = receptive_field(module, torch.randn(2, 1000))
    assert (rf.size, rf.stride) == (10, 5)


class _Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


# ----------------------------------------------------------------------------------------------- verdicts


class _Attention(nn.Module):
    def forward(self, x):
        return torch.softmax(x.transpose(1, 2) @ x, dim=-1) @ x.transpose(1, 2)


class _Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "module, module_name, reason",
    [
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.BatchNorm1d(2)), "1", "train mode"),
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.GroupNorm(2, 2)), "1", "GroupNorm normalizes"),
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.InstanceNorm1d(2)), "1", "InstanceNorm"),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), "", "circular"),
        (_Functional(lambda x: F.pad(x, (1, 1), mode="circular")), "", "circular"),
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.AdaptiveAvgPool1d(4)), "1", "adaptive"),
        (_Functional(lambda x: x - x.mean(-1, keepdim=True)), "", "reduction over the time axis"),
        (_Functional(lambda x: x.cumsum(-1)), "", "cumulative sum"),
        (_Attention(), "", "attention"),
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.Dropout(0.5)), "1", "Dropout"),
        (_Functional(lambda x: F.interpolate(x, size=64)), "", "fixed output size"),
        (_Functional(lambda x: x + torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)), "", "positional encoding"),
        (_Functional(lambda x: x - x[..., -1:]), "", "changes with the length"),
        (_Functional(lambda x: torch.fft.rfft(x, dim=1).abs()), "", "not understood by the length analysis"),
    ],
)
def test_not_local_names_the_module_and_the_reason(module, module_name, reason):
    rf = receptive_field(module.train(), _x(2, 48))
    assert not rf.local
    assert rf.module == module_name
    assert reason in rf.reason


def test_recurrent_and_attention_layers():
    lstm = receptive_field(nn.LSTM(3, 3, batch_first=True), torch.randn(1, 20, 3), length_axis=1)
    assert not lstm.local and lstm.module_type == "LSTM" and "recurrent" in lstm.reason
    mha = nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(1, 20, 4)
    rf = receptive_field(mha, x, x, x, length_axis=1)
    assert not rf.local and rf.module_type == "MultiheadAttention"


def test_the_module_is_left_as_it_was():
    module = nn.Sequential(nn.Conv1d(2, 2, 3), nn.BatchNorm1d(2)).eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rf = receptive_field(module, _x(2, 64))
    assert rf.local and rf.probed
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in module.parameters())


# ------------------------------------------------------------------------------------------------ windows


def test_windows_of_the_docstring_example():
    module = nn.Conv1d(1, 1, 5, padding=2)
    rf = receptive_field(module, _x(1, 10))
    windows = plan_windows(rf, 10, 4)
    assert [(w.start, w.stop) for w in windows] == [(0, 6), (2, 10), (6, 10)]
    assert [w.crops[0][1:] for w in windows] == [(0, 4), (4, 4), (8, 2)]


def test_long_windows_are_multiples_of_eight_samples():
    """NOTE [Aligned windows]: tcn's 510-sample halos would make its end windows 8,702 samples long."""
    stack = nn.Sequential(*(nn.Conv1d(1, 1, 3, dilation=d, padding=d) for d in (1, 2, 4, 8, 16, 32, 64, 128)))
    rf = receptive_field(stack, _x(1, 4096))
    assert (rf.left, rf.right) == (255, 255)
    windows = plan_windows(rf, 65531, 8192)
    assert all((w.stop - w.start) % 8 == 0 for w in windows)
    assert windows[0].start == 0 and windows[-1].stop == 65531
    covered = [(w.crops[0][1], w.crops[0][1] + w.crops[0][2]) for w in windows]
    assert covered == [(k * 8192, min(65531, (k + 1) * 8192)) for k in range(8)]
    for w in windows:  # every kept output still has its whole receptive field inside the window
        offset, first, count = w.crops[0]
        assert first - offset == w.start and w.start <= max(0, first - 255)
        assert w.stop >= min(65531, first + count + 255)


def test_reflect_padding_at_the_ends_reads_inwards():
    """NOTE [Edge reads]: output 0 of a reflect-padded conv reads inputs up to its padding."""
    conv = nn.Conv1d(1, 1, 15, dilation=7, padding=87, padding_mode="reflect", stride=2)
    rf = receptive_field(conv, _x(1, 200))
    assert rf.local and rf.probed
    first = plan_windows(rf, 200, 2)[0]
    assert first.start == 0 and first.stop >= 88
