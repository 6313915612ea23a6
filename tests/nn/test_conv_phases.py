"""Conv1dByPhases: a dilated Conv1d computed as an undilated conv2d over its phases (NOTE [Dilated convs
by phases]) gives the Conv1d's outputs and gradients, in float64, with its parameters, at any length."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convmem
from _compare import assert_same_step, seeded_randn, twin
from _conv_swaps import (assert_compiled_on_cuda_computes_the_conv, assert_compiles_whole, assert_computes_the_conv,
                         assert_conv_swaps_exact, assert_refuses, assert_takes_any_layout, shorter_than_reach)
from convmem.nn import Conv1dByPhases, Tiled
from convmem.nn.conv_phases import conv_by_phases, conv_by_phases_reason, convs_by_phases
from convmem.strategies._common import swap_modules

# in, out, kernel, padding, dilation, groups, bias
GEOMETRIES = [
    (3, 5, 3, 2, 2, 1, True),  # tcn's: same padding
    (4, 6, 2, 0, 8, 1, True),  # wavenet's: no padding (the causal pad comes before)
    (6, 6, 3, "same", 4, 6, True),  # depthwise (Conv-TasNet), 'same'
    (4, 8, 5, 6, 3, 2, False),  # grouped, odd dilation, wider kernel, no bias
    (2, 3, 3, "valid", 5, 1, True),
    (3, 3, 1, 0, 7, 1, True),  # a pointwise conv with a dilation (changes nothing, computed so too)
]


@pytest.mark.parametrize("length", [1, 2, 7, 23, 64, 97])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_outputs_and_gradients_are_the_conv1ds(geometry, length):
    cin, cout, k, p, d, g, bias = geometry
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, 1, p, d, g, bias).double()
    if shorter_than_reach(conv, length):
        pytest.skip("input shorter than the kernel's reach")
    assert_computes_the_conv(Conv1dByPhases(conv), conv, seeded_randn(2, cin, length))


def test_functional_form_against_conv1d_and_gradcheck():
    torch.manual_seed(1)
    x = seeded_randn(2, 3, 13).requires_grad_()
    w = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(conv_by_phases(x, w, b, 4, 4), F.conv1d(x, w, b, 1, 4, 4), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: conv_by_phases(*t, 4, 4), (x, w, b))
    with pytest.raises(ValueError, match="not a multiple of the dilation"):
        conv_by_phases(x, w, b, 4, 2)


def test_non_contiguous_and_unbatched_inputs():
    conv = nn.Conv1d(3, 4, 3, padding=3, dilation=3).double()
    assert_takes_any_layout(Conv1dByPhases, conv)


@pytest.mark.parametrize("name", ["tcn", "wavenet", "basenji", "convtasnet"])
def test_in_zoo_models_exact_keys_unchanged_and_restored(name):
    assert_conv_swaps_exact(convmem.zoo.get(name, "small", dtype=torch.float64), convs_by_phases, Conv1dByPhases)


def test_tiled_block_traces_its_convs_plainly_and_stays_exact():
    # NOTE [Dilated convs by phases]: the length trace cannot follow the phases' view; while it runs
    # the wrapper calls its Conv1d, so the block still tiles, each tile computed by phases
    torch.manual_seed(2)
    block = nn.Sequential(nn.Conv1d(3, 8, 3, padding=4, dilation=4), nn.GELU(), nn.Conv1d(8, 3, 3, padding=2, dilation=2))
    block = block.double()
    reference = twin(block)
    swap_modules(block, convs_by_phases(block))
    tiled = Tiled(block, 16)
    x = seeded_randn(2, 3, 75)
    assert_same_step(reference, tiled, (x,), None, steps=1)


def test_compiles_without_graph_breaks():
    conv = nn.Conv1d(3, 4, 3, padding=2, dilation=2).double()
    x = seeded_randn(2, 3, 31)
    assert_compiles_whole(Conv1dByPhases, conv, x)


def test_refuses_what_it_cannot_compute_and_names_why():
    class MyConv(nn.Conv1d):
        pass

    hooked = nn.Conv1d(2, 2, 3, dilation=2)
    hooked.register_forward_hook(lambda *args: None)
    cases = [(nn.Conv1d(2, 2, 3, padding=2, dilation=2, padding_mode="reflect"), "padding_mode='reflect'"),
             (MyConv(2, 2, 3, dilation=2), "not an nn.Conv1d"), (hooked, "forward hooks"),
             (nn.Conv2d(2, 2, 3), "Conv2d"), (nn.Conv1d(2, 2, 3), "not dilated"),
             (nn.Conv1d(2, 2, 3, stride=2, dilation=2), "stride 2"),
             (nn.Conv1d(2, 2, 3, padding=3, dilation=2), "padding (3, 3)"),
             (nn.Conv1d(2, 2, 2, padding="same", dilation=3), "padding (1, 2)")]
    assert_refuses(Conv1dByPhases, conv_by_phases_reason, cases, "cannot compute this convolution by phases")
    assert conv_by_phases_reason(nn.Conv1d(2, 2, 3, padding=4, dilation=2)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_on_cuda_compiled_outputs_and_gradients_are_the_conv1ds(geometry):
    cin, cout, k, p, d, g, bias = geometry
    torch.manual_seed(0)
    assert_compiled_on_cuda_computes_the_conv(Conv1dByPhases, nn.Conv1d(cin, cout, k, 1, p, d, g, bias).double().cuda())
