"""Conv1dAsMatmul: a Conv1d with few input channels computed as one matmul over its unfolded input
(NOTE [Conv1d as a matmul]) gives the Conv1d's outputs and gradients, in float64, with its
parameters, at any stride, dilation, padding and length."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convmem
from _compare import assert_same_step, seeded_randn, twin
from _conv_swaps import (assert_compiled_on_cuda_computes_the_conv, assert_compiles_whole, assert_computes_the_conv,
                         assert_conv_swaps_exact, assert_refuses, assert_takes_any_layout, shorter_than_reach)
from convmem.nn import Conv1dAsMatmul, Tiled
from convmem.nn.conv_as_matmul import conv1d_as_matmul, conv_as_matmul_reason, convs_as_matmul
from convmem.strategies._common import swap_modules

# in, out, kernel, stride, padding, dilation, bias
GEOMETRIES = [
    (4, 64, 15, 1, 7, 1, True),  # Basenji's stem: 4 channels, k=15, 'same' by number
    (1, 16, 10, 5, 0, 1, True),  # wav2vec 2.0's first conv: one channel, stride 5
    (1, 8, 2, 1, 0, 1, False),  # a waveform's causal conv (the pad comes before), no bias
    (2, 12, 3, 1, "same", 3, True),  # dilated, 'same'
    (3, 9, 3, 1, "valid", 1, True),  # in * k == out: the largest columns allowed
    (2, 10, 5, 3, 4, 2, True),  # stride and dilation together
]


@pytest.mark.parametrize("length", [1, 2, 7, 23, 64, 97])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_outputs_and_gradients_are_the_conv1ds(geometry, length):
    cin, cout, k, s, p, d, bias = geometry
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, s, p, d, bias=bias).double()
    if shorter_than_reach(conv, length):
        pytest.skip("input shorter than the kernel's reach")
    assert_computes_the_conv(Conv1dAsMatmul(conv), conv, seeded_randn(2, cin, length))


def test_functional_form_against_conv1d_and_gradcheck():
    torch.manual_seed(1)
    x = seeded_randn(2, 3, 13).requires_grad_()
    w = torch.randn(7, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    want = F.conv1d(F.pad(x, (3, 1)), w, b, 2, 0, 2)
    torch.testing.assert_close(conv1d_as_matmul(x, w, b, 2, 3, 1, 2), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: conv1d_as_matmul(*t, 2, 3, 1, 2), (x, w, b))


def test_too_short_an_input_raises_the_conv1ds_error():
    conv = nn.Conv1d(2, 10, 5).double()
    x = seeded_randn(1, 2, 3)
    with pytest.raises(RuntimeError) as want:
        conv(x)
    with pytest.raises(RuntimeError) as got:
        Conv1dAsMatmul(conv)(x)
    assert str(got.value) == str(want.value)


def test_non_contiguous_and_unbatched_inputs():
    conv = nn.Conv1d(3, 12, 3, padding=1).double()
    assert_takes_any_layout(Conv1dAsMatmul, conv)


@pytest.mark.parametrize("name", ["basenji", "tcn", "wavenet", "w2v2_fe"])
def test_in_zoo_models_exact_keys_unchanged_and_restored(name):
    # each of these has a first conv with few input channels (one to four)
    assert_conv_swaps_exact(convmem.zoo.get(name, "small", dtype=torch.float64), convs_as_matmul, Conv1dAsMatmul)


def test_tiled_block_traces_its_convs_plainly_and_stays_exact():
    # the length trace follows Conv1d calls: while it runs the wrapper calls its Conv1d, so the
    # block still tiles, each tile computed as a matmul
    torch.manual_seed(2)
    block = nn.Sequential(nn.Conv1d(2, 16, 5, padding=2), nn.GELU(), nn.Conv1d(16, 2, 3, padding=1)).double()
    reference = twin(block)
    swap_modules(block, convs_as_matmul(block))
    assert isinstance(block[0], Conv1dAsMatmul) and type(block[2]) is nn.Conv1d  # 16 x 3 > 2 outputs
    tiled = Tiled(block, 16)
    assert_same_step(reference, tiled, (seeded_randn(2, 2, 75),), None, steps=1)


def test_compiles_without_graph_breaks():
    conv = nn.Conv1d(2, 16, 5, stride=2, padding=2, dilation=2).double()
    x = seeded_randn(2, 2, 31)
    assert_compiles_whole(Conv1dAsMatmul, conv, x)


def test_refuses_what_it_cannot_compute_and_names_why():
    class MyConv(nn.Conv1d):
        pass

    hooked = nn.Conv1d(2, 8, 3)
    hooked.register_forward_hook(lambda *args: None)
    cases = [(nn.Conv1d(2, 8, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
             (MyConv(2, 8, 3), "not an nn.Conv1d"), (hooked, "forward hooks"),
             (nn.Conv2d(2, 8, 3), "Conv2d"), (nn.Conv1d(4, 8, 3, groups=2), "groups=2"),
             (nn.Conv1d(3, 8, 3), "3 channels x kernel 3 = 9 rows) would outnumber its 8 output channels"),
             (nn.Conv1d(13, 128, 5), "13 channels x kernel 5 = 65 terms) is over the 64")]
    assert_refuses(Conv1dAsMatmul, conv_as_matmul_reason, cases, "cannot compute this convolution as a matmul")
    assert conv_as_matmul_reason(nn.Conv1d(3, 9, 3)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_on_cuda_compiled_outputs_and_gradients_are_the_conv1ds(geometry):
    cin, cout, k, s, p, d, bias = geometry
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, s, p, d, bias=bias).double().cuda()
    assert_compiled_on_cuda_computes_the_conv(Conv1dAsMatmul, conv)
