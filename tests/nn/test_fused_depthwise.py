"""FusedDepthwiseConv1d: the conv's numbers and state_dict, less kept for backward."""
from __future__ import annotations

import os

# The fused kernels run in Triton's interpreter on the CPU (see tests/kernels/conftest.py); set
# while pytest collects, before the kernels are first defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _compare import assert_same_step, twin  # noqa: E402
from convmem._metrics import relative_error  # noqa: E402
from convmem.kernels.depthwise import triton_available  # noqa: E402
from convmem.nn import DepthwiseSeparableConv1d, FusedActivation, FusedDepthwiseConv1d, restore_  # noqa: E402
from convmem.nn.fused_depthwise import fusable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _x(channels=4, length=29, batch=2):
    return torch.randn(batch, channels, length, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "kwargs, act",
    [
        (dict(kernel_size=3, padding=1), None),
        (dict(kernel_size=4, padding="same", dilation=2), nn.SiLU()),
        (dict(kernel_size=5, stride=2, padding=2, bias=False), nn.GELU()),
        (dict(kernel_size=31, padding=15), nn.ReLU()),
        (dict(kernel_size=3, padding="valid", out_channels=8), None),
    ],
)
def test_from_conv1d_is_exact(kwargs, act):
    kwargs = dict(kwargs)
    out_channels = kwargs.pop("out_channels", 4)
    torch.manual_seed(0)
    conv = nn.Conv1d(4, out_channels, groups=4, **kwargs).double()
    reference = nn.Sequential(conv, act) if act is not None else nn.Sequential(conv)
    fused = twin(reference)
    name = {nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU: "relu"}.get(type(act))
    fused[0] = FusedDepthwiseConv1d.from_conv1d(fused[0], name)
    if act is not None:
        fused[1] = FusedActivation(fused[1])
    assert_same_step(reference, fused, [_x()])
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert isinstance(restore_(fused)[0], nn.Conv1d)
    assert_same_step(reference, fused, [_x()])


def test_shares_parameters_and_reads_attributes_through():
    conv = nn.Conv1d(6, 6, 7, stride=2, padding=3, dilation=1, groups=6)
    fused = FusedDepthwiseConv1d.from_conv1d(conv, "gelu")
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert (fused.in_channels, fused.out_channels, fused.kernel_size, fused.stride, fused.padding) == (6, 6, (7,), (2,), (3,))
    assert fused.groups == 6 and fused.depth_multiplier == 1 and fused.padding_mode == "zeros"
    assert "gelu" in repr(fused)


def test_constructor_and_unbatched_input():
    torch.manual_seed(0)
    fused = FusedDepthwiseConv1d(3, 5, padding=2, depth_multiplier=2, activation="silu", dtype=torch.float64)
    x = _x(3, 17, batch=1)
    expected = nn.functional.silu(fused.wrapped(x))
    assert relative_error(fused(x), expected) < 1e-12
    assert relative_error(fused(x[0]), expected[0]) < 1e-12
    assert list(fused.state_dict()) == ["weight", "bias"]


def test_state_dict_round_trips():
    conv = nn.Conv1d(4, 4, 3, padding=1, groups=4)
    fused = FusedDepthwiseConv1d.from_conv1d(nn.Conv1d(4, 4, 3, padding=1, groups=4))
    fused.load_state_dict(conv.state_dict())
    assert torch.equal(fused.weight, conv.weight)
    other = nn.Conv1d(4, 4, 3, padding=1, groups=4)
    other.load_state_dict(fused.state_dict())
    assert torch.equal(other.weight, conv.weight)


def test_keeps_less_than_the_conv_and_activation():
    conv = nn.Conv1d(8, 8, 31, padding=15, groups=8)
    reference = nn.Sequential(conv, nn.SiLU())
    fused = nn.Sequential(FusedDepthwiseConv1d.from_conv1d(conv, "silu"), FusedActivation(nn.SiLU()))
    x = torch.randn(2, 8, 500, device="meta", requires_grad=True)

    def kept(model):
        storages = {}

        def pack(t):
            storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.to("meta")(x)
        return sum(storages.values())

    activation_bytes = x.numel() * 4
    assert kept(fused) < kept(reference)
    assert kept(fused) <= activation_bytes + 8 * 32 * 4 + 64


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv1d(4, 8, 3), "not depthwise"),
        (nn.Conv1d(4, 4, 3, groups=4, padding=1, padding_mode="circular"), "padding_mode"),
        (nn.LazyConv1d(4, 3), "lazy"),
    ],
)
def test_rejects_what_the_kernel_cannot_run(conv, reason):
    assert reason in fusable_reason(conv)
    with pytest.raises(ValueError, match=reason):
        FusedDepthwiseConv1d.from_conv1d(conv)


def test_rejects_a_conv_with_hooks_and_a_bad_activation():
    conv = nn.Conv1d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="activation"):
        FusedDepthwiseConv1d.from_conv1d(conv, "tanh")
    conv.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks"):
        FusedDepthwiseConv1d.from_conv1d(conv)


@pytest.mark.parametrize("padding", [0, 2, "same"])
def test_depthwise_separable_fused_is_exact_with_the_same_keys(padding):
    torch.manual_seed(0)
    dense = nn.Conv1d(3, 5, 5, padding=padding).double()
    plain = DepthwiseSeparableConv1d.from_conv1d(dense)
    fused = DepthwiseSeparableConv1d.from_conv1d(dense, fused=True)
    assert isinstance(fused.depthwise, FusedDepthwiseConv1d)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert fused.kernel_size == plain.kernel_size and fused.padding == plain.padding
    assert relative_error(fused.dense_weight(), plain.dense_weight()) == 0
    assert_same_step(plain, fused, [_x(3)])
    built = DepthwiseSeparableConv1d(3, 5, 5, padding=padding, depth_multiplier=plain.depth_multiplier, fused=True,
                                     dtype=torch.float64)
    built.load_state_dict(plain.state_dict())
    assert relative_error(built(_x(3)), plain(_x(3))) < 1e-12


def test_depthwise_separable_fused_needs_zero_padding():
    with pytest.raises(ValueError, match="zeros"):
        DepthwiseSeparableConv1d(3, 5, 5, padding=2, padding_mode="reflect", fused=True)


def test_compiles_in_one_graph_and_traces_plainly():
    # NOTE [Depthwise under torch.compile]: the module compiles without a graph break (its kernel as
    # custom ops); a length trace (NOTE [The trace is not part of the step]) sees the plain conv
    from convmem import receptive_field

    torch._dynamo.reset()
    conv = nn.Conv1d(4, 4, 5, padding=4, dilation=2, groups=4).double()
    fused = FusedDepthwiseConv1d.from_conv1d(conv, "silu")
    x = _x().requires_grad_()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    out, expected = compiled(x), torch.nn.functional.silu(conv(x))
    assert relative_error(out, expected, floor=1e-12) < 1e-12
    (grad,) = torch.autograd.grad(out.square().sum(), [conv.weight])
    (want,) = torch.autograd.grad(expected.square().sum(), [conv.weight])
    assert relative_error(grad, want, floor=1e-12) < 1e-12
    found, plain = receptive_field(fused, _x()), receptive_field(conv, _x())
    assert found.local and (found.left, found.right, found.stride) == (plain.left, plain.right, plain.stride) == (4, 4, 1)
