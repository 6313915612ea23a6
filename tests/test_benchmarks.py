"""The benchmark scripts run without a GPU: the optimize bench end to end on a small model (the
estimate stands in for the allocator), and the report renders every section from the committed CSVs."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)


def _optimize_bench(*args: str) -> subprocess.CompletedProcess:
    # A process of its own: the bench imports its siblings (harness, strategies) by bare name, and
    # "strategies" is also the name of a test package here.
    script = os.path.join(BENCHMARKS, "optimize.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600)


def test_optimize_bench_measures_anchors_then_plans_at_shares_and_at_anchors(tmp_path):
    done = _optimize_bench(str(tmp_path), "--device", "cpu", "--size", "small", "--models", "tcn", "--repeats", "1",
                           "--anchors", "torch_checkpoint_blocks", "--match", "torch_checkpoint_blocks",
                           "--budgets", "0.9", "--no-floor")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "optimize.csv") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["eager_fp32", "torch_checkpoint_blocks", "convmem_plan_0.9", "convmem_at_torch_checkpoint_blocks"]
    assert rows["eager_fp32"]["status"] == "ok" and rows["eager_fp32"]["regime"] == "fp32"
    plan = rows["convmem_plan_0.9"]
    assert plan["status"] == "ok" and int(plan["peak_bytes"]) <= int(plan["budget_bytes"])
    assert int(plan["budget_bytes"]) == int(0.9 * int(rows["eager_fp32"]["peak_bytes"]))
    matched = rows["convmem_at_torch_checkpoint_blocks"]
    assert matched["status"] in ("ok", "infeasible")
    assert int(matched["budget_bytes"]) == int(0.99 * int(rows["torch_checkpoint_blocks"]["peak_bytes"]))


def test_optimize_bench_rejects_unknown_anchors(tmp_path):
    done = _optimize_bench(str(tmp_path), "--device", "cpu", "--match", "eager_fp64")
    assert done.returncode == 2 and "unknown anchors ['eager_fp64']" in done.stderr


def test_report_renders_every_section_from_the_committed_results():
    import report

    for name, render in report.SECTIONS.items():
        assert isinstance(render(), str), name
    assert re.search(r"Dominated: \d+ of \d+ anchors\.", report.dominance_table())


def test_an_fp32_anchor_is_met_only_by_exact_fp32_plans():
    import report

    assert report.comparable("eager_fp32", "fp32+compile")
    assert not report.comparable("compile_default", "bf16+compile")
    assert report.comparable("bf16_autocast", "bf16")
