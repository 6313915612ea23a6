"""downsample_: which conv by default, what it reports, and an untouched model on error."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn

from convmem import zoo
from convmem.nn.downsample import DownsampleConv1d
from convmem.strategies.downsample import DownsampleConfig, downsample_


class _Classifier(nn.Module):
    """Defined head-first, run stem-first: definition order is not forward order. Ends in a global pool."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv1d(8, 8, 5, padding=2)
        self.early = nn.Conv1d(2, 8, 9, padding=4)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        return self.pool(self.late(torch.relu(self.early(x)))).flatten(1)


class _Residual(nn.Module):
    """x + conv2(conv1(x)): downsampling conv1 alone breaks the add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.tanh(self.conv1(x)))


def _build(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


def _slow_input(length: int = 400) -> torch.Tensor:
    """Two slow sinusoids and a little noise: mostly below the new Nyquist frequency."""
    t = torch.arange(length, dtype=torch.float64)
    noise = 0.01 * torch.randn(2, 2, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.sin(2 * math.pi * t / 50), torch.cos(2 * math.pi * t / 33)]).expand(2, 2, length) + noise


def _snapshot(model):
    return [(n, id(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    modules, state = snapshot
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_config_validates_and_round_trips():
    for config in (DownsampleConfig(2), DownsampleConfig(4, "lowpass", True)):
        assert DownsampleConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for factor in (0, -1, 1.5, 2.0, True, "2"):
        with pytest.raises((TypeError, ValueError), match="factor"):
            DownsampleConfig(factor)
    with pytest.raises(ValueError, match="mode must be one of"):
        DownsampleConfig(2, "nearest")
    with pytest.raises(TypeError, match="restore_length"):
        DownsampleConfig(2, restore_length=1)
    with pytest.raises(TypeError):
        DownsampleConfig.from_dict({"mode": "avg"})  # factor has no default
    with pytest.raises(dataclasses.FrozenInstanceError):
        DownsampleConfig(2).factor = 3


def test_default_is_the_first_conv_of_the_forward_pass():
    model = _build(_Classifier)
    reference = copy.deepcopy(model)
    x = _slow_input()
    report = downsample_(model, 2, mode="lowpass", example_inputs=x)
    assert [r.name for r in report.rows] == ["early"]
    assert isinstance(model.early, DownsampleConv1d) and type(model.late) is nn.Conv1d
    (row,) = report.rows
    assert (row.input_length_before, row.input_length_after) == (400, 400)  # it sees the raw signal
    assert (row.output_length_before, row.output_length_after) == (400, 200)
    # The global pool keeps the output shape: the error against the original model is reported.
    assert not report.output_shape_changed
    with torch.no_grad():
        expected = 10 * math.log10(reference(x).square().sum() / (model(x) - reference(x)).square().sum())
    assert report.output_sqnr_db == pytest.approx(expected, rel=1e-9)
    assert 0 < report.output_sqnr_db < 200
    assert report.saved_bytes_after < report.saved_bytes_before
    assert "SQNR" in report.table() and json.loads(json.dumps(report.to_dict()))["config"]["factor"] == 2


def test_without_example_inputs_the_default_is_definition_order():
    model = _build(_Classifier)
    report = downsample_(model, 2)
    assert [r.name for r in report.rows] == ["late"]
    assert report.output_sqnr_db is None and report.rows[0].input_length_before is None


def test_sequence_model_reports_the_length_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GELU(), nn.Conv1d(4, 1, 3, padding=1)).double()
    report = downsample_(model, 4, mode="avg", example_inputs=_slow_input(401))
    assert report.output_shapes_before == [[2, 1, 401]] and report.output_shapes_after == [[2, 1, 101]]
    assert report.output_shape_changed and report.output_sqnr_db is None
    assert report.saved_bytes_after < report.saved_bytes_before / 3
    assert "shape changed" in report.table()


def test_convs_in_series_warn_that_factors_multiply():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GELU(), nn.Conv1d(4, 1, 3, padding=1)).double()
    with pytest.warns(UserWarning, match=r"'2' \(400 -> 200 samples in\).*factors multiply"):
        report = downsample_(model, 2, filter_fn=lambda m, name: True, example_inputs=_slow_input())
    assert report.output_shapes_after == [[2, 1, 100]]


def test_parallel_branches_do_not_warn():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(2, 3, 5, padding=2)

        def forward(self, x):
            return self.a(x) * self.b(x)

    model = _build(TwoBranches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = downsample_(model, 2, filter_fn=lambda m, name: True, example_inputs=_slow_input())
    assert report.output_shapes_after == [[2, 3, 200]]


def test_a_model_that_breaks_is_put_back():
    model = _build(_Residual)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"no longer runs .*\['conv1'\].*model is unchanged"):
        downsample_(model, 2, example_inputs=_slow_input())
    _assert_untouched(model, snapshot)


def test_restore_length_keeps_every_shape():
    model = _build(_Residual)
    reference = copy.deepcopy(model)
    x = _slow_input()
    report = downsample_(model, 2, mode="lowpass", example_inputs=x, restore_length=True)
    assert not report.output_shape_changed
    assert model(x).shape == reference(x).shape
    assert 10 < report.output_sqnr_db < 200


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"factor": 0}, ValueError),
        ({"factor": 1.5}, TypeError),
        ({"factor": 2, "mode": "median"}, ValueError),
        ({"factor": 2, "filter_fn": 3}, TypeError),
        ({"factor": 2, "example_inputs": {"x": 1}}, TypeError),
    ],
)
def test_bad_input_raises_and_leaves_the_model_untouched(kwargs, error):
    model = _build(_Classifier)
    snapshot = _snapshot(model)
    with pytest.raises(error):
        downsample_(model, **kwargs)
    _assert_untouched(model, snapshot)


def test_filter_that_selects_nothing_warns_with_the_model_name():
    model = _build(_Classifier)
    snapshot = _snapshot(model)
    with pytest.warns(UserWarning, match="filter_fn selected no Conv1d to change in _Classifier"):
        report = downsample_(model, 2, filter_fn=lambda m, name: name == "nothing")
    assert report.rows == []
    _assert_untouched(model, snapshot)


def test_conv_subclass_with_its_own_forward_is_left_alone():
    class Causal(nn.Conv1d):
        def forward(self, x):
            return super().forward(torch.nn.functional.pad(x, (2, 0)))

    model = nn.Sequential(Causal(1, 2, 3))
    with pytest.warns(UserWarning) as caught:
        report = downsample_(model, 2)
    messages = [str(w.message) for w in caught]
    assert any("'0' untouched: Causal overrides Conv1d.forward" in m for m in messages)
    assert any("found no Conv1d to change in Sequential" in m for m in messages)
    assert report.rows == [] and type(model[0]) is Causal


def test_root_conv_is_refused():
    with pytest.raises(ValueError, match="DownsampleConv1d"):
        downsample_(nn.Conv1d(1, 2, 3), 2)


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_first_conv(name):
    entry = zoo.get(name, size="small", dtype=torch.float64)
    snapshot = _snapshot(entry.model)
    try:
        report = downsample_(entry.model, 2, mode="lowpass", example_inputs=entry.inputs)
    except ValueError as error:
        # Conv-TasNet trims its output to the input's length; Conformer's first conv sits inside
        # a residual block. Either way the model must be left as it was.
        assert name in ("convtasnet", "conformer_conv"), error
        _assert_untouched(entry.model, snapshot)
    else:
        (row,) = report.rows
        assert row.output_length_after < row.output_length_before
        assert report.saved_bytes_after < report.saved_bytes_before
        if name == "resnet1d":  # global average pool: same output shape, so an SQNR
            assert not report.output_shape_changed and math.isfinite(report.output_sqnr_db)
        else:
            assert report.output_shape_changed and report.output_sqnr_db is None


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_restore_length_keeps_the_output_shape(name):
    entry = zoo.get(name, size="small", dtype=torch.float64)
    report = downsample_(entry.model, 2, mode="avg", example_inputs=entry.inputs, restore_length=True)
    assert len(report.rows) == 1
    assert not report.output_shape_changed and math.isfinite(report.output_sqnr_db)
