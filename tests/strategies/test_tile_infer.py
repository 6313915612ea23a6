"""convmem.infer_tiled: exact outputs for inputs of any length, streamed tile by tile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from convmem import zoo
from convmem._metrics import relative_error
from convmem.strategies.infer import infer_tiled

TOL = 1e-10


@pytest.mark.parametrize(
    "name, kwargs, length, tile",
    [
        ("hifigan", {"upsample_initial_channel": 32}, 60, 8),
        ("w2v2_fe", {"norm": "layer", "channels": 16}, 6000, 700),
        ("wavenet", {"residual_channels": 8, "gate_channels": 16, "skip_channels": 8, "classes": 16}, 6000, 1024),
    ],
)
def test_equals_the_untiled_model(name, kwargs, length, tile):
    entry = zoo.get(name, batch=2, length=length, dtype=torch.float64, **kwargs)
    model, x = entry.model.eval(), entry.inputs[0]
    with torch.no_grad():
        expected = model(x)
    actual = infer_tiled(model, x, tile)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < TOL


def test_writes_into_out_and_reports_progress(capsys):
    model = nn.Sequential(nn.Conv1d(1, 3, 9, padding=4), nn.Tanh(), nn.Conv1d(3, 2, 4, stride=2)).double()
    x = torch.randn(1, 1, 3001, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    out = torch.full_like(expected, float("nan"))
    result = infer_tiled(model, x, 100, out=out, progress=True)
    assert result is out and relative_error(out, expected) < TOL
    err = capsys.readouterr().err
    assert "infer_tiled: 100%" in err and "30/30 tiles" in err  # the 31st tile has no outputs


def test_no_progress_bar_for_short_inputs(capsys):
    model = nn.Conv1d(1, 1, 3, padding=1)
    infer_tiled(model, torch.randn(1, 1, 500), 100)
    assert capsys.readouterr().err == ""


def test_bad_inputs():
    model = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1), nn.GroupNorm(1, 1))
    with pytest.raises(ValueError, match=r"infer_tiled: cannot tile Sequential: .*'1' \(GroupNorm\)"):
        infer_tiled(model, torch.randn(1, 1, 100), 10)
    conv = nn.Conv1d(1, 1, 3, padding=1)
    with pytest.raises(ValueError, match="tile_length"):
        infer_tiled(conv, torch.randn(1, 1, 100), 0)
    with pytest.raises(ValueError, match="out has shapes"):
        infer_tiled(conv, torch.randn(1, 1, 100), 10, out=torch.empty(1, 1, 99))
    with pytest.raises(TypeError, match="out must be"):
        infer_tiled(conv, torch.randn(1, 1, 100), 10, out="y")
    strided = nn.Conv1d(1, 1, 4, stride=4)
    with pytest.raises(ValueError, match="shorter than its alignment period of 4"):
        infer_tiled(strided, torch.randn(1, 1, 100), 3)


def test_eval_mode_batch_norm_and_buffers_untouched():
    model = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1)).double()
    model[1].running_mean.uniform_()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 2, 777, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    assert relative_error(infer_tiled(model, x, 50), expected) < TOL
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.train()
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        infer_tiled(model, x, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams pinned CPU memory through a GPU")
@pytest.mark.parametrize("channels", [1, 3])
def test_streaming_through_a_gpu_into_pinned_memory(channels):
    # Tile outputs are copied back asynchronously into a pinned, time-contiguous output and
    # synchronously into a strided one (`_may_copy_async`): both must hold every tile once returned.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 9, padding=4), nn.GELU(), nn.Conv1d(8, channels, 5, padding=2)).cuda().eval()
    x = torch.randn(1, 2, 200_003).pin_memory()
    with torch.no_grad():
        expected = model(x.cuda()).cpu()
    actual = infer_tiled(model, x, 4096, progress=False)
    assert actual.device.type == "cpu" and actual.is_pinned()
    assert relative_error(actual, expected) < 1e-5


def test_tile_outputs_are_copied_asynchronously_only_from_a_gpu_into_pinned_contiguous_memory():
    from convmem.nn.tiled import _may_copy_async

    cpu = torch.zeros(1, 1, 10)
    assert not _may_copy_async(cpu, cpu)
    if torch.cuda.is_available():
        gpu, pinned = cpu.cuda(), torch.zeros(1, 3, 10).pin_memory()
        assert not _may_copy_async(pinned[:, :, :5], gpu)  # three channels, a window of time: strided
        assert _may_copy_async(pinned[:, :1, :5], gpu)  # one channel: contiguous
        assert not _may_copy_async(torch.zeros(1, 1, 10), gpu)  # pageable


def test_a_tiling_is_verified_once_per_model_and_checked_again_when_the_model_changes(monkeypatch):
    # NOTE [Verified once per model and tiling]
    from convmem.strategies import infer as module

    calls = []
    check = module.check_tiling
    monkeypatch.setattr(module, "check_tiling", lambda *a, **k: calls.append(1) or check(*a, **k))
    model = nn.Sequential(nn.Conv1d(1, 3, 9, padding=4), nn.Tanh(), nn.Conv1d(3, 1, 5, padding=2)).double()
    x = torch.randn(1, 1, 2000, dtype=torch.float64)
    for length in (2000, 1500):  # another length of the same input kind: the analysis holds
        with torch.no_grad():
            expected = model(x[..., :length])
        assert relative_error(infer_tiled(model, x[..., :length], 300), expected) < TOL
    assert len(calls) == 1
    infer_tiled(model, x, 200)  # another tile length
    assert len(calls) == 2
    model[1] = nn.GELU()  # another structure
    with torch.no_grad():
        expected = model(x)
    assert relative_error(infer_tiled(model, x, 300), expected) < TOL
    assert len(calls) == 3
    infer_tiled(model, x, 300, verify=False)  # verified already: not checked again
    assert len(calls) == 3
