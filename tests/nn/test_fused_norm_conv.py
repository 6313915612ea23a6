"""FusedNormActConv and fuse_'s chain pass: BatchNorm1d -> activation -> Conv1d keeping only the
BatchNorm input, exact against the untouched model in float64 (NOTE [Norm-activation-conv chains])."""
from __future__ import annotations

import copy
import io
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convmem
from _compare import assert_same_step, seeded_randn, twin
from convmem import zoo
from convmem.nn import FusedNormActConv
from convmem.nn.fused_norm_conv import chain_reason
from convmem.profile import estimate_step
from convmem.strategies.fuse import fuse_


class Chain(nn.Module):
    """conv -> BatchNorm -> activation -> conv (+ the input, when shapes allow)."""

    def __init__(self, bn=None, act=None, conv=None, functional=None, residual=False):
        super().__init__()
        self.stem = nn.Conv1d(3, 6, 3, padding=1, bias=False)
        self.bn = bn if bn is not None else nn.BatchNorm1d(6)
        self.act = act if act is not None else nn.ReLU()
        self.conv = conv if conv is not None else nn.Conv1d(6, 6, 3, padding=1)
        self.functional = functional
        self.residual = residual

    def forward(self, x):
        h = self.stem(x)
        z = self.bn(h)
        y = self.functional(z) if self.functional is not None else self.act(z)
        out = self.conv(y)
        return out + h[..., : out.shape[-1]] if self.residual else out


def _model(**kwargs):
    torch.manual_seed(0)
    return Chain(**kwargs).double()


def _x(length=37, batch=4):
    return seeded_randn(batch, 3, length)


def _fused(model):
    optimized = twin(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse_(optimized)
    return optimized


def _chains(model):
    return sum(m.chains for m in model.modules() if isinstance(m, FusedNormActConv))


class Outer(nn.Module):
    """Holds the block, so that fuse_ can replace it in place."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("bn", [
    dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(eps=1e-3, momentum=0.3),
], ids=["default", "cumulative", "no_affine", "no_running_stats", "eps_momentum"])
def test_batchnorm_variants_are_exact_over_three_steps(bn):
    model = Outer(_model(bn=nn.BatchNorm1d(6, **bn)))
    optimized = _fused(model)
    assert _chains(optimized) == 1
    assert_same_step(model, optimized, [_x()], steps=3)  # running statistics and num_batches_tracked too


@pytest.mark.parametrize("act", [
    nn.ReLU(), nn.ReLU(inplace=True), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.LeakyReLU(0.2),
], ids=["relu", "relu_inplace", "gelu", "gelu_tanh", "silu", "leaky_relu"])
def test_activation_modules_are_exact(act):
    model = Outer(_model(act=act, residual=True))
    optimized = _fused(model)
    assert _chains(optimized) == 1
    assert_same_step(model, optimized, [_x()], steps=2)


@pytest.mark.parametrize("functional", [
    F.relu, torch.relu, F.silu, lambda z: F.gelu(z, approximate="tanh"), lambda z: F.leaky_relu(z, 0.1),
], ids=["F.relu", "torch.relu", "F.silu", "F.gelu_tanh", "F.leaky_relu"])
def test_functional_activations_are_exact(functional):
    model = Outer(_model(functional=functional))
    optimized = _fused(model)
    assert _chains(optimized) == 1
    assert_same_step(model, optimized, [_x()], steps=2)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=1), dict(kernel_size=5, stride=2, padding=2), dict(kernel_size=3, dilation=3, padding="valid"),
    dict(kernel_size=4, groups=2, bias=False), dict(kernel_size=7, stride=3, dilation=2, padding=5),
], ids=["k1", "strided", "dilated_valid", "grouped_no_bias", "everything"])
@pytest.mark.parametrize("length", [37, "shortest"])
def test_conv_variants_and_awkward_lengths_are_exact(conv, length):
    model = Outer(_model(conv=nn.Conv1d(6, 4, **conv)))
    if length == "shortest":  # the fewest samples the conv accepts
        c = model.block.conv
        padding = 0 if c.padding == "valid" else c.padding[0]
        length = max(1, c.dilation[0] * (c.kernel_size[0] - 1) + 1 - 2 * padding)
    optimized = _fused(model)
    assert _chains(optimized) == 1
    assert_same_step(model, optimized, [_x(length)], steps=2)


@pytest.mark.parametrize("name", ["resnet1d", "conformer_conv"])
def test_zoo_models_are_exact(name):
    entry = zoo.get(name, "small", dtype=torch.float64)
    reference = twin(entry.model)
    # the chains only: conformer's depthwise convs would run in Triton's interpreter when another
    # test module set TRITON_INTERPRET (slow at this size), and tests/strategies/test_fuse.py has them
    fuse_(entry.model, filter_fn=lambda conv, fqn: conv.groups == 1)
    blocks = [m for m in entry.model.modules() if isinstance(m, FusedNormActConv)]
    assert len(blocks) == (8 if name == "resnet1d" else 16) and all(b.chains == 1 for b in blocks)
    assert list(entry.model.state_dict()) == list(reference.state_dict())
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn, steps=3)
    convmem.restore_(entry.model)
    assert not any(isinstance(m, FusedNormActConv) for m in entry.model.modules())
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("make", [lambda: Chain(act=nn.SiLU()), lambda: ActChain(nn.GELU())], ids=["norm_silu", "gelu"])
def test_low_precision_models_agree_to_their_rounding(dtype, make):
    # The rebuilt BatchNorm output is computed in float32 and rounded once to the model's dtype,
    # like the kernel's (NOTE [Norm-activation-conv chains]); on the CPU the bits agree.
    torch.manual_seed(0)
    model = Outer(make()).to(dtype)
    optimized = _fused(model)
    assert_same_step(model, optimized, [_x(length=300).to(dtype)], tol=4 * torch.finfo(dtype).eps)


def test_eval_mode_no_grad_and_autocast_run_the_block_as_it_is():
    model = Outer(_model(residual=True))
    optimized = _fused(model)
    model.eval()
    optimized.eval()
    assert_same_step(model, optimized, [_x()])
    with torch.no_grad():
        assert torch.equal(model(_x()), optimized(_x()))
    model.train()
    optimized.train()
    for m in (model, optimized):
        m.float()
    x = _x().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(x), optimized(x)
    assert torch.equal(expected, actual)  # the same bfloat16 ops: the chain is not fused under autocast


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_fused_blocks_updates_batchnorm_statistics_once(policy):
    # The recompute runs the fused chain again; Checkpointed's bookkeeping hooks on the BatchNorm
    # run around it (NOTE [Buffers are updated once]).
    entry = zoo.get("resnet1d", "small", dtype=torch.float64)
    reference = twin(entry.model)
    fuse_(entry.model)
    convmem.checkpoint_(entry.model, policy=policy)
    assert any(isinstance(m, FusedNormActConv) for m in entry.model.modules())
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn, steps=3)


@pytest.mark.parametrize("where", ["bn", "conv"])
def test_a_hook_added_after_fusing_runs_the_chain_unfused(where):
    model = Outer(_model())
    optimized = _fused(model)
    seen = []
    getattr(optimized.block.wrapped, where).register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert_same_step(model, optimized, [_x()])
    assert seen == [(4, 6, 37)]


def test_the_no_gpu_estimate_sees_the_fused_chains():
    # convmem.profile's per-module hooks do not stop the fused path (NOTE [Norm-activation-conv chains])
    entry = zoo.get("resnet1d", "small")
    before = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    fuse_(entry.model)
    after = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    assert after.kept_bytes < before.kept_bytes and after.peak_bytes < before.peak_bytes


class ActChain(nn.Module):
    """x + conv(act(x)) (hifigan's residual unit) or conv(act(stem(x)))."""

    def __init__(self, act, residual=True):
        super().__init__()
        self.stem = nn.Conv1d(3, 6, 3, padding=1)
        self.act = act
        self.conv = nn.Conv1d(6, 6, 5, padding=2, dilation=1)
        self.residual = residual

    def forward(self, x):
        h = self.stem(x)
        return h + self.conv(self.act(h)) if self.residual else self.conv(self.act(h))


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.LeakyReLU(0.1)],
                         ids=["gelu", "gelu_tanh", "silu", "leaky_relu"])
@pytest.mark.parametrize("residual", [True, False])
def test_activation_conv_chains_are_exact_and_keep_the_activation_input_only(act, residual):
    torch.manual_seed(0)
    model = Outer(ActChain(act, residual).double())
    optimized = _fused(model)
    assert _chains(optimized) == 1
    assert_same_step(model, optimized, [_x()], steps=2)
    x = _x(length=1000)
    assert _kept_bytes(model, x) - _kept_bytes(optimized, x) == 4 * 6 * 1000 * 8  # the activation's output


def test_weight_normed_convs_are_fused_exactly():
    # HiFi-GAN as published: every conv under weight norm (a parametrization), LeakyReLU before it
    torch.manual_seed(0)
    block = ActChain(nn.LeakyReLU(0.1)).double()
    block.conv = nn.utils.parametrizations.weight_norm(block.conv)
    model = Outer(block)
    optimized = _fused(model)
    assert _chains(optimized) == 1
    assert list(optimized.state_dict()) == list(model.state_dict())
    assert_same_step(model, optimized, [_x()], steps=2)


def test_a_relu_without_batchnorm_is_left_alone():
    # ReLU keeps its output only; keeping its input instead would save nothing
    with pytest.warns(UserWarning, match="no Conv1d to change"):
        fuse_(Outer(ActChain(nn.ReLU())))


@pytest.mark.parametrize("name", ["hifigan", "basenji"])
def test_activation_chains_in_the_zoo_are_exact(name):
    entry = zoo.get(name, "small", dtype=torch.float64)
    reference = twin(entry.model)
    # hifigan: lrelu -> conv twice per dilation of every residual block; basenji: GELU -> conv in
    # every conv_block
    expected = (sum(2 * len(m.convs1) for m in entry.model.modules() if type(m).__name__ == "ResBlock1")
                if name == "hifigan" else sum(type(m).__name__ == "ConvBlock" for m in entry.model.modules()))
    fuse_(entry.model)
    assert _chains(entry.model) == expected > 0
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn, steps=2)


# ------------------------------------------------------------------------------ what is kept


def _kept_bytes(model, x):
    """Bytes of the storages autograd saves, parameters' and buffers' aside (resident anyway)."""
    parameters = {id(p.untyped_storage()) for p in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        if id(t.untyped_storage()) not in parameters:
            storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()], ids=["relu", "silu"])
def test_keeps_only_the_batchnorm_input(act):
    model = Outer(_model(act=act))
    optimized = _fused(model)
    x = _x(length=1000)
    activation_bytes = 4 * 6 * 1000 * 8
    # ReLU keeps its output, which is the conv's input: one tensor less. SiLU keeps its input (the
    # BatchNorm output) besides: two.
    saved = _kept_bytes(model, x) - _kept_bytes(optimized, x)
    assert saved == activation_bytes * (1 if isinstance(act, nn.ReLU) else 2)


def test_a_fused_model_survives_pickle_and_deepcopy():
    # torch.save(model) pickles it; the traced forward is traced again on loading
    model = Outer(_model(act=nn.SiLU(), residual=True))
    optimized = _fused(model)
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = _x(length=1000)
    kept = lambda m: _kept_bytes(copy.deepcopy(m), x)  # noqa: E731 - copies: a step moves the statistics
    for copy_ in (loaded, copy.deepcopy(optimized)):
        assert _chains(copy_) == 1
        assert kept(copy_) == kept(optimized) < kept(model)
        assert_same_step(copy.deepcopy(model), copy_, [_x()], steps=2)


# ------------------------------------------------------------------------------ left alone


class TwoUsers(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.bn, self.act, self.conv = nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 6, 3, padding=1)
        self.where = where

    def forward(self, x):
        z = self.bn(x)
        y = self.act(z)
        extra = z if self.where == "norm" else y
        return self.conv(y) + extra


class BatchNormSubclass(nn.BatchNorm1d):
    pass


@pytest.mark.parametrize("model", [
    lambda: Outer(TwoUsers("norm")),
    lambda: Outer(TwoUsers("activation")),
    lambda: Outer(Chain(conv=nn.Conv1d(6, 6, 3, padding="same"))),
    lambda: Outer(Chain(conv=nn.Conv1d(6, 6, 3, padding=1, padding_mode="reflect"))),
    lambda: Outer(Chain(bn=BatchNormSubclass(6))),
    lambda: Outer(Chain(act=nn.Tanh())),
    lambda: Outer(Chain(act=nn.PReLU())),
], ids=["norm_used_twice", "activation_used_twice", "padding_same", "reflect", "batchnorm_subclass", "tanh", "prelu"])
def test_chains_that_cannot_be_fused_are_left_alone(model):
    model = model()
    optimized = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no Conv1d to change"):
        fuse_(optimized)
    assert not any(isinstance(m, FusedNormActConv) for m in optimized.modules())


def test_a_forward_hook_keeps_the_chain_unfused():
    model = Outer(_model())
    model.block.bn.register_forward_hook(lambda *a: None)
    assert chain_reason(model.block.bn, ("relu", None), model.block.conv) is not None
    with pytest.warns(UserWarning, match="no Conv1d to change"):
        fuse_(model)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act, self.conv = nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 6, 1)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            x = -x
        return self.conv(self.act(self.bn(x)))


def test_a_forward_fx_cannot_trace_is_left_alone():
    with pytest.warns(UserWarning, match="no Conv1d to change"):
        fuse_(Outer(DataDependent()))


def test_filter_fn_chooses_chains_by_their_conv():
    model = Outer(_model())
    kept = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="filter_fn selected no Conv1d"):
        fuse_(kept, filter_fn=lambda conv, fqn: fqn != "block.conv")
    assert not any(isinstance(m, FusedNormActConv) for m in kept.modules())
    fuse_(model, filter_fn=lambda conv, fqn: fqn == "block.conv")
    assert _chains(model) == 1


def test_norm_act_conv_false_and_bad_config():
    model = Outer(_model())
    with pytest.warns(UserWarning, match="no Conv1d to change"):
        fuse_(model, norm_act_conv=False)
    assert _chains(model) == 0
    with pytest.raises(TypeError, match="norm_act_conv must be a bool"):
        fuse_(model, norm_act_conv=1)


def test_wrapping_a_block_without_chains_is_an_error():
    with pytest.raises(ValueError, match=r"no \[BatchNorm1d ->\] activation -> Conv1d chain"):
        FusedNormActConv(nn.Sequential(nn.Conv1d(3, 3, 1), nn.ReLU()))


def test_the_traced_forward_follows_train_and_eval():
    # The forward reads self.training: traced in train mode, used only in train mode.
    class ModeDependent(Chain):
        def forward(self, x):
            out = super().forward(x)
            return out * 2 if self.training else out

    model = Outer(ModeDependent().double())
    optimized = _fused(model)
    for train in (True, False):
        model.train(train)
        optimized.train(train)
        assert_same_step(model, optimized, [_x()])


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_fused_model_is_exact():
    torch._dynamo.reset()
    model = Outer(_model(residual=True))
    optimized = _fused(model)
    optimized.compile()  # in place: state_dict keys unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_step(model, optimized, [_x()], steps=2)
