"""Conv1dAs2d: a Conv1d computed as a conv2d over a height of one (NOTE [Conv1d as conv2d under
torch.compile]) gives the Conv1d's outputs and gradients, in float64, with its parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import convmem
from _compare import seeded_randn
from _conv_swaps import (assert_compiled_on_cuda_computes_the_conv, assert_computes_the_conv, assert_conv_swaps_exact,
                         assert_refuses, shorter_than_reach)
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
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, s, p, d, g, bias).double()
    if shorter_than_reach(conv, length):
        pytest.skip("input shorter than the kernel's reach")
    assert_computes_the_conv(Conv1dAs2d(conv), conv, seeded_randn(2, cin, length))


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
    assert_refuses(Conv1dAs2d, conv_as_2d_reason, cases, "cannot compute this convolution as a conv2d")
    assert conv_as_2d_reason(nn.Conv1d(2, 2, 3)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_on_cuda_compiled_outputs_and_gradients_are_the_conv1ds(geometry):
    cin, cout, k, s, p, d, g, bias = geometry
    torch.manual_seed(0)
    assert_compiled_on_cuda_computes_the_conv(Conv1dAs2d, nn.Conv1d(cin, cout, k, s, p, d, g, bias).double().cuda())
