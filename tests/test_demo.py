"""`make demo` end to end on the CPU: profile, plan, verify exact gradients, compare, explain, plot."""
from __future__ import annotations

import copy

import pytest
import torch

import convmem
from convmem.cli import main
from convmem.demo import before_after, verify_plan


def test_demo_end_to_end(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    code = main(["demo", "--device", "cpu", "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert code == 0, err
    for step in ("[1/5] profile", "[2/5] plan", "[3/5] verify exact gradients", "[4/5] before and after", "[5/5] the plan"):
        assert step in out
    assert "exact: output, every gradient and buffer of zoo:tcn" in out and "tolerance 1e-10" in out
    assert "convmem plan for TCN" in out and "peak, estimated" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def checkpoint_plan():
    entry = convmem.zoo.get("tcn", "default", device="meta")
    return convmem.optimize_(entry.model, *entry.inputs, budget=0.5, loss_fn=entry.loss_fn, allow=("checkpoint",))


def test_verify_plan_catches_a_plan_that_changes_numbers(monkeypatch, checkpoint_plan):
    plan = checkpoint_plan
    assert verify_plan("tcn", plan).exact
    # A "strategy" that is not exact: the optimized model's first block scaled by 1 + 1e-6.
    real_apply = convmem.demo.apply_

    def apply_and_perturb(model, plan):
        real_apply(model, plan)
        with torch.no_grad():
            next(model.parameters()).mul_(1 + 1e-6)
        return model

    monkeypatch.setattr(convmem.demo, "apply_", apply_and_perturb)
    check = verify_plan("tcn", plan)
    assert not check.exact and check.max_error > 1e-10 and "NOT EXACT" in check.summary()


def test_before_after_without_measurements(checkpoint_plan):
    plan = checkpoint_plan
    text = before_after(plan)
    assert "peak, estimated" in text and "peak, measured" not in text and "step time (modelled)" in text
    measured = copy.copy(plan)
    measured.eager_measured_peak_bytes, measured.measured_peak_bytes = 2 * 2**30, 2**30
    assert "50% of the untouched step's memory (measured)" in before_after(measured)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--model", "nope"], "unknown zoo model 'nope'"),
    (["demo", "--budget", "lots"], "--budget 'lots'"),
])
def test_demo_usage_errors(capsys, argv, message):
    assert main(argv) == 2 and message in capsys.readouterr().err
