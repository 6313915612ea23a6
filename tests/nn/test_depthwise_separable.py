"""DepthwiseSeparableConv1d: exact at full rank, best least-squares below it, clear errors."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convmem._metrics import relative_error
from convmem.nn.depthwise_separable import DepthwiseSeparableConv1d

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _conv(in_channels=3, out_channels=5, kernel_size=3, seed=0, **kwargs) -> nn.Conv1d:
    torch.manual_seed(seed)
    return nn.Conv1d(in_channels, out_channels, kernel_size, **kwargs).double()


def _input(channels: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, channels, length, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _assert_exact(conv: nn.Conv1d, length: int) -> None:
    """Full-rank conversion: weight, output and input gradient agree to 1e-10 (float64)."""
    ds = DepthwiseSeparableConv1d.from_conv1d(conv)
    assert ds.depth_multiplier == min(conv.out_channels, conv.kernel_size[0])
    assert relative_error(ds.dense_weight(), conv.weight) < 1e-10
    x = _input(conv.in_channels, length).requires_grad_()
    expected = conv(x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    actual = ds(x)
    (grad_actual,) = torch.autograd.grad(actual.square().sum(), x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-10
    assert relative_error(grad_actual, grad_expected) < 1e-10


@pytest.mark.parametrize("kernel_size", range(1, 32))
def test_full_rank_is_exact_for_every_kernel_size(kernel_size):
    # out_channels 4 < kernel_size from 5 on: the exact rank is min(out, k), not k.
    conv = _conv(3, 4, kernel_size, seed=kernel_size, padding=kernel_size // 2)
    _assert_exact(conv, length=37)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # PyTorch's note on its own copy
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_full_rank_is_exact_for_strides_dilations_paddings(padding_mode):
    for kernel_size, stride, dilation, padding, bias in itertools.product(
        (2, 3, 5), (1, 2, 3), (1, 2, 3), (0, 2, "same", "valid"), (True, False)
    ):
        if padding == "same" and stride > 1:
            continue  # nn.Conv1d itself rejects it; see test_same_padding_with_stride_is_rejected
        conv = _conv(2, 3, kernel_size, stride=stride, dilation=dilation, padding=padding, bias=bias,
                     padding_mode=padding_mode)
        # 19: prime, not a multiple of any stride, longer than every reflect padding.
        _assert_exact(conv, length=19)


@settings(max_examples=40, deadline=None)
@given(
    in_channels=st.integers(1, 6),
    out_channels=st.integers(1, 6),
    kernel_size=st.integers(1, 9),
    stride=st.integers(1, 4),
    dilation=st.integers(1, 3),
    padding=st.one_of(st.integers(0, 4), st.sampled_from(["same", "valid"])),
    padding_mode=st.sampled_from(PADDING_MODES),
    bias=st.booleans(),
    length=st.integers(1, 40),
)
def test_full_rank_is_exact_property(in_channels, out_channels, kernel_size, stride, dilation, padding,
                                     padding_mode, bias, length):
    if padding == "same":
        stride = 1
    conv = _conv(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, padding=padding,
                 bias=bias, padding_mode=padding_mode)
    try:
        conv(_input(in_channels, length))
    except RuntimeError:
        assume(False)  # too short for this kernel or padding: PyTorch rejects it for the dense conv too
    _assert_exact(conv, length)


def test_matches_its_dense_weight_when_built_fresh():
    # The reference twin: F.conv1d with dense_weight(), for a module not built from a conv.
    torch.manual_seed(0)
    for padding_mode in PADDING_MODES:
        ds = DepthwiseSeparableConv1d(4, 6, 5, stride=2, padding=3, dilation=2, depth_multiplier=2,
                                      padding_mode=padding_mode).double()
        x = _input(4, 23)
        if padding_mode == "zeros":
            expected = F.conv1d(x, ds.dense_weight(), ds.bias, stride=2, padding=3, dilation=2)
        else:
            expected = F.conv1d(F.pad(x, (3, 3), mode=padding_mode), ds.dense_weight(), ds.bias, stride=2, dilation=2)
        assert relative_error(ds(x), expected) < 1e-12


def test_error_is_the_dropped_singular_values_and_falls_with_rank():
    conv = _conv(6, 8, 7, seed=3, padding=3)
    singular = torch.linalg.svdvals(conv.weight.detach().permute(1, 0, 2))  # (in, min(out, k)) = (6, 7)
    x = _input(6, 400)
    weight_errors, output_errors = [], []
    for rank in range(1, 8):
        ds = DepthwiseSeparableConv1d.from_conv1d(conv, rank)
        assert ds.depth_multiplier == rank
        dropped = singular[:, rank:].square().sum().sqrt() / conv.weight.detach().norm()
        # Eckart-Young: the truncated SVD is the best rank-r fit; its error is exactly what it drops.
        assert relative_error(ds.dense_weight(), conv.weight) == pytest.approx(dropped.item(), rel=1e-9, abs=1e-12)
        weight_errors.append(relative_error(ds.dense_weight(), conv.weight))
        output_errors.append(relative_error(ds(x), conv(x)))
    assert all(a > b for a, b in zip(weight_errors, weight_errors[1:]))
    assert all(a > b for a, b in zip(output_errors, output_errors[1:]))  # white input: follows the weight
    assert output_errors[-1] < 1e-10


def test_rank_above_the_exact_rank_is_clamped():
    conv = _conv(3, 2, 9)
    ds = DepthwiseSeparableConv1d.from_conv1d(conv, rank=50)
    assert ds.depth_multiplier == 2
    assert ds.depthwise.out_channels == 6


def test_parameter_count():
    ds = DepthwiseSeparableConv1d(64, 128, 15, depth_multiplier=2)
    assert sum(p.numel() for p in ds.parameters()) == 64 * 2 * 15 + 128 * 64 * 2 + 128


@pytest.mark.parametrize("rank", [0, -1, 1.5, 2.0, True, "2"])
def test_bad_rank_is_rejected(rank):
    with pytest.raises((TypeError, ValueError), match="rank"):
        DepthwiseSeparableConv1d.from_conv1d(_conv(), rank)


@pytest.mark.parametrize("depth_multiplier", [0, 1.5, None])
def test_bad_depth_multiplier_is_rejected(depth_multiplier):
    with pytest.raises((TypeError, ValueError), match="depth_multiplier"):
        DepthwiseSeparableConv1d(3, 4, 3, depth_multiplier=depth_multiplier)


def test_same_padding_with_stride_is_rejected():
    with pytest.raises(ValueError, match="PyTorch's own nn.Conv1d rejects"):
        DepthwiseSeparableConv1d(3, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("groups", [3, 6])
def test_grouped_convs_are_rejected_with_the_reason(groups):
    conv = nn.Conv1d(6, 12, 3, groups=groups)
    with pytest.raises(ValueError, match=f"groups={groups}"):
        DepthwiseSeparableConv1d.from_conv1d(conv)


def test_only_conv1d_converts():
    with pytest.raises(TypeError, match="Conv1d"):
        DepthwiseSeparableConv1d.from_conv1d(nn.Conv2d(3, 4, 3))


def test_keeps_dtype_mode_and_requires_grad_and_leaves_the_conv_alone():
    conv = nn.Conv1d(3, 4, 5, padding=2).eval()
    conv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    ds = DepthwiseSeparableConv1d.from_conv1d(conv, 2)
    assert ds.depthwise.weight.dtype == torch.float32 and not ds.training
    assert not ds.depthwise.weight.requires_grad and not ds.pointwise.weight.requires_grad
    assert ds.pointwise.bias.requires_grad
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in before.items())


def test_gradcheck():
    ds = DepthwiseSeparableConv1d(2, 3, 3, stride=2, padding=1, depth_multiplier=2, padding_mode="reflect").double()
    x = _input(2, 7).requires_grad_()
    assert torch.autograd.gradcheck(ds, (x,))
