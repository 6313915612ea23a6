"""The no-GPU estimate against CUDA peaks measured on the GPU machine (benchmarks/results).

The measured peaks are data (an H200, docs/BENCHMARKS.md); the estimate is recomputed here, so a
change to the estimator that breaks its accuracy fails CI, not the next GPU session.
"""
from __future__ import annotations

import csv
import os

import pytest
import torch

from convmem import zoo
from convmem.profile import estimate_step

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "anchors.csv")
MEASURED = [r for r in csv.DictReader(open(RESULTS)) if r["status"] == "ok" and r["estimate_bytes"]]


def test_every_zoo_model_was_measured_in_both_precisions():
    assert {(r["model"], r["strategy"]) for r in MEASURED} == {
        (name, strategy) for name in zoo.names() for strategy in ("eager_fp32", "bf16_autocast")
    }


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r['model']}-{r['strategy']}")
def test_estimate_within_5_percent_of_measured_peak(row):
    entry = zoo.get(row["model"], size="default", device="meta")
    autocast = torch.bfloat16 if row["strategy"] == "bf16_autocast" else None
    estimate = estimate_step(entry.model, entry.inputs, entry.loss_fn, autocast_dtype=autocast).peak_bytes
    measured = int(row["peak_bytes"])
    assert abs(estimate - measured) / measured < 0.05, f"estimate {estimate} vs measured {measured} on {row['device']}"
