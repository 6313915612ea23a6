"""CompactMaxPool1d: max-pool's outputs and gradients, keeping an int8 offset per output
(NOTE [Compact max-pool]), checked against nn.MaxPool1d in float64."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import convmem
from _compare import assert_same_step, seeded_randn, twin
from convmem.nn import CompactMaxPool1d
from convmem.nn.compact_pool import compact_pool_reason, compact_pools
from convmem.strategies._common import swap_modules

# kernel, stride, padding, dilation, ceil_mode: non-overlapping, overlapping with padding (ResNet's
# stem), ceil mode, dilation, stride 1, stride defaulting to the kernel, and windows that tile the
# input (stride == kernel: a path of their own) with padding, cut or zero-filled at the end
GEOMETRIES = [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True), (5, 3, 2, 2, True),
              (4, 1, 2, 1, False), (2, None, 0, 1, True), (7, 4, 3, 1, True), (4, 4, 2, 1, False),
              (3, 3, 1, 1, True), (4, 4, 1, 1, True)]


def _grads(pool: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = pool(x)
    (gx,) = torch.autograd.grad(out, x, grad)
    return out, gx


@pytest.mark.parametrize("length", [17, 64, 101])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_outputs_and_gradients_are_max_pools_own_with_ties(geometry, length):
    k, s, p, d, ceil = geometry
    pool = nn.MaxPool1d(k, s, p, d, ceil_mode=ceil)
    # small integers: most windows hold ties, where the gradient goes to max-pool's own choice
    x = torch.randint(-3, 3, (2, 3, length), generator=torch.Generator().manual_seed(length)).double()
    reference = pool(x)
    grad = seeded_randn(*reference.shape, seed=1)
    out, gx = _grads(CompactMaxPool1d(pool), x, grad)
    ref_out, ref_gx = _grads(pool, x, grad)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-12)


def test_infinities_nans_and_unbatched_inputs():
    pool = nn.MaxPool1d(3, 2, 1, ceil_mode=True)
    x = seeded_randn(3, 40)  # (channels, length): no batch axis
    x[0, :5] = float("-inf")
    x[1, 7] = float("inf")
    x[2, 11] = float("nan")
    grad = seeded_randn(*pool(x).shape, seed=2)
    out, gx = _grads(CompactMaxPool1d(pool), x, grad)
    ref_out, ref_gx = _grads(pool, x, grad)
    torch.testing.assert_close(out, ref_out, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(gx, ref_gx, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 2, 0), (3, 3, 1)])  # overlapping, tiling
def test_gradients_of_gradients(geometry):
    pool = CompactMaxPool1d(nn.MaxPool1d(*geometry))
    x = seeded_randn(2, 3, 20).requires_grad_()
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(saved.values())


def test_keeps_one_byte_per_output():
    x = seeded_randn(2, 8, 1000).requires_grad_()
    pool = nn.MaxPool1d(2)
    n_out = 2 * 8 * 500
    assert _saved_bytes(pool, x) == x.numel() * 8 + n_out * 8  # its input (float64) and int64 indices
    assert _saved_bytes(CompactMaxPool1d(pool), x) == n_out
    with torch.no_grad():
        assert _saved_bytes(CompactMaxPool1d(pool), x) == 0


def test_estimate_sees_the_saving_on_basenji():
    entry = convmem.zoo.get("basenji", "default", device="meta")  # activations dominate at this size
    before = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn).peak_bytes
    pools = compact_pools(entry.model)
    assert sorted(pools) == [f"trunk.{i}.pool" for i in range(7)]
    swap_modules(entry.model, pools)
    after = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn).peak_bytes
    assert after < 0.7 * before  # 3.42 -> 2.17 GiB


def test_refuses_what_it_cannot_run_and_names_why():
    assert "return_indices" in compact_pool_reason(nn.MaxPool1d(2, return_indices=True))
    assert "129 positions" in compact_pool_reason(nn.MaxPool1d(129))
    assert "AvgPool1d" in compact_pool_reason(nn.AvgPool1d(2))
    hooked = nn.MaxPool1d(2)
    hooked.register_forward_hook(lambda *args: None)
    assert "hooks" in compact_pool_reason(hooked)
    with pytest.raises(ValueError, match="CompactMaxPool1d: cannot run this max-pool compactly: .*return_indices"):
        CompactMaxPool1d(nn.MaxPool1d(2, return_indices=True))
    assert compact_pool_reason(nn.MaxPool1d(128)) is None
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.MaxPool1d(2), nn.MaxPool1d(2, return_indices=True))
    assert list(compact_pools(model)) == ["1"]


def test_in_a_model_exact_with_batchnorm_and_restored():
    model = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.BatchNorm1d(8), nn.MaxPool1d(3, 2, 1),
                          nn.Conv1d(8, 4, 3), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)).double()
    reference = twin(model)
    keys = list(model.state_dict())
    swap_modules(model, compact_pools(model))
    assert isinstance(model[2], CompactMaxPool1d) and isinstance(model[5], CompactMaxPool1d)
    assert list(model.state_dict()) == keys
    assert_same_step(reference, model, (seeded_randn(2, 3, 77),), steps=2)
    convmem.restore_(model)
    assert type(model[2]) is nn.MaxPool1d and type(model[5]) is nn.MaxPool1d


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's max-pool kernels need a GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_on_cuda_outputs_and_gradients_are_max_pools_own(geometry):
    k, s, p, d, ceil = geometry
    pool = nn.MaxPool1d(k, s, p, d, ceil_mode=ceil)
    x = torch.randint(-3, 3, (4, 16, 4099), generator=torch.Generator().manual_seed(3)).float().cuda()
    grad = seeded_randn(*pool(x).shape, seed=1, dtype=torch.float32).cuda()
    out, gx = _grads(CompactMaxPool1d(pool), x, grad)
    ref_out, ref_gx = _grads(pool, x, grad)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-6, atol=1e-6)  # overlapping windows add in another order


def test_fuse_runs_the_pools_compactly_once_and_pools_false_leaves_them():
    entry = convmem.zoo.get("basenji", "small", dtype=torch.float64)
    reference = twin(entry.model)
    convmem.fuse_(entry.model, filter_fn=lambda conv, fqn: conv.groups == 1)  # chains and pools, no Triton
    compact = [n.replace(".wrapped", "") for n, m in entry.model.named_modules() if isinstance(m, CompactMaxPool1d)]
    assert compact == [f"trunk.{i}.pool" for i in range(7)]
    convmem.fuse_(entry.model, filter_fn=lambda conv, fqn: conv.groups == 1)  # again: nothing wrapped twice
    assert not any(isinstance(m.wrapped, CompactMaxPool1d) for m in entry.model.modules()
                   if isinstance(m, CompactMaxPool1d))
    assert list(entry.model.state_dict()) == list(reference.state_dict())
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn, steps=2)
    convmem.restore_(entry.model)
    convmem.fuse_(entry.model, filter_fn=lambda conv, fqn: conv.groups == 1, pools=False)
    assert not any(isinstance(m, CompactMaxPool1d) for m in entry.model.modules())
    with pytest.raises(TypeError, match="pools must be a bool"):
        convmem.fuse_(entry.model, pools="yes")


def test_fuse_on_a_model_with_only_a_pool_changes_it_without_a_warning():
    import warnings

    model = nn.Sequential(nn.Linear(4, 4), nn.MaxPool1d(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convmem.fuse_(model)
    assert isinstance(model[1], CompactMaxPool1d)


def test_under_bfloat16_autocast_outputs_and_gradients_are_max_pools_own():
    conv = nn.Conv1d(4, 8, 3, padding=1)
    for pool in (nn.MaxPool1d(2), nn.MaxPool1d(3, 2, 1)):
        results = []
        for module in (pool, CompactMaxPool1d(pool)):
            x = seeded_randn(2, 4, 101, dtype=torch.float32).requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(conv(x))
            (gx,) = torch.autograd.grad(y.float().pow(2).sum(), x)
            results.append((y, gx))
        (ref_y, ref_gx), (y, gx) = results
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref_y)
        torch.testing.assert_close(gx, ref_gx, rtol=0, atol=0)


def _has_c_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


def _conv_norm_pool() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4), nn.MaxPool1d(2),
                         nn.GELU(), nn.Conv1d(4, 2, 1)).double()


@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 2, 0), (4, 4, 2, 1, True), (5, 3, 2, 2)])
def test_the_compiled_backward_agrees_with_the_eager_one(geometry):
    # under torch.compile the backward is max-pool's own op on indices rebuilt from the offsets
    from convmem.nn.compact_pool import _max_pool_backward, _scatter_to_maxima

    kernel, stride, padding, *rest = geometry
    dilation = rest[0] if rest else 1
    ceil_mode = rest[1] if len(rest) > 1 else False
    for length in (17, 64, 101):
        x = torch.randint(-3, 3, (2, 3, length), generator=torch.Generator().manual_seed(length)).double()
        out, indices = torch.ops.aten.max_pool1d_with_indices(x, [kernel], [stride], [padding], [dilation], ceil_mode)
        offsets = ((indices - (torch.arange(out.shape[-1]) * stride - padding)) // dilation).to(torch.int8)
        grad = seeded_randn(*out.shape, seed=length)
        torch.testing.assert_close(
            _max_pool_backward(grad, offsets, x.shape, kernel, stride, padding, dilation, ceil_mode),
            _scatter_to_maxima(grad, offsets, x.shape, kernel, stride, padding, dilation), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's CUDA lowering of max-pool's backward needs a GPU")
@pytest.mark.parametrize("geometry", [(2, 2, 0), (3, 2, 1), (4, 4, 2)])
def test_on_cuda_compiled_gradients_are_max_pools_own(geometry):
    # under torch.compile the backward is max-pool's own op on rebuilt indices (NOTE [Compact max-pool])
    torch._dynamo.reset()
    pool = nn.MaxPool1d(*geometry)
    x = torch.randint(-3, 3, (4, 16, 4099), generator=torch.Generator().manual_seed(3)).float().cuda()
    grad = seeded_randn(*pool(x).shape, seed=1, dtype=torch.float32).cuda()
    out, gx = _grads(torch.compile(CompactMaxPool1d(pool)), x, grad)
    ref_out, ref_gx = _grads(pool, x, grad)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile's inductor backend needs a C compiler")
def test_compiled_keeps_neither_the_pools_input_nor_int64_indices():
    torch._dynamo.reset()
    model, compact = _conv_norm_pool(), _conv_norm_pool()
    compact[2] = CompactMaxPool1d(compact[2])
    x = seeded_randn(2, 3, 64).requires_grad_()

    def saved(module):
        out = torch.compile(copy.deepcopy(module))(x)  # a copy: its step moves BatchNorm's statistics
        return [(tuple(t.shape), t.dtype) for t in out.grad_fn.saved_tensors]  # the compiled graph's

    # What a compiled nn.MaxPool1d keeps differs between torch versions (2.13 recomputes its input
    # from BatchNorm's; the H200's 2.11 kept 0.67 GiB more on Basenji); the compact one keeps
    # BatchNorm's input alone at full length, and int8 offsets.
    kept = saved(compact)
    assert kept.count(((2, 4, 64), torch.float64)) == 1 and ((2, 4, 32), torch.int8) in kept, kept
    assert not any(dtype == torch.int64 for _, dtype in kept), kept
    compact.compile()  # in place: the parameters keep their names
    assert_same_step(model, compact, [x.detach()], steps=2)
