"""Command line: ``convmem profile | demo | env``.

Errors a user can cause (a bad model spec, an input the model rejects, a device that is not
there) print one clear line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import zoo
from ._units import format_bytes, parse_bytes

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class UsageError(Exception):
    """A mistake in what the user asked for; printed without a traceback."""


# ------------------------------------------------------------------------------- model specs


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"8x1x160000"`` -> ``(8, 1, 160000)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input {text!r}: write a shape as sizes joined by 'x', e.g. 8x1x160000") from None
    if not shape or any(n < 1 for n in shape):
        raise UsageError(f"--input {text!r}: every size must be a positive integer")
    return shape


def load_factory(spec: str):
    """``path/to/file.py:factory`` -> the callable ``factory`` defined in that file."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"{spec!r}: write a model as zoo:NAME or path/to/file.py:factory")
    if not os.path.isfile(path):
        raise UsageError(f"{spec!r}: no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_convmem_user_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"{spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UsageError(f"{spec!r}: {path} defines no callable {name!r} (it defines: {', '.join(defined) or 'none'})")
    return factory


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA GPU is available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu, which "
            "still gives the no-GPU estimate of a CUDA step"
        )
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: choose cpu or cuda")
    return torch.device(name)


def build(args) -> Tuple[nn.Module, tuple, Optional[callable], Optional[int], str]:
    """(model, inputs, loss_fn, sample_rate, title) for a ``zoo:NAME`` or ``file.py:factory`` spec."""
    dtype = DTYPES[args.dtype]
    if args.model.startswith("zoo:"):
        name = args.model[len("zoo:"):]
        if name not in zoo.names():
            raise UsageError(f"unknown zoo model {name!r}; choose one of: {', '.join(zoo.names())}")
        if args.input:
            raise UsageError("--input is for your own models; for a zoo model use --batch and --length")
        entry = zoo.get(name, size=args.size, batch=args.batch, length=args.length)
        entry.to(dtype=dtype)
        return entry.model, entry.inputs, entry.loss_fn, entry.sample_rate, f"zoo:{name} ({args.size})"
    factory = load_factory(args.model)
    if not args.input:
        raise UsageError(f"{args.model}: give the input shape of your model, e.g. --input 8x1x160000")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{args.model} returned {type(model).__name__}, not an nn.Module")
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(parse_shape(s), generator=generator, dtype=dtype) for s in args.input)
    return model.to(dtype=dtype), inputs, None, args.sample_rate, args.model


# ---------------------------------------------------------------------------------- commands


def cmd_profile(args) -> int:
    from .profile import profile

    device = resolve_device(args.device)
    model, inputs, loss_fn, sample_rate, title = build(args)
    model = model.to(device)
    inputs = tuple(x.to(device) for x in inputs)
    try:
        prof = profile(
            model, *inputs, loss_fn=loss_fn, autocast=AUTOCAST.get(args.autocast) if args.autocast else None,
            measure=args.measure or device.type == "cuda",
            gpu_memory=args.gpu_memory, sample_rate=args.sample_rate or sample_rate,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    prof.model = title
    if args.json:
        print(prof.to_json(indent=2))
    else:
        print(prof.table(top=args.top))
    if args.plot:
        prof.plot(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_env(args) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def environment() -> dict:
    """Versions and devices, as ``convmem env`` prints them and benchmark rows record them."""
    from . import __version__

    info = {
        "convmem": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "not built with CUDA",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA GPU)",
    }
    if torch.cuda.is_available():
        info["gpu_memory"] = format_bytes(torch.cuda.get_device_properties(0).total_memory)
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is None:
        info["triton"] = "not installed"
    else:
        import triton

        info["triton"] = triton.__version__
    info["triton_interpreter"] = "on" if os.environ.get("TRITON_INTERPRET") == "1" else "off"
    return info


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out)


# ------------------------------------------------------------------------------------ parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convmem", description="Where a Conv1d model's GPU memory goes, and how to cut it.")
    sub = p.add_subparsers(dest="command", required=True)

    prof = sub.add_parser("profile", help="per-module memory of one training step")
    prof.add_argument("model", help=f"zoo:NAME ({', '.join(zoo.names())}) or path/to/file.py:factory")
    prof.add_argument("--size", choices=("small", "default"), default="default", help="zoo input size")
    prof.add_argument("--batch", type=int, help="zoo: batch size")
    prof.add_argument("--length", type=int, help="zoo: input length (samples; mel frames for hifigan)")
    prof.add_argument("--input", action="append", default=[], help="your model: input shape such as 8x1x160000 (repeat for several inputs)")
    prof.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    prof.add_argument("--autocast", choices=sorted(AUTOCAST), help="profile under CUDA autocast")
    prof.add_argument("--device", default="cpu", help="cpu (estimate only; default) or cuda (measured too)")
    prof.add_argument("--measure", action="store_true", help="also run the real step on --device (times on CPU)")
    prof.add_argument("--gpu-memory", help="the longest input that fits this much, e.g. 80GiB")
    prof.add_argument("--sample-rate", type=float, help="samples per second, to say lengths in seconds")
    prof.add_argument("--top", type=int, default=15, help="rows in the table")
    prof.add_argument("--json", action="store_true", help="print the profile as JSON")
    prof.add_argument("--plot", help="write a PNG here")
    prof.set_defaults(func=cmd_profile)

    env = sub.add_parser("env", help="versions, device, triton")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=cmd_env)

    demo = sub.add_parser("demo", help="the main job: profile a zoo model and show where its memory goes")
    demo.add_argument("--out", default="out", help="folder for the plots")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "gpu_memory", None):
        try:
            parse_bytes(args.gpu_memory)
        except ValueError as error:
            print(f"convmem: error: --gpu-memory: {error}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except UsageError as error:
        print(f"convmem: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
