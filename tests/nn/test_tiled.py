"""convmem.nn.Tiled: outputs and every gradient equal the untiled module (float64, relative error < 1e-10).

Property-based over random Conv1d stacks (DESIGN.md "Exact length tiling" and its pitfalls): kernel
1..15, stride 1..4, dilation 1..8, padding modes zeros/reflect/replicate, groups, ConvTranspose1d
(upsampling), causal padding (left pad and right chomp), residual and skip branches, a down/up
branch whose alignment period differs from its stride, pooling, custom pointwise activations with
parameters, weight-norm parametrizations, LayerNorm over channels, 2-D (batch, samples) inputs;
lengths from 1 to a few thousand, tile lengths from 1, rarely dividing the length; forward windows
of the tile length, longer, or the default; backward batch chunks of 1, 2 or the whole batch.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from _compare import assert_same_step, twin
from convmem._metrics import relative_error
from convmem.analysis import receptive_field
from convmem.analysis.receptive_field import analyse, smallest_valid_length
from convmem.nn._wrapper import ModuleWrapper, restore_
from convmem.nn.tiled import Tiled

TOL = 1e-10
# ~15 s on one CPU core; CONVMEM_TILING_EXAMPLES=20000 for a soak run.
EXAMPLES = int(os.environ.get("CONVMEM_TILING_EXAMPLES", "1000"))
PADDING_MODES = ("zeros", "reflect", "replicate")


# ------------------------------------------------------------------------------------ building blocks


class Snake(nn.Module):
    """BigVGAN's periodic activation x + sin(a x)^2 / a, a learnable per channel: a custom pointwise op."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(channels, 1) + 0.5)

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / self.alpha


class Residual(nn.Module):
    """x + body(x) (body keeps the length)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Skip(nn.Module):
    """Two parallel branches summed, a skip branch as in WaveNet's skip connections."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + F.leaky_relu(self.b(x), 0.2)


class DownUp(nn.Module):
    """x + up(down(x)) cropped to x's length: overall stride 1, alignment period 2 (a U-Net level)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.down = nn.Conv1d(channels, channels, kernel, stride=2, padding=kernel // 2)
        self.up = nn.ConvTranspose1d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x):
        return x + self.up(torch.tanh(self.down(x)))[..., : x.shape[-1]]


class Chomp(nn.Module):
    """Causal conv as in Bai et al.'s TCN: pad both sides, cut the right end off."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.chomp = dilation * (kernel - 1)
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, padding=self.chomp)

    def forward(self, x):
        y = self.conv(x)
        return y[:, :, : y.shape[-1] - self.chomp].contiguous() if self.chomp else y


class ChannelNorm(nn.Module):
    """LayerNorm over channels per time step. Random affine parameters: with the defaults (1, 0) the
    mean-square loss of a normalized output hardly depends on the input, and its gradient is rounding."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        nn.init.uniform_(self.norm.bias, -1.0, 1.0)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class AddChannel(nn.Module):
    """(batch, samples) -> (batch, 1, samples), as wav2vec 2.0's encoder takes raw audio."""

    def forward(self, x):
        return x.unsqueeze(1)


@st.composite
def conv_layer(draw, cin: int, same_length: bool = False):
    cout = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if cin % g == 0 and cout % g == 0]))
    kernel = draw(st.integers(1, 15))
    dilation = draw(st.integers(1, 8))
    extent = dilation * (kernel - 1)
    if same_length:
        kernel = kernel | 1
        extent = dilation * (kernel - 1)
        stride, padding, cout = 1, extent // 2, cin
        groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if cin % g == 0]))
    else:
        stride = draw(st.integers(1, 4))
        padding = draw(st.integers(0, extent))
    mode = draw(st.sampled_from(PADDING_MODES))
    conv = nn.Conv1d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=draw(st.booleans()), padding_mode=mode)
    # Weight-norm directions whose reference gradient is zero by symmetry, so that any rounding is an O(1)
    # relative error: a norm of size one, or one input channel per group whose taps all see the whole
    # input through zero padding (on an input no longer than the dilation, the loss's Gram matrix over
    # the taps is then |x|^2 I, and the gradient is parallel to the weight).
    if draw(st.integers(0, 5)) == 0 and (cin // groups > 1 or padding < extent):
        conv = weight_norm(conv)
    return conv, cout, stride


@st.composite
def stacks(draw):
    """(module, input channels or None for a (batch, samples) input)."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))  # weights drawn like the rest: failures replay
    two_d = draw(st.integers(0, 7)) == 0
    cin = 1 if two_d else draw(st.integers(1, 4))
    layers = [AddChannel()] if two_d else []
    channels, total_stride = cin, 1
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(
            ["conv", "conv", "transposed", "causal", "chomp", "residual", "skip", "pool", "downup", "snake", "norm"]
        ))
        if kind == "conv":
            layer, channels_out, stride = draw(conv_layer(channels))
            if total_stride * stride > 8:
                layer, channels_out, stride = draw(conv_layer(channels, same_length=True))
            total_stride *= stride
        elif kind == "transposed":
            channels_out = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and channels_out % g == 0]))
            kernel, stride, dilation = draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
            padding = draw(st.integers(0, dilation * (kernel - 1)))
            output_padding = draw(st.integers(0, max(stride, dilation) - 1))
            layer = nn.ConvTranspose1d(channels, channels_out, kernel, stride=stride, padding=padding,
                                       output_padding=output_padding, dilation=dilation, groups=groups)
        elif kind == "causal":
            kernel, dilation = draw(st.integers(1, 15)), draw(st.integers(1, 8))
            channels_out = draw(st.integers(1, 4))
            layer = nn.Sequential(nn.ConstantPad1d((dilation * (kernel - 1), 0), 0.0),
                                  nn.Conv1d(channels, channels_out, kernel, dilation=dilation))
        elif kind == "chomp":
            channels_out = draw(st.integers(1, 4))
            layer = Chomp(channels, channels_out, draw(st.integers(1, 15)), draw(st.integers(1, 8)))
        elif kind == "residual":
            conv, _, _ = draw(conv_layer(channels, same_length=True))
            layer, channels_out = Residual(nn.Sequential(conv, nn.GELU(), nn.Conv1d(channels, channels, 1))), channels
        elif kind == "skip":
            a, _, _ = draw(conv_layer(channels, same_length=True))
            b, _, _ = draw(conv_layer(channels, same_length=True))
            layer, channels_out = Skip(a, b), channels
        elif kind == "pool":
            kernel = draw(st.integers(1, 4))
            stride = draw(st.integers(1, 3)) if total_stride * 3 <= 8 else 1
            total_stride *= stride
            padding = draw(st.integers(0, kernel // 2))
            layer = (nn.MaxPool1d(kernel, stride, padding, ceil_mode=draw(st.booleans())) if draw(st.booleans())
                     else nn.AvgPool1d(kernel, stride, padding, count_include_pad=draw(st.booleans())))
            channels_out = channels
        elif kind == "downup":
            layer, channels_out = DownUp(channels, draw(st.sampled_from([1, 3, 5]))), channels
        elif kind == "snake":
            layer, channels_out = Snake(channels), channels
        elif channels > 2:  # over one or two channels a LayerNorm outputs +-1 (times its affine): its
            layer, channels_out = ChannelNorm(channels), channels  # input gradients are rounding noise
        else:
            layer, channels_out = nn.SiLU(), channels
        layers.append(layer)
        channels = channels_out
    return nn.Sequential(*layers), (None if two_d else cin)


def _input(batch: int, channels, length: int, generator=None) -> torch.Tensor:
    shape = (batch, length) if channels is None else (batch, channels, length)
    return torch.randn(shape, dtype=torch.float64, generator=generator)


# ------------------------------------------------------------------------------------------- properties


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_stack_tiled_equals_untiled(data):
    module, channels = data.draw(stacks())
    module = module.double()
    example = _input(1, channels, 4096)
    rf = analyse(module, example, (), {}, -1)
    assert rf.local, rf.explain()
    shortest = smallest_valid_length(rf, 4096)
    length = data.draw(st.one_of(
        st.integers(shortest, shortest + 40), st.integers(shortest, shortest + 400), st.integers(shortest, 3000)
    ))
    tile = data.draw(st.one_of(st.just(1), st.integers(1, 16), st.integers(1, length + 8)))
    tile = max(tile, rf.period, math.ceil(length / 24))  # <= 24 tiles keeps the examples within CI time
    batch = data.draw(st.integers(1, 3))
    x = _input(batch, channels, length, torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))))
    forward_tile = data.draw(st.one_of(st.none(), st.just(tile), st.integers(tile, tile + 2 * length + 8)))
    tiled = Tiled(twin(module), tile, forward_tile_length=forward_tile, batch_chunk=data.draw(st.sampled_from([None, 1, 2])))
    assert_same_step(module, tiled, (x,), tol=TOL)
    assert tiled.last_windows >= 1


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_a_chomp_after_a_pool_is_not_cut_to_an_earlier_tensors_length(kernel):
    # Found by the property above: traced at an even length, DownUp's stride-2 conv output and the
    # stride-2 pool's output have the same length, and the chomp's cut was taken for a cut to the
    # first of them; at odd lengths they differ (the analysis predicted 2 outputs for 3 inputs).
    module = nn.Sequential(DownUp(1, kernel), nn.AvgPool1d(4, 2, 1), Chomp(1, 1, 2, 1)).double()
    rf = analyse(module, _input(1, 1, 4096), (), {}, -1)
    for length in (3, 5, 77):
        assert rf.output_lengths(length) == [module(_input(1, 1, length)).shape[-1]]
        x = _input(2, 1, length, torch.Generator().manual_seed(length))
        assert_same_step(module, Tiled(twin(module), max(2, rf.period)), (x,), tol=TOL)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_circular_padding_is_refused(data):
    """Circular padding wraps the ends onto each other: refused, though the middle probes as local."""
    module, channels = data.draw(stacks())
    cin = 1 if channels is None else channels
    kernel = data.draw(st.integers(2, 15))
    circular = nn.Conv1d(cin, cin, kernel, padding=data.draw(st.integers(1, kernel - 1)), padding_mode="circular")
    layers = list(module)
    layers.insert(data.draw(st.integers(1 if channels is None else 0, len(layers))), circular)
    with pytest.raises(ValueError, match="circular"):
        Tiled(nn.Sequential(*layers).double(), 16)


# -------------------------------------------------------------------------------------------- examples


def test_matches_untiled_on_a_strided_then_upsampled_stack():
    """Stride 2 then a x2 transposed conv: overall stride 1, period 2 (DESIGN.md pitfall)."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv1d(3, 8, 5, stride=2, padding=2, padding_mode="reflect"), nn.GELU(),
        nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1),
        nn.Conv1d(8, 4, 3, dilation=3, padding=3, padding_mode="replicate"),
    ).double()
    rf = receptive_field(module, _input(1, 3, 200))
    assert (rf.stride, rf.period, rf.probed) == (1, 2, True)
    tiled = Tiled(twin(module), 100)
    assert_same_step(module, tiled, (_input(2, 3, 1001),), tol=TOL)
    assert tiled.last_windows == 11


def test_gradcheck_on_a_tiny_input():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2)).double()
    tiled = Tiled(module, 2)
    x = _input(1, 2, 11).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: tiled(t), (x,))
    assert tiled.last_windows > 1


def test_upsampling_by_256_like_hifigan():
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv1d(4, 8, 7, padding=3),
        nn.ConvTranspose1d(8, 4, 16, stride=8, padding=4), nn.LeakyReLU(0.1),
        nn.Conv1d(4, 4, 7, dilation=3, padding=9),
        nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1), nn.Conv1d(2, 1, 7, padding=3), nn.Tanh(),
    ).double()
    rf = receptive_field(module, _input(1, 4, 40))
    assert rf.stride == pytest.approx(1 / 16)
    tiled = Tiled(twin(module), 3)
    assert_same_step(module, tiled, (_input(2, 4, 37),), tol=TOL)


class _Conditioned(nn.Module):
    """forward(x, cond, scale=...): a tensor argument without a time axis and a float pass through."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 5, padding=2)
        self.proj = nn.Linear(6, 3)

    def forward(self, x, cond, scale=1.0):
        return torch.tanh(self.conv(x) * scale + self.proj(cond).unsqueeze(-1))


def test_extra_arguments_pass_through_with_their_gradients():
    torch.manual_seed(0)
    module = _Conditioned().double()
    x, cond = _input(2, 3, 300), torch.randn(2, 6, dtype=torch.float64)
    tiled = Tiled(twin(module), 64)
    assert_same_step(module, tiled, (x, cond, 0.5), tol=TOL)
    assert tiled.last_windows == 5


class _TwoOutputs(nn.Module):
    """(residual, skip) at two rates: a WaveNet layer's outputs, the skip downsampled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.skip = nn.Conv1d(2, 3, 4, stride=2, padding=1)

    def forward(self, x):
        h = torch.sigmoid(self.conv(x))
        return {"residual": x + h, "skip": self.skip(h)}


def test_several_outputs_at_different_rates():
    torch.manual_seed(0)
    module = _TwoOutputs().double()
    tiled = Tiled(twin(module), 10)
    assert_same_step(module, tiled, (_input(2, 2, 95),), tol=TOL)
    assert tiled.last_windows == 10


def test_input_shorter_than_one_tile_runs_untiled():
    module = nn.Conv1d(2, 2, 3, padding=1).double()
    tiled = Tiled(twin(module), 1000)
    assert_same_step(module, tiled, (_input(2, 2, 17),), tol=TOL)
    assert tiled.last_windows == 1


def test_length_one_input():
    module = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.GELU(), nn.Conv1d(2, 2, 1)).double()
    tiled = Tiled(twin(module), 1)
    assert_same_step(module, tiled, (_input(3, 2, 1),), tol=TOL)


def test_inference_without_grad_and_non_contiguous_input():
    module = nn.Sequential(nn.Conv1d(4, 4, 5, padding=2, padding_mode="reflect"), nn.ReLU()).double()
    x = _input(2, 200, 4).transpose(1, 2)  # (2, 4, 200), time not the fastest axis
    with torch.no_grad():
        expected = module(x)
        actual = Tiled(module, 32)(x)
    assert relative_error(actual, expected) < TOL


def test_eval_mode_batch_norm_is_local_and_train_mode_is_refused():
    module = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU()).double()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*train mode"):
        Tiled(module, 8)
    module.eval()
    tiled = Tiled(twin(module), 8)
    assert_same_step(module, tiled, (_input(2, 2, 50),), tol=TOL)
    tiled.train()  # switched to train mode after wrapping: refused at the next call
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        tiled(_input(2, 2, 50))


def test_active_dropout_is_refused_and_inactive_dropout_is_fine():
    module = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.Dropout(0.1)).double()
    with pytest.raises(ValueError, match="Dropout"):
        Tiled(module, 8)
    module.eval()
    tiled = Tiled(module, 8)
    with torch.no_grad():
        x = _input(1, 2, 40)
        assert relative_error(tiled(x), module(x)) < TOL


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.2, self.training)


def test_functional_dropout_is_refused_at_the_first_call():
    tiled = Tiled(_FunctionalDropout().double(), 8)
    with pytest.raises(ValueError, match="random op"):
        tiled(_input(1, 2, 40))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("tile_length", [0, -3, 2.5, "64", True])
def test_bad_tile_length(tile_length):
    with pytest.raises(ValueError, match="tile_length must be a positive integer"):
        Tiled(nn.Conv1d(1, 1, 3), tile_length)


def test_tile_shorter_than_the_alignment_period():
    module = nn.Sequential(nn.Conv1d(1, 4, 10, stride=5), nn.Conv1d(4, 4, 3, stride=2)).double()
    tiled = Tiled(module, 7)
    with pytest.raises(ValueError, match="shorter than its alignment period of 10"):
        tiled(_input(1, 1, 400))


class _GlobalMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y - y.mean(-1, keepdim=True)


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.GroupNorm(1, 2)), r"'1' \(GroupNorm\).*gLN"),
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.InstanceNorm1d(2)), r"InstanceNorm1d"),
        (nn.LSTM(2, 2), r"recurrent"),
        (nn.Sequential(nn.Conv1d(2, 2, 3), nn.AdaptiveAvgPool1d(1)), r"adaptive"),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), r"the module itself \(Conv1d\).*circular"),
    ],
)
def test_non_local_modules_are_refused_naming_the_module(module, match):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        Tiled(module, 8)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())  # the model untouched


def test_functional_non_locality_is_refused_at_the_first_call():
    module = _GlobalMean().double()
    tiled = Tiled(module, 8)
    with pytest.raises(ValueError, match=r"cannot tile _GlobalMean.*reduction over the time axis"):
        tiled(_input(1, 2, 40))


def test_functional_circular_pad_is_refused():
    class Wrap(nn.Module):
        def forward(self, x):
            return F.pad(x, (2, 2), mode="circular")

    with pytest.raises(ValueError, match="circular padding"):
        Tiled(Wrap(), 8)(_input(1, 2, 40))


def test_warn_mode_runs_untiled():
    tiled = Tiled(_GlobalMean().double(), 8, on_refuse="warn")
    x = _input(1, 2, 40)
    with pytest.warns(UserWarning, match="runs untiled"):
        y = tiled(x)
    assert relative_error(y, tiled.wrapped(x)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per signature
        tiled(x)


# --------------------------------------------------------------------------------------- composition


def test_state_dict_keys_unchanged_and_restore():
    module = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.GELU())
    outer = nn.Sequential(Tiled(twin(module), 8))
    assert list(outer.state_dict()) == ["0." + k for k in module.state_dict()]
    assert not any(isinstance(m, Tiled) for m in restore_(outer).modules())


def test_composes_with_torch_checkpoint():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.GELU(), nn.Conv1d(4, 2, 3, padding=1)).double()

    class Checkpointed(ModuleWrapper):  # what convmem.checkpoint_ puts in
        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.wrapped, x, use_reentrant=False)

    reference = nn.Sequential(twin(block), nn.Conv1d(2, 2, 1).double())
    optimized = twin(reference)
    optimized[0] = Checkpointed(Tiled(optimized[0], 16))
    assert_same_step(reference, optimized, (_input(2, 2, 100),), tol=TOL)


def _assert_same_bf16_step(untiled: nn.Module, tiled: nn.Module, x: torch.Tensor) -> None:
    """One step of each under CPU bfloat16 autocast: bfloat16 outputs, and outputs and parameter
    gradients as close as bf16 rounding of different blockings allows (same ops, shorter inputs)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = untiled(x), tiled(x)
        assert actual.dtype == expected.dtype == torch.bfloat16
    actual.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert relative_error(actual, expected) < 2e-2
    for (name, p), q in zip(untiled.named_parameters(), tiled.parameters()):
        assert relative_error(q.grad, p.grad) < 5e-2, name


def test_autocast_bfloat16_matches_untiled_autocast():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.GELU(), nn.Conv1d(8, 4, 3, padding=1))
    _assert_same_bf16_step(module, Tiled(twin(module), 64), torch.randn(2, 4, 300))


def test_autocast_with_a_low_precision_input_from_the_layer_before():
    # Under autocast a tiled block after a conv gets a bfloat16 input while its weights are float32:
    # the analysis, probe and verification run in the weights' precision (`analysis_dtype`), not
    # refusing the block for a dtype mismatch that autocast itself never has.
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv1d(8, 8, 5, padding=2), nn.GELU(), nn.Conv1d(8, 8, 3, padding=1))
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), block)
    tiled = twin(model)
    tiled[1] = Tiled(tiled[1], 64)
    _assert_same_bf16_step(model, tiled, torch.randn(2, 4, 300))


def test_meta_device_runs_without_verification():
    module = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.GELU()).to("meta")
    tiled = Tiled(module, 16)
    x = torch.empty(2, 2, 100, device="meta", requires_grad=True)
    y = tiled(x)
    y.sum().backward()
    assert y.shape == (2, 2, 100) and x.grad.shape == x.shape and tiled.last_windows == 7


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    """NOTE [Tiling under torch.compile]: a fresh Tiled analyses eagerly inside a compiled model."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    block = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.GELU(), nn.Conv1d(8, 4, 3, padding=1))
    reference = nn.Sequential(nn.Conv1d(2, 4, 1), block, nn.Conv1d(4, 1, 1)).double()
    optimized = twin(reference)
    optimized[1] = Tiled(optimized[1], 64)
    optimized.compile(backend=backend)  # in place: state_dict keys unchanged
    assert_same_step(reference, optimized, (_input(2, 2, 500),), tol=TOL)
    assert optimized[1].last_windows == 8


class _ChannelsLastConv(nn.Module):
    """x: (batch, length, channels), as Conformer blocks take it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 5, padding=2)
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(torch.relu(self.conv(x.transpose(1, 2)).transpose(1, 2)))


def test_length_axis_and_an_input_that_needs_no_grad():
    torch.manual_seed(0)
    module = _ChannelsLastConv().double()
    tiled = Tiled(twin(module), 16, length_axis=1)
    x = torch.randn(2, 100, 3, dtype=torch.float64)  # no requires_grad: parameter gradients only
    module(x).square().sum().backward()
    y = tiled(x)
    y.square().sum().backward()
    assert relative_error(y, module(x)) < TOL and tiled.last_windows == 7
    for (name, p), q in zip(module.named_parameters(), tiled.wrapped.parameters()):
        assert relative_error(q.grad, p.grad) < TOL, name


def test_distributed_data_parallel(tmp_path):
    """Parameter gradients reach DDP's hooks once per backward (the parameters are Function inputs)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.GELU(), nn.Conv1d(4, 2, 3, padding=1)).double()
        ddp = nn.parallel.DistributedDataParallel(Tiled(twin(reference), 32))
        x = _input(2, 2, 200)
        reference(x).square().mean().backward()
        ddp(x).square().mean().backward()
        assert ddp.module.last_windows == 7
        for p, q in zip(reference.parameters(), ddp.module.wrapped.parameters()):
            assert relative_error(q.grad, p.grad) < TOL
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------ forward windows and batch chunks


def _deep_stack(channels: int = 3, blocks: int = 4) -> nn.Module:
    """Residual dilated blocks, enough layers with parameters for the default forward multiple > 1."""
    layers = [nn.Conv1d(2, channels, 1)]
    for i in range(blocks):
        layers.append(Residual(nn.Sequential(nn.Conv1d(channels, channels, 3, dilation=2 ** i, padding=2 ** i),
                                             nn.GELU(), nn.Conv1d(channels, channels, 1))))
    layers.append(nn.Conv1d(channels, 2, 3, padding=1, padding_mode="reflect"))
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("forward_tile_length", [None, 16, 48, 100, 10_000])
def test_forward_windows_differ_from_backward_windows(forward_tile_length):
    """NOTE [Forward windows]: forward in windows of any size >= tile_length, backward in tiles; exact."""
    torch.manual_seed(0)
    module = _deep_stack()
    tiled = Tiled(twin(module), 16, forward_tile_length=forward_tile_length)
    assert_same_step(module, tiled, (_input(3, 2, 301),), tol=TOL)
    assert tiled.last_windows == 19
    expected = {None: 10, 16: 19, 48: 7, 100: 4, 10_000: 1}[forward_tile_length]  # default: 10 layers // 4 = x2
    assert tiled.last_forward_windows == expected
    with torch.no_grad():  # inference runs forward windows (one: untiled)
        x = _input(3, 2, 301)
        assert relative_error(tiled(x), module(x)) < TOL


@pytest.mark.parametrize("batch_chunk", [1, 2, 3, 5, 100])
def test_batch_chunks_match_untiled(batch_chunk):
    """NOTE [Batch chunks]: chunks of 1, of a non-divisor of the batch, of the whole batch and more."""
    torch.manual_seed(0)
    module = _deep_stack()
    tiled = Tiled(twin(module), 32, batch_chunk=batch_chunk)
    assert_same_step(module, tiled, (_input(5, 2, 203),), tol=TOL)
    assert tiled.last_windows == 7


def test_batch_chunks_with_one_window_and_several_outputs():
    """A tile longer than the input still splits the batch; outputs at two rates are chunked alike."""
    torch.manual_seed(0)
    module = _TwoOutputs().double()
    tiled = Tiled(twin(module), 1000, batch_chunk=2, forward_tile_length=4000)
    assert_same_step(module, tiled, (_input(3, 2, 95),), tol=TOL)
    assert tiled.last_windows == tiled.last_forward_windows == 1
    tiled = Tiled(twin(module), 10, batch_chunk=1)
    assert_same_step(module, tiled, (_input(3, 2, 95),), tol=TOL)


def test_batch_chunks_gradcheck_and_input_without_grad():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2)).double()
    tiled = Tiled(module, 4, batch_chunk=1, forward_tile_length=8)
    x = _input(3, 2, 13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: tiled(t), (x,))
    reference = _ChannelsLastConv().double()
    tiled = Tiled(twin(reference), 16, length_axis=1, batch_chunk=1)
    x = torch.randn(3, 100, 3, dtype=torch.float64)  # parameter gradients only
    reference(x).square().sum().backward()
    tiled(x).square().sum().backward()
    for (name, p), q in zip(reference.named_parameters(), tiled.wrapped.parameters()):
        assert relative_error(q.grad, p.grad) < TOL, name


class _BatchCoupled(nn.Module):
    """Subtracts the batch mean: local in time, but the samples of a batch depend on each other."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y - y.mean(0, keepdim=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_coupling_refuses_batch_chunks(batch):
    """Verification runs two different samples together and apart (the time-reversed first when batch is 1)."""
    module = _BatchCoupled().double()
    x = _input(batch, 2, 60)
    with torch.no_grad():
        assert relative_error(Tiled(twin(module), 8)(x), module(x)) < TOL  # tiling alone is fine
    with pytest.raises(ValueError, match="couples the samples"):
        Tiled(twin(module), 8, batch_chunk=1)(x)


def test_batch_chunks_need_a_batch_axis_and_no_other_tensor():
    module = _Conditioned().double()
    x, cond = _input(2, 3, 300), torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_chunk=1 cannot split the batch: the module takes other tensor"):
        Tiled(twin(module), 64, batch_chunk=1)(x, cond)
    tiled = Tiled(twin(module), 64, batch_chunk=1, on_refuse="warn")
    with pytest.warns(UserWarning, match="backward recomputes the whole batch"):
        assert_same_step(module, tiled, (x, cond, 0.5), tol=TOL)
    with pytest.raises(ValueError, match="no batch axis 0"):  # (samples,): time on axis 0
        Tiled(Snake(1).double(), 8, batch_chunk=1)(torch.randn(40, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_chunk": 0}, "batch_chunk must be None or a positive integer"),
    ({"batch_chunk": 1.5}, "batch_chunk must be None or a positive integer"),
    ({"batch_chunk": True}, "batch_chunk must be None or a positive integer"),
    ({"forward_tile_length": 0}, "forward_tile_length must be None or a positive integer"),
    ({"forward_tile_length": "big"}, "forward_tile_length must be None or a positive integer"),
    ({"forward_tile_length": 8}, "forward_tile_length 8 is shorter than tile_length 16"),
])
def test_bad_forward_tile_length_and_batch_chunk(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tiled(nn.Conv1d(1, 1, 3), 16, **kwargs)


def test_plans_are_cached_per_length_and_batch():
    module = _deep_stack()
    tiled = Tiled(module, 16, batch_chunk=2)
    with torch.no_grad():
        for batch, length in ((3, 100), (3, 100), (1, 100), (3, 120)):
            tiled(_input(batch, 2, length))
    assert len(tiled._plans) == 3 and len(tiled._fields) == 1
    assert "forward_tile_length" not in repr(tiled) and "batch_chunk=2" in repr(tiled)


@pytest.mark.parametrize("batch_chunk", [None, 1])
def test_empty_batch(batch_chunk):
    module = _deep_stack()
    tiled = Tiled(twin(module), 16, batch_chunk=batch_chunk)
    tiled(_input(2, 2, 60))  # analysed on a real batch
    x = _input(0, 2, 60).requires_grad_(True)
    tiled(x).square().sum().backward()
    assert x.grad.shape == x.shape and tiled.last_windows == 4


def test_a_used_tiled_module_pickles_and_copies():
    # torch.save(model) pickles the whole module: the per-signature analyses hold closures of the
    # length analysis and are left out (made again at the first call); a deep copy keeps them.
    import copy
    import io

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.GELU(), nn.Conv1d(4, 2, 3, padding=1)).double()
    tiled = Tiled(copy.deepcopy(block), 64)
    x = torch.randn(2, 2, 300, dtype=torch.float64)
    tiled(x).sum().backward()
    assert tiled._fields
    buffer = io.BytesIO()
    torch.save(tiled, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not loaded._fields and loaded.tile_length == 64
    assert relative_error(loaded(x), block(x)) < TOL
    copied = copy.deepcopy(tiled)
    assert copied._fields and copied.wrapped is not tiled.wrapped
    assert relative_error(copied(x), block(x)) < TOL
