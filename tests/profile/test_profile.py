"""convmem.profile: kept bytes add up, the model is left as found, bad input fails clearly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.weak import WeakIdKeyDictionary

import convmem
from convmem import zoo
from convmem.profile import estimate_step
from convmem.profile.step import default_loss
from convmem.profile.recorder import LOSS_ROW


def saved_bytes_seen_by_hooks(model, inputs, loss_fn=None):
    """The reference: every storage autograd saves, once, minus parameters, buffers and inputs."""
    resident = WeakIdKeyDictionary()
    for t in list(model.parameters()) + list(model.buffers()) + [x for x in inputs if isinstance(x, torch.Tensor)]:
        resident[t.untyped_storage()] = True
    seen = WeakIdKeyDictionary()
    total = [0]

    def pack(t):
        s = t.untyped_storage()
        if s not in resident and s not in seen:
            seen[s] = True
            total[0] += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
        loss = (loss_fn or default_loss)(out)
    loss.backward()
    return total[0]


class Functional(nn.Module):
    """Functional calls in forward, a parameter used directly, a module called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 5, padding=2)
        self.shared = nn.Conv1d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1))

    def forward(self, x):
        h = F.gelu(self.conv(x)) * self.scale
        h = self.shared(h) + h
        h = self.shared(torch.tanh(h))
        return F.avg_pool1d(h, 2)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Sequential(parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1)), nn.ReLU()),
                          nn.Identity())
            for _ in range(3)
        )
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.pool(x)


OTHER_STYLES = {
    "functional": (Functional, (2, 3, 37)),
    "nested_weight_norm": (Nested, (2, 4, 29)),
    "parameter_free": (lambda: nn.Sequential(nn.ReLU(), nn.MaxPool1d(3), nn.Tanh()), (2, 4, 31)),
}


def _sum_rows(prof):
    return sum(r.kept_bytes for r in prof.rows)


@pytest.mark.parametrize("name", zoo.names())
def test_kept_bytes_add_up_on_zoo(name):
    entry = zoo.get(name, dtype=torch.float64)
    prof = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn)
    expected = saved_bytes_seen_by_hooks(entry.model, entry.inputs, entry.loss_fn)
    assert expected > 0
    assert _sum_rows(prof) == expected == prof.kept_bytes


@pytest.mark.parametrize("style", sorted(OTHER_STYLES))
def test_kept_bytes_add_up_on_other_styles(style):
    factory, shape = OTHER_STYLES[style]
    model = factory().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=style == "parameter_free")
    prof = convmem.profile(model, x)
    assert _sum_rows(prof) == saved_bytes_seen_by_hooks(model, (x,))


def test_module_called_twice_has_two_rows():
    model = Functional().double()
    prof = convmem.profile(model, torch.randn(2, 3, 37, dtype=torch.float64))
    labels = [r.label for r in prof.rows]
    assert labels.count("shared") == 1 and labels.count("shared#2") == 1
    assert prof.rows[-1].label == LOSS_ROW
    # Functional ops of the root (gelu, * scale, tanh, pool) are charged to the root row.
    assert next(r for r in prof.rows if r.name == "").kept_bytes > 0


def test_saved_tensor_counted_once_across_modules():
    # The input of both `a` and `b` is the same tensor: both convs save it, it counts once.
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv1d(2, 2, 1)
            self.a, self.b = nn.Conv1d(2, 2, 3), nn.Conv1d(2, 2, 3)

        def forward(self, x):
            h = self.pre(x)
            return self.a(h) + self.b(h)

    model = Fork().double()
    x = torch.randn(1, 2, 50, dtype=torch.float64)
    prof = convmem.profile(model, x)
    by_name = {r.label: r.kept_bytes for r in prof.rows}
    assert by_name["a"] == 50 * 2 * 8 and by_name["b"] == 0
    assert _sum_rows(prof) == saved_bytes_seen_by_hooks(model, (x,))


def _snapshot(model, optimizer=None):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
    }


def _assert_same_snapshot(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grads"]:
        assert (a["grads"][k] is None) == (b["grads"][k] is None), k
        if a["grads"][k] is not None:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert str(a["optimizer"]) == str(b["optimizer"])


@pytest.mark.parametrize("name", ["resnet1d", "conformer_conv", "basenji"])
def test_profile_leaves_model_unchanged(name):
    entry = zoo.get(name, dtype=torch.float64)
    model = entry.model
    model.train()
    # Odd state on purpose: a frozen parameter, existing grads, one submodule in eval mode.
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for p in params[1:4]:
        p.grad = torch.randn_like(p)
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d)).eval()
    optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=0.1)
    before = _snapshot(model, optimizer)
    prof = convmem.profile(model, *entry.inputs, loss_fn=entry.loss_fn, optimizer=optimizer, measure=True)
    assert prof.measured is not None and prof.estimate.optimizer_bytes >= 0
    _assert_same_snapshot(before, _snapshot(model, optimizer))


def test_running_stats_would_change_without_restore():
    # Guards the test above: a training step does move BatchNorm statistics.
    entry = zoo.get("resnet1d", dtype=torch.float64)
    before = _snapshot(entry.model)
    entry.loss_fn(entry.model(*entry.inputs)).backward()
    after = _snapshot(entry.model)
    assert any(not torch.equal(before["state"][k], after["state"][k]) for k in before["state"] if "running" in k)


def test_estimate_breakdown_adds_up_and_autocast_halves_activations():
    entry = zoo.get("tcn", size="default", device="meta")
    fp32 = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    parts = (fp32.resident_bytes + fp32.kept_bytes + fp32.grad_bytes + fp32.optimizer_bytes
             + fp32.transient_bytes + fp32.workspace_bytes)
    assert parts == fp32.peak_bytes
    bf16 = estimate_step(entry.model, entry.inputs, entry.loss_fn, autocast_dtype=torch.bfloat16)
    assert 0.45 < bf16.saved_bytes / fp32.saved_bytes < 0.55


def test_max_length_is_linear_and_fits():
    entry = zoo.get("tcn", size="default", device="meta")
    prof = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, gpu_memory="16GiB", sample_rate=16000)
    ml = prof.max_length
    assert ml.samples > entry.inputs[0].shape[-1]  # 12.5 GiB at 65536 samples: more fits in 16 GiB
    from convmem.profile.capacity import resize_length

    fits = estimate_step(entry.model, resize_length(entry.inputs, ml.samples), entry.loss_fn).peak_bytes
    too_long = estimate_step(entry.model, resize_length(entry.inputs, int(ml.samples * 1.01)), entry.loss_fn).peak_bytes
    assert fits <= 16 * 2**30 < too_long
    assert ml.seconds == pytest.approx(ml.samples / 16000)


def test_table_dict_and_plot(tmp_path):
    entry = zoo.get("wavenet")
    prof = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, measure=True)
    text = prof.table(top=5)
    assert "estimated CUDA peak" in text and "total kept" in text and "more module calls" in text
    d = prof.to_dict()
    assert d["estimate"]["peak_bytes"] == prof.estimate.peak_bytes and len(d["rows"]) == len(prof.rows)
    assert any(r["forward_s"] for r in d["rows"])
    prof.to_json()
    path = prof.plot(str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000 and path.endswith("p.png")


def test_wrong_channels_names_expected_channels():
    entry = zoo.get("tcn")
    bad = torch.randn(2, 3, 100)
    with pytest.raises(ValueError, match=r"expects 1 input channels.*\(2, 3, 100\)"):
        convmem.profile(entry.model, bad)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        convmem.profile(lambda x: x, torch.randn(1))
    with pytest.raises(ValueError, match="at least one example input"):
        convmem.profile(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="cannot parse"):
        convmem.profile(nn.Conv1d(1, 1, 1), torch.randn(1, 1, 8), gpu_memory="lots")


def test_recompute_is_not_kept_and_tiles_share_a_row():
    # A tiled model recomputes in backward and runs each module once per tile in forward: the
    # recompute keeps nothing, and the per-tile calls collapse into one row per module.
    from convmem.nn import Tiled

    entry = zoo.get("tcn", length=8192)
    eager = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn)
    # forward_tile_length: forward in tiles too (by default this 8192-sample input is one forward window).
    tiled = convmem.profile(Tiled(entry.model, 1024, forward_tile_length=1024), *entry.inputs, loss_fn=entry.loss_fn)
    assert tiled.kept_bytes <= tiled.estimate.peak_bytes
    assert tiled.estimate.peak_bytes < eager.estimate.peak_bytes / 2
    names = [r.label for r in tiled.rows]
    assert len(names) == len(set(names)) + 1  # the wrapper and the model it wraps are both "(model)"
    assert max(r.calls for r in tiled.rows) > 1
    assert not any("wrapped" in n for n in names)


def test_backward_times_can_be_switched_off():
    entry = zoo.get("hifigan")
    timed = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, measure=True)
    untimed = convmem.profile(entry.model, *entry.inputs, loss_fn=entry.loss_fn, measure=True, backward_times=False)
    assert any(r.backward_s for r in timed.rows)
    assert all(r.backward_s is None for r in untimed.rows) and any(r.forward_s for r in untimed.rows)
    assert untimed.kept_bytes == timed.kept_bytes
