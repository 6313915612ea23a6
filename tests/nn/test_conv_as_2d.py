"""Conv1dAs2d: a Conv1d computed as a conv2d over a height of one (NOTE [Conv1d as conv2d under
torch.compile]) gives the Conv1d's outputs and gradients, in float64, with its parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import convmem
from _compare import assert_conv_swaps_exact, seeded_randn
from convmem.nn import Conv1dAs2d
from convmem.nn.conv_as_2d import conv_as_2d_reason, convs_as_2d

# in, out, kernel, stride, padding, dilation, groups, bias
GEOMETRIES = [
    (3, 5, 3, 1, 1, 1, 1, True),
    (4, 6, 10, 5, 0, 1, 1, False),  # wav2vec 2.0's first layer: stride 5, no padding, no bias
    (6, 6, 7, 1, "same", 2, 6, True),  # depthwise, dilated, 'same'
    (4, 8, 2, 2, "valid", 1, 2, True),  # grouped
    (5, 3, 1, 1, 0, 1, 1, True),  # pointwise
    (2, 4, 5, 3, 4, 3, 1, False),  # stride, dilation and padding together
]


@pytest.mark.parametrize("length", [1, 23, 64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_outputs_and_gradients_are_the_conv1ds(geometry, length):
    cin, cout, k, s, p, d, g, bias = geometry
    if length + 2 * (p if isinstance(p, int) else 0) < d * (k - 1) + 1 and p != "same":
        pytest.skip("input shorter than the kernel's reach")
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, s, p, d, g, bias).double()
    x = seeded_randn(2, cin, length).requires_grad_()
    reference = conv(x)
    grads = torch.autograd.grad(reference.square().sum(), (x, *conv.parameters()))
    as_2d = Conv1dAs2d(conv)
    out = as_2d(x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (x, *conv.parameters())), grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unbatched_input():
    conv = nn.Conv1d(3, 4, 3, padding=1).double()
    x = seeded_randn(3, 20)
    torch.testing.assert_close(Conv1dAs2d(conv)(x), conv(x), rtol=1e-12, atol=1e-12)


def test_in_a_zoo_model_exact_keys_unchanged_and_restored():
    entry = convmem.zoo.get("w2v2_fe", "small", dtype=torch.float64, length=800)
    assert_conv_swaps_exact(entry, convs_as_2d, Conv1dAs2d, count=7)


def test_refuses_what_it_cannot_compute_and_names_why():
    class MyConv(nn.Conv1d):
        pass

    hooked = nn.Conv1d(2, 2, 3)
    hooked.register_forward_hook(lambda *args: None)
    cases = [(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
             (MyConv(2, 2, 3), "not an nn.Conv1d"), (hooked, "forward hooks"), (nn.Conv2d(2, 2, 3), "Conv2d")]
    for module, why in cases:
        assert why in conv_as_2d_reason(module)
        with pytest.raises(ValueError, match="cannot compute this convolution as a conv2d"):
            Conv1dAs2d(module)
    assert conv_as_2d_reason(nn.Conv1d(2, 2, 3)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_on_cuda_compiled_outputs_and_gradients_are_the_conv1ds(geometry):
    # cuDNN picks its own algorithms for each (TF32 by default for convolutions): compared in float64
    cin, cout, k, s, p, d, g, bias = geometry
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, s, p, d, g, bias).double().cuda()
    x = seeded_randn(2, cin, 257).cuda().requires_grad_()
    reference = conv(x)
    grads = torch.autograd.grad(reference.square().sum(), (x, *conv.parameters()))
    out = torch.compile(Conv1dAs2d(conv))(x)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (x, *conv.parameters())), grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
