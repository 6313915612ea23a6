"""The benchmark scripts run without a GPU: the optimize bench end to end on a small model (the
estimate stands in for the allocator), and the report renders every section from the committed CSVs."""
from __future__ import annotations

import csv
import importlib
import os
import re
import subprocess
import sys
import warnings

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)


def _bench_module(name: str):
    """benchmarks/<name>.py imported here, with the benchmarks' own ``strategies`` module: under a
    name also taken by the test package tests/strategies, which pytest may have imported first."""
    saved = sys.modules.pop("strategies", None)
    sys.modules.pop(name, None)
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)  # the first occurrence: the one put there above
        sys.modules.pop("strategies", None)
        if saved is not None:
            sys.modules["strategies"] = saved


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


def test_optimize_bench_plans_at_the_share_of_the_anchor_asked_for(tmp_path):
    done = _optimize_bench(str(tmp_path), "--device", "cpu", "--size", "small", "--models", "tcn", "--repeats", "1",
                           "--anchors", "torch_checkpoint_blocks", "--match", "torch_checkpoint_blocks",
                           "--budgets", "", "--no-floor", "--match-share", "0.999")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "optimize.csv") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    anchor = int(rows["torch_checkpoint_blocks"]["peak_bytes"])
    assert int(rows["convmem_at_torch_checkpoint_blocks"]["budget_bytes"]) == int(0.999 * anchor)
    for share in ("0", "1.5"):
        done = _optimize_bench(str(tmp_path / share), "--device", "cpu", "--match-share", share)
        assert done.returncode == 2 and "--match-share must be in (0, 1]" in done.stderr


def test_report_renders_every_section_from_the_committed_results():
    import report

    for name, render in report.SECTIONS.items():
        assert isinstance(render(), str), name
    assert re.search(r"Dominated: \d+ of \d+ anchors\.", report.dominance_table())


def test_plan_text_groups_the_options_and_brackets_every_swap_the_bench_labels():
    import report

    note = ("budget 1 B; predicted 2 B, extra 3.0 ms (measured on X); judged 4 B at 5.00 ms; planned in 6 s; "
            "checkpointx1+checkpointx1+keepx1; 7 max-pools compact; 16 Conv1d on the depthwise kernel; "
            "1 Conv1d as a matmul")
    assert report._plan_text(note) == ("checkpoint x2, keep (7 max-pools compact, 16 Conv1d on the depthwise kernel, "
                                       "1 Conv1d as a matmul)")


def test_an_fp32_anchor_is_met_only_by_exact_fp32_plans():
    import report

    assert report.comparable("eager_fp32", "fp32+compile")
    assert not report.comparable("compile_default", "bf16+compile")
    assert report.comparable("bf16_autocast", "bf16")


def _row(**fields) -> dict:
    base = {"model": "m", "strategy": "eager_fp32", "status": "ok", "peak_bytes": str(2**30), "step_ms": "10.0",
            "time": "2026-01-01T00:00:00", "input_shape": "1x1x8", "device": "card", "note": ""}
    return {**base, **fields}


def test_the_strategy_table_takes_the_newest_eager_row_of_any_bench(monkeypatch):
    import report

    csvs = {
        "anchors": [_row(step_ms="20.0", time="2026-01-03T00:00:00")],
        "compile": [_row(step_ms="30.0", time="2026-01-02T00:00:00"), _row(strategy="compile_default", step_ms="10.0")],
        "strategies": [_row(step_ms="40.0", time="2026-01-01T00:00:00"), _row(strategy="convmem_x", step_ms="22.0")],
    }
    monkeypatch.setattr(report, "read", lambda name: csvs.get(name, []))
    table = report.strategy_table("anchors", "compile", "strategies", only={"compile_default", "convmem_x"})
    assert "| eager_fp32 | 1.000 | 1.00x | 20.0 | 1.00x |" in table
    assert "| convmem_x | 1.000 | 1.00x | 22.0 | 1.10x |" in table and "| compile_default |" in table


def test_dominance_takes_each_anchor_at_its_best_over_every_bench(monkeypatch):
    import plot
    import report

    runs = {
        "optimize": [_row(strategy="compile_default", step_ms="12.0", regime="fp32+compile"),
                     _row(strategy="convmem_at_compile_default", step_ms="11.0", peak_bytes=str(2**29),
                          regime="fp32+compile")],
        "compile": [_row(strategy="compile_default", step_ms="10.5")],  # faster in another bench's run
    }
    monkeypatch.setattr(plot, "rows_of_every_run", lambda name, statuses=("ok",): runs.get(name, []))
    monkeypatch.setattr(report, "plan_rows", lambda: [runs["optimize"][1]])
    table = report.dominance_table()
    assert "| m | compile_default | 1.000 | 10.5 | (none that fast) |" in table
    assert table.endswith("Dominated: 0 of 1 anchors.")


def test_the_matched_table_keeps_the_newest_measured_plan_over_a_later_failure(monkeypatch):
    import plot
    import report

    anchor = dict(strategy="compile_default", step_ms="12.0", regime="fp32+compile")
    plan = dict(strategy="convmem_at_compile_default", regime="fp32+compile")
    rows = [_row(run="1", **anchor), _row(run="1", step_ms="11.0", peak_bytes=str(2**29), **plan),
            _row(run="2", time="2026-01-02T00:00:00", **anchor),
            _row(run="2", time="2026-01-02T00:00:00", status="timeout", peak_bytes="", step_ms="", **plan)]

    def every_run(name, statuses=("ok",)):
        return [r for r in rows if statuses is None or r["status"] in statuses] if name == "optimize" else []

    monkeypatch.setattr(plot, "rows_of_every_run", every_run)
    monkeypatch.setattr(report, "rows_of_every_run", every_run)
    table = report.matched_table()
    assert "| 0.500 | 11.0 | yes |" in table and "timeout" not in table
    rows.pop(1)  # never measured: the failure shows
    assert "| m | compile_default | 1.000 | 12.0 | fp32+compile: timeout | - | - | no |" in report.matched_table()


def test_the_fused_recompute_probe_is_exact():
    # benchmarks/fused_recompute_probe.py: its measured configuration must compute what the model does.
    import fused_recompute_probe

    fused_recompute_probe.check()  # float64, three steps: gradients, parameters, BatchNorm statistics


def test_a_row_compiled_after_a_budget_row_runs_without_that_budget():
    # The compile anchors set Inductor's activation memory budget process-wide; the harness puts it
    # back between rows (a compact_pools run had measured selective blocks compiled under budget 0.5).
    import torch._functorch.config as functorch_config

    import harness

    functorch_config.activation_memory_budget = 0.5  # as strategies.compiled(0.5) leaves it
    harness.free_between_rows()
    assert functorch_config.activation_memory_budget == 1.0


def _plan_probe(out_dir, *args: str) -> subprocess.CompletedProcess:
    script = os.path.join(BENCHMARKS, "plan_probe.py")  # a process of its own: see _optimize_bench
    return subprocess.run([sys.executable, script, str(out_dir), "--device", "cpu", "--size", "small",
                           "--model", "w2v2_fe", "--repeats", "1", *args], capture_output=True, text=True, timeout=600)


def test_the_plan_probe_refuses_a_plan_it_cannot_read_before_measuring_anything(tmp_path):
    for plans, said in (("chunk4;tile64", "'tile64' is not keep"), ("chunk", "'chunk' is not keep"),
                        (",".join(["keep"] * 8), "names 8 blocks; the model has 7")):
        done = _plan_probe(tmp_path, "--anchor", "torch_checkpoint_blocks", "--plans", plans)
        assert done.returncode == 2 and said in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "plan_probe.csv").exists()


def test_the_plan_probe_computes_as_conv2d_only_the_convs_named(tmp_path):
    done = _plan_probe(tmp_path, "--plans", "keep", "--conv2d", "yes", "--conv2d-only",
                       "conv_layers.1.,conv_layers.2.")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "plan_probe.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["conv2d"] == "2 convs" and row["status"] == "ok"
    done = _plan_probe(tmp_path / "none", "--plans", "keep", "--conv2d", "yes", "--conv2d-only", "trunk.")
    assert done.returncode == 2 and "names no Conv1d of w2v2_fe" in done.stderr


def test_probe_rows_are_written_with_the_machine_in_front_and_every_column(tmp_path):
    import harness

    path = tmp_path / "probe.csv"
    harness.write_rows(str(path), {"bench": "probe", "device": "cpu"}, [{"ms": 1.5, "model": "tcn"}, {"phase": "b"}])
    with open(path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["bench", "device", "model", "ms", "phase"]
    assert rows == [{"bench": "probe", "device": "cpu", "model": "tcn", "ms": "1.5", "phase": ""},
                    {"bench": "probe", "device": "cpu", "model": "", "ms": "", "phase": "b"}]


def test_the_plan_probe_measures_each_plan_in_each_layout_beside_its_anchor(tmp_path):
    done = _plan_probe(tmp_path, "--anchor", "torch_checkpoint_blocks", "--plans", "chunk1,checkpoint",
                       "--conv2d", "both", "--chunks", "both")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "plan_probe.csv") as f:
        rows = list(csv.DictReader(f))
    plan = "chunk1,checkpoint"
    assert [(r["strategy"], r["plan"], r["conv2d"], r["compiled_chunks"]) for r in rows] == [
        ("torch_checkpoint_blocks", "", "", ""), ("probe_compiled", plan, "False", "False"),
        ("probe_compiled", plan, "False", "True"), ("probe_compiled", plan, "True", "False"),
        ("probe_compiled", plan, "True", "True")]
    assert all(r["status"] == "ok" and float(r["step_ms"]) > 0 for r in rows)


def test_the_plan_probe_measures_anchors_and_plans_in_turn_with_the_swaps_asked_for(tmp_path):
    done = _plan_probe(tmp_path, "--anchor", "torch_checkpoint_blocks,eager_fp32", "--plans", "checkpoint*2",
                       "--conv2d", "no", "--swaps", "matmul,pools", "--rounds", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "plan_probe.csv") as f:
        rows = list(csv.DictReader(f))
    in_turn = [("torch_checkpoint_blocks", "", ""), ("eager_fp32", "", ""),
               ("probe_compiled", "checkpoint*2", "matmul,pools")]
    assert [(r["strategy"], r["plan"], r["swaps"]) for r in rows] == in_turn * 2
    assert [r["round"] for r in rows] == ["0"] * 3 + ["1"] * 3
    done = _plan_probe(tmp_path / "bad", "--plans", "keep", "--swaps", "matmul,tiles")
    assert done.returncode == 2 and "--swaps 'tiles'" in done.stderr


def test_the_plan_probe_swaps_each_conv_one_way_and_repeats_an_option_over_blocks():
    from torch import nn

    plan_probe = _bench_module("plan_probe")

    model = nn.Sequential(nn.Conv1d(2, 16, 3, dilation=2, padding=2), nn.Conv1d(16, 16, 3, dilation=2, padding=2),
                          nn.MaxPool1d(2))
    swaps = plan_probe.swaps_of(model, ["matmul", "phases", "pools"])
    assert swaps == {"convs_as_matmul": ["0"], "convs_by_phases": ["1"], "pools": ["2"]}
    segments = plan_probe.parse_plan("selective*2,checkpoint", 4)
    assert [s.option for s in segments] == ["selective", "selective", "checkpoint", "keep"]


def test_the_dilation_probe_swaps_what_each_implementation_names():
    from convmem import zoo

    dilation_probe = _bench_module("dilation_probe")

    counts = {}
    for impl in dilation_probe.IMPLS:
        model = zoo.get("basenji", size="small", device="meta").model
        with warnings.catch_warnings():  # fuse_ says when it finds no depthwise conv
            warnings.simplefilter("ignore")
            counts[impl] = dilation_probe.swap(model, impl)
    # 31 Conv1ds: the stem, 6 in the tower, 11 residual blocks of a dilated and a 1x1, 2 in the head;
    # the first residual block's dilation is 1, and nothing is depthwise
    assert counts == {"as_is": 0, "depthwise": 0, "phases": 10, "phases16": 4, "matmul": 1, "conv2d": 31,
                      "conv2d_undilated": 7, "nhwc_undilated": 7}


def test_the_dilation_probe_refuses_an_implementation_it_does_not_know(tmp_path):
    script = os.path.join(BENCHMARKS, "dilation_probe.py")
    done = subprocess.run([sys.executable, script, str(tmp_path), "--impls", "as_is,fastest"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--impls fastest" in done.stderr, done.stderr[-2000:]
