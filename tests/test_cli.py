"""The command line: reports for zoo and user models, one clear line for every user mistake."""
from __future__ import annotations

import json

import pytest
import torch

from convmem.cli import main


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
