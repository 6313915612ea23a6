"""fuse_: depthwise convs (and a following activation) run by the fused kernel, exactly."""
from __future__ import annotations

import os

# The fused kernels run in Triton's interpreter on the CPU (see tests/kernels/conftest.py); set
# while pytest collects, before the kernels are first defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import convmem  # noqa: E402
from _compare import _grads_by_state_key, assert_same_step, step_results, twin  # noqa: E402
from convmem import zoo  # noqa: E402
from convmem._metrics import relative_error  # noqa: E402
from convmem.kernels.depthwise import triton_available  # noqa: E402
from convmem.nn import FusedActivation, FusedDepthwiseConv1d, FusedNormActConv  # noqa: E402
from convmem.profile import estimate_step  # noqa: E402
from convmem.strategies import fuse as fuse_module  # noqa: E402
from convmem.strategies.fuse import FuseConfig, fuse_  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# Narrow versions of the zoo models with depthwise convs, so the interpreter stays quick.
ZOO = {
    "conformer_conv": dict(channels=8, num_layers=2),
    "convtasnet": dict(channels=8, bottleneck=4, hidden=8, skip_channels=4, blocks_per_repeat=3, repeats=1),
}


def _fused(model):
    return {n: m.activation for n, m in model.named_modules() if isinstance(m, FusedDepthwiseConv1d)}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_are_exact(name):
    entry = zoo.get(name, dtype=torch.float64, length=160 if name == "convtasnet" else 40, **ZOO[name])
    reference = twin(entry.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse_(entry.model)
    fused = _fused(entry.model)
    depthwise = [n for n, m in reference.named_modules() if isinstance(m, nn.Conv1d) and m.groups == m.in_channels > 1]
    assert sorted(n.replace(".wrapped", "") for n in fused) == sorted(depthwise) and depthwise
    # conformer's BatchNorm -> SiLU -> pointwise conv: every layer's chain fused
    chained = [n for n, m in entry.model.named_modules() if isinstance(m, FusedNormActConv)]
    assert chained == (["layers.0", "layers.1"] if name == "conformer_conv" else [])
    assert set(fused.values()) == {None}  # BatchNorm (conformer) and PReLU (convtasnet) follow: not fused
    assert list(entry.model.state_dict()) == list(reference.state_dict())
    _assert_same_training_step(reference, entry.model, entry.inputs, entry.loss_fn)
    reference.eval()
    entry.model.eval()
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn)
    convmem.restore_(entry.model)
    assert not _fused(entry.model)


def _assert_same_training_step(reference, model, inputs, loss_fn, tol=1e-10):
    """assert_same_step in train mode, where a gradient that is zero analytically -- the bias of a
    conv followed by train-mode BatchNorm (conformer) -- is roundoff (~1e-16) on both sides and
    differs by reassociation: such gradients are compared absolutely (floor 1e-4: < 1e-14)."""
    expected = step_results(reference, inputs, loss_fn, steps=2)
    actual = step_results(model, inputs, loss_fn, steps=2)
    for a, e in zip(actual["outputs"] + actual["input_grads"], expected["outputs"] + expected["input_grads"]):
        assert relative_error(a, e) < tol
    ref_grads = _grads_by_state_key(reference, expected["param_grads"])
    grads = _grads_by_state_key(model, actual["param_grads"])
    assert ref_grads.keys() == grads.keys()
    for key, e in ref_grads.items():
        assert relative_error(grads[key], e, floor=1e-4) < tol, key
    for key, e in expected["buffers"].items():
        a = actual["buffers"][key]
        assert relative_error(a, e, floor=1e-12) < tol if e.is_floating_point() else torch.equal(a, e), key


def _stack(act: nn.Module, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, 4, 1),
        nn.Conv1d(4, 4, 5, padding=2, groups=4, bias=bias),
        act,
        nn.Conv1d(4, 4, 3, padding=2, dilation=2, stride=2, groups=4),
    ).double()


@pytest.mark.parametrize("act, name", [(nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.GELU(), "gelu"),
                                       (nn.SiLU(), "silu")])
def test_following_activation_is_fused_and_restored(act, name):
    model = _stack(act)
    reference = twin(model)
    fuse_(model)
    assert isinstance(model[1], FusedDepthwiseConv1d) and model[1].activation == name
    assert isinstance(model[2], FusedActivation) and type(model[2].wrapped) is type(act)
    assert isinstance(model[3], FusedDepthwiseConv1d) and model[3].activation is None
    assert isinstance(model[0], nn.Conv1d)  # pointwise: not depthwise
    x = torch.randn(2, 4, 31, dtype=torch.float64)
    assert_same_step(reference, model, [x])
    model_sd = model.state_dict()
    reference.load_state_dict(model_sd)
    convmem.restore_(model)
    assert [type(m) for m in model] == [type(m) for m in reference]
    assert_same_step(reference, model, [x])


@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.PReLU(), nn.Tanh(), nn.LeakyReLU()])
def test_other_activations_are_left_in_place(act):
    model = _stack(act)
    reference = twin(model)
    fuse_(model)
    assert model[1].activation is None and model[2] is act
    assert_same_step(reference, model, [torch.randn(2, 4, 31, dtype=torch.float64)])


def test_activations_false_fuses_convs_only():
    model = _stack(nn.SiLU())
    fuse_(model, activations=False)
    assert model[1].activation is None and isinstance(model[2], nn.SiLU)


def test_shared_activation_or_conv_is_not_folded():
    torch.manual_seed(0)
    act = nn.ReLU()
    conv = nn.Conv1d(3, 3, 3, padding=1, groups=3)
    model = nn.Sequential(conv, act, nn.Conv1d(3, 3, 3, padding=1, groups=3), act).double()
    reference = twin(model)
    fuse_(model)
    assert model[0].activation is None and model[2].activation is None and model[1] is act
    assert_same_step(reference, model, [torch.randn(2, 3, 20, dtype=torch.float64)])

    shared = nn.Sequential(conv, nn.SiLU(), conv).double()
    reference = twin(shared)
    fuse_(shared)
    assert shared[0] is shared[2] and isinstance(shared[0], FusedDepthwiseConv1d)
    assert shared[0].activation is None and isinstance(shared[1], nn.SiLU)
    assert_same_step(reference, shared, [torch.randn(2, 3, 20, dtype=torch.float64)])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.dw(x)) + x


def test_activation_in_a_custom_forward_is_not_folded():
    model = nn.Sequential(_Block(), _Block()).double()
    reference = twin(model)
    fuse_(model)
    assert set(_fused(model).values()) == {None} and len(_fused(model)) == 2
    assert_same_step(reference, model, [torch.randn(1, 4, 25, dtype=torch.float64)])


@pytest.mark.filterwarnings("ignore:fuse_. found no Conv1d")
def test_depth_multiplier_needs_opt_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1, groups=3), nn.GELU()).double()
    reference = twin(model)
    with pytest.warns(UserWarning, match="depth multiplier 2"):
        fuse_(model)
    assert isinstance(model[0], nn.Conv1d)
    fuse_(model, max_depth_multiplier=2)
    assert isinstance(model[0], FusedDepthwiseConv1d) and model[0].activation == "gelu"
    assert_same_step(reference, model, [torch.randn(2, 3, 21, dtype=torch.float64)])


def test_mono_input_conv_is_not_a_depthwise_layer():
    model = nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="found no Conv1d"):
        fuse_(model)
    assert isinstance(model[0], nn.Conv1d)


def test_unfusable_depthwise_conv_warns_and_is_left_alone():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, groups=4, padding_mode="circular"),
                          nn.Conv1d(4, 4, 3, padding=1, groups=4))
    with pytest.warns(UserWarning, match=r"left '0' untouched: padding_mode='circular'"):
        fuse_(model)
    assert isinstance(model[0], nn.Conv1d) and isinstance(model[1], FusedDepthwiseConv1d)


def test_filter_fn_selects_and_warns_about_what_it_chose_wrongly():
    model = _stack(nn.ReLU())
    with pytest.warns(UserWarning, match="not depthwise"):
        fuse_(model, filter_fn=lambda m, name: name in ("0", "3"))
    assert isinstance(model[0], nn.Conv1d) and isinstance(model[1], nn.Conv1d)
    assert isinstance(model[3], FusedDepthwiseConv1d)


def test_fusing_twice_changes_nothing_more():
    model = _stack(nn.ReLU())
    fuse_(model)
    before = repr(model)
    with pytest.warns(UserWarning, match="no Conv1d"):
        fuse_(model)
    assert repr(model) == before


def test_composes_with_checkpointing():
    model = nn.Sequential(*(_stack(nn.SiLU()) for _ in range(2))).double()
    reference = twin(model)
    convmem.checkpoint_(model, filter_fn=lambda m, name: name in ("0", "1"))
    fuse_(model)
    assert len(_fused(model)) == 4
    assert_same_step(reference, model, [torch.randn(2, 4, 31, dtype=torch.float64)])
    model = convmem.restore_(model)
    assert not _fused(model) and list(model.state_dict()) == list(reference.state_dict())


def test_root_conv_and_bad_arguments_raise_before_anything_changes():
    with pytest.raises(ValueError, match="the model itself"):
        fuse_(nn.Conv1d(4, 4, 3, groups=4))
    model = _stack(nn.ReLU())
    before = repr(model)
    for kwargs, error in [(dict(max_depth_multiplier=0), ValueError), (dict(activations="yes"), TypeError),
                          (dict(filter_fn=3), TypeError)]:
        with pytest.raises(error):
            fuse_(model, **kwargs)
    with pytest.raises(TypeError):
        fuse_("model")
    assert repr(model) == before


def test_config_validates_and_round_trips():
    config = FuseConfig(activations=False, max_depth_multiplier=4)
    assert FuseConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        FuseConfig.from_dict({"tile": 3})
    with pytest.raises(ValueError):
        FuseConfig(max_depth_multiplier=True)


def test_warns_when_only_the_reference_can_run(monkeypatch):
    monkeypatch.setattr(fuse_module, "triton_available", lambda: False)
    with pytest.warns(UserWarning, match="Triton is not installed"):
        fuse_(_stack(nn.ReLU()))
    monkeypatch.setattr(fuse_module, "triton_available", lambda: True)
    monkeypatch.setattr(fuse_module, "kernels_usable", lambda device: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no CUDA device"):
        fuse_(_stack(nn.ReLU()))


def test_estimate_sees_the_smaller_kept_memory():
    model = nn.Sequential(nn.Conv1d(8, 8, 31, padding=15, groups=8), nn.SiLU(), nn.Conv1d(8, 8, 1))
    x = torch.randn(4, 8, 4096)
    before = estimate_step(model, (x,)).saved_bytes
    fuse_(model)
    after = estimate_step(model, (x,)).saved_bytes
    assert before - after == x.numel() * 4  # the pre-activation is no longer kept
