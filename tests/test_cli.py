"""The command line: reports for zoo and user models, one clear line for every user mistake."""
from __future__ import annotations

import contextlib
import io
import json
import re
import warnings

import pytest
import torch

import convmem
from convmem.cli import main, parse_budget_arg


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_zoo_json(capsys):
    code, out, _ = run(capsys, "profile", "zoo:hifigan", "--size", "small", "--json", "--gpu-memory", "1GiB")
    assert code == 0
    d = json.loads(out)
    assert d["estimate"]["peak_bytes"] > 0 and d["max_length"]["samples"] > 0


def test_profile_user_factory_table_and_plot(tmp_path, capsys):
    src = tmp_path / "mymodel.py"
    src.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv1d(2, 8, 5), torch.nn.ReLU())\n")
    plot = tmp_path / "out.png"
    code, out, _ = run(capsys, "profile", f"{src}:build", "--input", "3x2x400", "--plot", str(plot), "--measure")
    assert code == 0 and "estimated CUDA peak" in out and "fwd ms" in out
    assert plot.stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "zoo:nope"], "unknown zoo model 'nope'; choose one of: tcn, wavenet"),
        (["profile", "/no/such/file.py:build", "--input", "1x1x10"], "no such file: /no/such/file.py"),
        (["profile", "zoo:tcn", "--size", "small", "--input", "1x1x10"], "--input is for your own models"),
        (["profile", "zoo:tcn", "--gpu-memory", "lots"], "cannot parse 'lots'"),
    ],
)
def test_usage_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_factory_lists_what_is_defined(tmp_path, capsys):
    src = tmp_path / "m.py"
    src.write_text("def make():\n    pass\n")
    code, _, err = run(capsys, "profile", f"{src}:build", "--input", "1x1x10")
    assert code == 2 and "no callable 'build'" in err and "make" in err


def test_wrong_input_channels(tmp_path, capsys):
    src = tmp_path / "m.py"
    src.write_text("import torch\n\ndef build():\n    return torch.nn.Conv1d(4, 8, 3)\n")
    code, _, err = run(capsys, "profile", f"{src}:build", "--input", "2x3x50")
    assert code == 2 and "expects 4 input channels" in err and "(2, 3, 50)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu(capsys):
    code, _, err = run(capsys, "profile", "zoo:tcn", "--device", "cuda")
    assert code == 2 and "no CUDA GPU is available" in err


def test_env(capsys):
    code, out, _ = run(capsys, "env", "--json")
    info = json.loads(out)
    assert code == 0 and info["torch"] == torch.__version__ and "triton" in info


# ------------------------------------------------------------------------------------ optimize


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One `convmem optimize` run on the meta device with every output: (code, stdout, stderr, folder)."""
    folder = tmp_path_factory.mktemp("optimize")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["optimize", "zoo:tcn", "--budget", "25%", "--device", "meta", "--json", "--no-verify",
                     "--save", str(folder / "plan.json"), "--plot", str(folder / "plan.png")])
    return code, out.getvalue(), err.getvalue(), folder


def test_optimize_json(planned):
    code, out, err, _ = planned
    assert code == 0, err
    data = json.loads(out)  # stdout holds the JSON and nothing else
    assert data["segments"] and data["items"][0] == "blocks.0"
    assert data["estimated_peak_bytes"] <= data["budget_bytes"] == int(0.25 * data["eager_peak_bytes"])
    assert "[convmem optimize_]" in err  # progress goes to stderr


def test_optimize_save_round_trips_and_applies(planned):
    _, out, _, folder = planned
    plan = convmem.Plan.from_json((folder / "plan.json").read_text())
    assert plan.to_dict() == json.loads(out)
    model = convmem.zoo.get("tcn", "small", device="meta").model
    convmem.apply_(model, plan)
    assert any(isinstance(m, convmem.nn.Tiled) for m in model.modules()) == any(
        s.option == "tile" for s in plan.segments)


def test_optimize_plot(planned):
    folder = planned[3]
    assert (folder / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimize_explains_and_verifies(capsys):
    code, out, err = run(capsys, "optimize", "zoo:tcn", "--budget", "0.5", "--allow", "checkpoint", "--device", "meta")
    assert code == 0, err
    assert out.startswith("convmem plan for TCN") and "checkpoint" in out
    assert "exact: output, every gradient and buffer of zoo:tcn" in out and "max relative error" in out


def test_optimize_infeasible_budget(capsys):
    code, out, err = run(capsys, "optimize", "zoo:tcn", "--budget", "64MiB", "--allow", "checkpoint", "--device", "meta")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "smallest feasible budget with these options is" in err
    smallest = re.search(r"try --budget (\d+)MiB", err)
    assert smallest and int(smallest.group(1)) * 2**20 > 64 * 2**20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["zoo:nope", "--budget", "2GiB"], "unknown zoo model 'nope'; choose one of: tcn, wavenet"),
        (["zoo:tcn", "--budget", "lots"], "--budget 'lots': cannot parse the budget 'lots'"),
        (["zoo:tcn", "--budget", "120%"], "a budget in percent must be in (0, 100]"),
        (["zoo:tcn", "--budget", "0"], "--budget '0': cannot parse the budget '0': the budget must be a positive"),
        (["zoo:tcn", "--budget", "2GiB", "--allow", "tile,magic"], "unknown option(s) ['magic'] in allow"),
        (["zoo:tcn", "--budget", "2GiB", "--device", "tpu"], "--device 'tpu': choose cpu or cuda or meta"),
        (["zoo:tcn", "--budget", "2GiB", "--save", "/no/such/folder/plan.json"], "no such folder: /no/such/folder"),
        (["zoo:tcn", "--budget", "2GiB", "--length", "0"], "length must be a positive int"),
    ],
)
def test_optimize_usage_errors(capsys, argv, message):
    code, _, err = run(capsys, "optimize", *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_optimize_needs_a_budget(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "zoo:tcn"])
    assert exit_info.value.code == 2 and "--budget" in capsys.readouterr().err


def test_budget_argument_forms():
    from convmem.strategies.optimize import parse_budget

    # The argument passes through; optimize_ reads a bare number up to 1 as a share of the peak.
    assert parse_budget_arg("0.25") == "0.25" and parse_budget(parse_budget_arg("0.25"), 1000) == 250
    assert parse_budget_arg("25%") == "25%" and parse_budget("25%", 1000) == 250
    assert parse_budget_arg("2GiB") == "2GiB" and parse_budget(parse_budget_arg("4096"), 1000) == 4096


def test_optimize_lossy_reports_the_gradient_error(capsys):
    code = main(["optimize", "zoo:wavenet", "--budget", "40%", "--lossy", "--allow", "checkpoint", "--device", "meta"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "bf16" in out and "LOSSY" in out
    assert re.search(r"LOSSY plan: outputs unchanged, relative gradient error \d\.\d\de[-+]\d\d", err), err


def test_optimize_compile_flag_plans_for_a_compiled_model(capsys, monkeypatch):
    # --compile is optimize_(compiled=True): on a GPU the plan is judged by the compiled step; on the
    # meta device there is nothing compiled to measure and the plan is judged by the estimate.
    from convmem.strategies import optimize as module

    seen = {}
    original = module.optimize_

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "optimize_", spy)
    code, out, err = run(capsys, "optimize", "zoo:tcn", "--budget", "0.5", "--allow", "selective,checkpoint",
                         "--compile", "--device", "meta", "--no-verify")
    assert code == 0, err
    assert seen["compiled"] is True and "measured under torch.compile" not in out
    code, out, err = run(capsys, "optimize", "zoo:tcn", "--budget", "0.5", "--allow", "selective,checkpoint",
                         "--compile", "reduce-overhead", "--device", "meta", "--no-verify")
    assert code == 0, err
    assert seen["compiled"] == "reduce-overhead"
    # the default --allow: the eager-only options are dropped without a word; named, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(capsys, "optimize", "zoo:tcn", "--budget", "0.5", "--compile", "--device", "meta",
                             "--no-verify")
    assert code == 0, err
    with pytest.warns(UserWarning, match="fuse do nothing under torch.compile"):
        run(capsys, "optimize", "zoo:tcn", "--budget", "0.5", "--allow", "checkpoint,fuse", "--compile", "--device",
            "meta", "--no-verify")
