"""to_depthwise_separable_: exact at full rank on any model, honest report, untouched model on error."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmem import zoo
from convmem._metrics import relative_error
from convmem.nn.depthwise_separable import DepthwiseSeparableConv1d
from convmem.strategies.depthwise import DepthwiseSeparableConfig, to_depthwise_separable_


class _Mixed(nn.Module):
    """Every kind of Conv1d the strategy meets: dense (several paddings), 1x1, depthwise, grouped."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 1)
        self.body = nn.Sequential(
            nn.Conv1d(8, 8, 7, padding=3, padding_mode="reflect"),
            nn.GELU(),
            nn.Conv1d(8, 12, 4, stride=2, dilation=2, padding=1, bias=False, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv1d(12, 12, 5, padding="same", padding_mode="replicate"),
            nn.Conv1d(12, 12, 3, padding=1, groups=12),
        )
        self.grouped = nn.Conv1d(12, 12, 3, groups=3)
        self.head = nn.Conv1d(12, 4, 9, padding="valid")

    def forward(self, x):
        return self.head(self.grouped(self.body(self.stem(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Mixed().double()


def _x(length: int = 61) -> torch.Tensor:
    return torch.randn(2, 2, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module):
    return [(n, id(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, snapshot) -> None:
    modules, state = snapshot
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------ config


def test_config_validates_and_round_trips():
    for config in (DepthwiseSeparableConfig(), DepthwiseSeparableConfig(3)):
        assert DepthwiseSeparableConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for rank in (0, -1, 2.5, True, "3"):
        with pytest.raises((TypeError, ValueError), match="rank"):
            DepthwiseSeparableConfig(rank)
    with pytest.raises(ValueError, match="unknown keys"):
        DepthwiseSeparableConfig.from_dict({"rank": 2, "ranks": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        DepthwiseSeparableConfig(2).rank = 3


# ------------------------------------------------------------------------------- conversion


def test_full_rank_keeps_outputs_and_gradients_and_reports():
    model, x = _model(), _x()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = to_depthwise_separable_(model, example_inputs=x)
    assert [str(w.message) for w in caught if "grouped" in str(w.message)], "the grouped conv must be warned about"
    assert not [w for w in caught if "stem" in str(w.message) or "body.5" in str(w.message)]

    assert [r.name for r in report.rows] == ["body.0", "body.2", "body.4", "head"]
    assert set(report.skipped) == {"stem", "body.5", "grouped"}
    for name in ("body.0", "body.2", "body.4", "head"):
        assert isinstance(model.get_submodule(name), DepthwiseSeparableConv1d)

    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model(xg), reference(xr)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert relative_error(out, ref) < 1e-10
    assert relative_error(xg.grad, xr.grad) < 1e-10

    assert report.output_sqnr_db > 200
    for row in report.rows:
        assert row.exact and row.rank == min(row.out_channels, row.kernel_size)
        assert row.weight_rel_error < 1e-10 and row.weight_sqnr_db > 200
        assert row.params_after >= row.params_before  # the exact rank costs parameters: a check, not a saving
        assert row.flops_before == 2 * row.in_channels * row.out_channels * row.kernel_size
        assert row.flops_after == 2 * row.in_channels * row.rank * (row.kernel_size + row.out_channels)
        assert row.kept_bytes_before is not None and row.kept_bytes_after is not None
    assert report.params_before == sum(p.numel() for p in reference.parameters())
    assert report.params_after == sum(p.numel() for p in model.parameters())
    text = report.table()
    assert all(name in text for name in ("body.0", "body.2", "body.4", "head", "grouped"))
    assert json.loads(json.dumps(report.to_dict()))["config"] == {"rank": None}


def test_error_falls_as_rank_grows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(6, 8, 7, padding=3)).double()
    x = torch.randn(2, 6, 500, dtype=torch.float64)
    sqnr = [to_depthwise_separable_(copy.deepcopy(model), rank=r, example_inputs=x).output_sqnr_db for r in range(1, 8)]
    assert all(a < b for a, b in zip(sqnr, sqnr[1:]))
    assert sqnr[0] < 20 and sqnr[-1] > 200


def test_kept_bytes_grow_by_the_depthwise_output():
    # NOTE [Depthwise-separable kept memory]: the pointwise conv saves the in*rank-channel
    # depthwise output on top of the input the dense conv kept.
    model = nn.Sequential(nn.GELU(), nn.Conv1d(4, 6, 5, padding=2)).double()
    for rank in (1, 2, 5):
        report = to_depthwise_separable_(copy.deepcopy(model), rank=rank, example_inputs=_x(100).repeat(1, 2, 1))
        (row,) = report.rows
        assert row.kept_bytes_before == 2 * 4 * 100 * 8
        assert row.kept_bytes_after == row.kept_bytes_before * (1 + rank)


def test_low_rank_saves_parameters_and_flops():
    model = nn.Sequential(nn.Conv1d(16, 32, 15, padding=7))
    report = to_depthwise_separable_(model, rank=2)
    (row,) = report.rows
    assert row.params_after < row.params_before / 3 and row.flops_after < row.flops_before / 3
    assert 0 < row.weight_rel_error < 1
    assert report.output_sqnr_db is None and row.kept_bytes_before is None  # no example input


def test_shared_conv_is_replaced_everywhere():
    conv = nn.Conv1d(3, 3, 5, padding=2).double()
    model = nn.Sequential(conv, nn.Tanh(), conv)
    reference = copy.deepcopy(model)
    report = to_depthwise_separable_(model, example_inputs=_x().repeat(1, 2, 1)[:, :3])
    assert len(report.rows) == 1
    assert model[0] is model[2] and isinstance(model[0], DepthwiseSeparableConv1d)
    x = _x().repeat(1, 2, 1)[:, :3]
    assert relative_error(model(x), reference(x)) < 1e-10


def test_conv_subclass_with_its_own_forward_is_left_alone():
    class CausalConv1d(nn.Conv1d):
        def forward(self, x):
            return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))

    model = nn.Sequential(CausalConv1d(2, 4, 3), nn.Conv1d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"'0' untouched: CausalConv1d overrides Conv1d.forward"):
        report = to_depthwise_separable_(model)
    assert [r.name for r in report.rows] == ["1"] and type(model[0]) is CausalConv1d


def test_weight_norm_parametrized_convs_convert_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 5, 7, padding=3)), nn.Tanh()).double()
    reference = copy.deepcopy(model)
    report = to_depthwise_separable_(model, example_inputs=_x()[:, :1].repeat(1, 3, 1))
    assert [r.name for r in report.rows] == ["0"] and report.output_sqnr_db > 200
    x = _x()[:, :1].repeat(1, 3, 1)
    assert relative_error(model(x), reference(x)) < 1e-10


def test_filter_fn_chooses_and_warns_about_what_it_cannot_convert():
    model = _model()
    with pytest.warns(UserWarning, match="kernel_size 1: already pointwise"):
        report = to_depthwise_separable_(model, filter_fn=lambda m, name: name in ("stem", "head"))
    assert [r.name for r in report.rows] == ["head"]
    assert isinstance(model.body[0], nn.Conv1d)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"rank": 0}, ValueError),
        ({"rank": 1.5}, TypeError),
        ({"rank": "2"}, TypeError),
        ({"filter_fn": "head"}, TypeError),
        ({"example_inputs": 3}, TypeError),
        ({"example_inputs": torch.zeros(2, 5, 61, dtype=torch.float64)}, RuntimeError),  # wrong channels
    ],
)
def test_bad_input_raises_and_leaves_the_model_untouched(kwargs, error):
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(error):
        to_depthwise_separable_(model, **kwargs)
    _assert_untouched(model, snapshot)


def test_failure_after_the_swap_is_undone():
    class Functional(nn.Module):
        """Reads self.conv.weight in forward, as third-party code does: a DS module has none."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3).double()

        def forward(self, x):
            return F.conv1d(x, self.conv.weight)

    model = Functional()
    snapshot = _snapshot(model)
    with pytest.raises(AttributeError, match="weight"):
        to_depthwise_separable_(model, example_inputs=_x())
    _assert_untouched(model, snapshot)


def test_filter_that_selects_nothing_warns_with_the_model_name():
    model = _model()
    snapshot = _snapshot(model)
    with pytest.warns(UserWarning, match="filter_fn selected no Conv1d to change in _Mixed"):
        report = to_depthwise_separable_(model, filter_fn=lambda m, name: False)
    assert report.rows == []
    _assert_untouched(model, snapshot)


def test_root_conv_is_refused():
    conv = nn.Conv1d(2, 3, 3)
    with pytest.raises(ValueError, match="from_conv1d"):
        to_depthwise_separable_(conv)


# ------------------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_full_rank_keeps_the_output(name):
    entry = zoo.get(name, size="small", dtype=torch.float64)
    reference = copy.deepcopy(entry.model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = to_depthwise_separable_(entry.model, example_inputs=entry.inputs)
    if name == "conformer_conv":  # only depthwise and 1x1 convs: nothing to convert, and it says so
        assert report.rows == [] and any("no Conv1d to change in" in str(w.message) for w in caught)
        return
    assert report.rows and all(r.exact for r in report.rows)
    with torch.no_grad():
        assert relative_error(entry.model.eval()(*entry.inputs), reference(*entry.inputs)) < 1e-10
    assert report.output_sqnr_db > 200
    assert report.saved_bytes_after >= report.saved_bytes_before  # NOTE [Depthwise-separable kept memory]


@pytest.mark.parametrize("name", [n for n in zoo.names() if n != "conformer_conv"])
def test_zoo_rank_one_reports_sensible_numbers(name):
    entry = zoo.get(name, size="small", dtype=torch.float64)
    report = to_depthwise_separable_(entry.model, rank=1, example_inputs=entry.inputs)
    assert report.rows and all(r.rank == 1 for r in report.rows)
    assert report.params_after < report.params_before
    for r in report.rows:
        if r.full_rank == 1:  # hifigan's last conv has one output channel: rank 1 is its exact rank
            assert r.weight_rel_error < 1e-10
        else:
            assert 0 < r.weight_rel_error < 1 and r.flops_after < r.flops_before
    assert math.isfinite(report.output_sqnr_db) and report.output_sqnr_db < 150
    assert all(r.kept_bytes_after > r.kept_bytes_before for r in report.rows)
