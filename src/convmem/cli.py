"""Command line: ``convmem profile | optimize | demo | env``.

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
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import zoo
from ._units import format_bytes, parse_bytes
from .plan.costs import OPTIONS
from .strategies.optimize import COMPILE_MODES

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


def resolve_device(name: str, choices: Sequence[str] = ("cpu", "cuda")) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA GPU is available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device "
            f"{'meta' if 'meta' in choices else 'cpu'}, which still gives the no-GPU estimate of a CUDA step"
        )
    if name not in choices:
        raise UsageError(f"--device {name!r}: choose {' or '.join(choices)}")
    return torch.device(name)


def zoo_name(spec: str) -> Optional[str]:
    """``zoo:NAME`` -> NAME (checked), a ``file.py:factory`` spec -> None."""
    if not spec.startswith("zoo:"):
        return None
    name = spec[len("zoo:"):]
    if name not in zoo.names():
        raise UsageError(f"unknown zoo model {name!r}; choose one of: {', '.join(zoo.names())}")
    return name


def build(args, device: Optional[torch.device] = None) -> Tuple[nn.Module, tuple, Optional[callable], Optional[int], str]:
    """(model, inputs, loss_fn, sample_rate, title) for a ``zoo:NAME`` or ``file.py:factory`` spec,
    on the CPU, or on `device` (a zoo model on "meta" allocates nothing)."""
    dtype = DTYPES[args.dtype]
    name = zoo_name(args.model)
    if name is not None:
        if args.input:
            raise UsageError("--input is for your own models; for a zoo model use --batch and --length")
        try:
            entry = zoo.get(name, size=args.size, batch=args.batch, length=args.length, device=device)
        except ValueError as error:
            raise UsageError(str(error)) from None
        entry.to(dtype=dtype)
        return entry.model, entry.inputs, entry.loss_fn, entry.sample_rate, f"zoo:{name} ({args.size})"
    factory = load_factory(args.model)
    if not args.input:
        raise UsageError(f"{args.model}: give the input shape of your model, e.g. --input 8x1x160000")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{args.model} returned {type(model).__name__}, not an nn.Module")
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(parse_shape(s), generator=generator, dtype=dtype).to(device) for s in args.input)
    return model.to(device=device, dtype=dtype), inputs, None, getattr(args, "sample_rate", None), args.model


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


def parse_allow(text: str) -> Tuple[str, ...]:
    """``"tile,checkpoint"`` -> the options `optimize_` may use, checked by its own config."""
    from .strategies.optimize import OptimizeConfig

    allow = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return OptimizeConfig(allow=allow).allow
    except (TypeError, ValueError) as error:
        raise UsageError(f"--allow {text!r}: {str(error).replace('optimize_: ', '')}") from None


def parse_budget_arg(text: str):
    """``"2GiB"``, ``"1.5GB"`` or ``"25%"`` as they are, a bare number up to 1 as a fraction of the
    untouched peak (``"0.25"``), a larger one as bytes; checked before any work starts."""
    from .strategies.optimize import parse_budget

    try:
        parse_budget(text, 2**40)  # reads bare numbers as parse_budget does: up to 1 a fraction
    except (TypeError, ValueError) as error:
        raise UsageError(f"--budget {text!r}: {str(error).replace('optimize_: ', '')}") from None
    return text


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_optimize(args) -> int:
    from .demo import plot_plan, verify_plan
    from .profile.measure import measure_step
    from .strategies.optimize import InfeasibleBudget, optimize_

    allow = parse_allow(args.allow)
    budget = parse_budget_arg(args.budget)
    for flag, path in (("--save", args.save), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise UsageError(f"{flag} {path}: no such folder: {folder}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'convmem[plot]'")
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    else:
        device = resolve_device(args.device, ("cpu", "cuda", "meta"))
    autocast = AUTOCAST.get(args.autocast) if args.autocast else None
    name = zoo_name(args.model)
    model, inputs, loss_fn, _, title = build(args, device)
    if device.type == "meta":
        _stderr("convmem optimize: no GPU in use: planning on the meta device (nothing allocated); peaks are "
                "the no-GPU estimate of a CUDA step, times are modelled")

    eager_measured = None
    if device.type == "cuda":
        _stderr("[convmem optimize] measuring the untouched step")
        try:
            eager_measured = measure_step(model, inputs, loss_fn, None, autocast, device, backward_times=False).peak_bytes
        except torch.cuda.OutOfMemoryError:
            _stderr("[convmem optimize] the untouched step does not fit this GPU: no measurement before")
            torch.cuda.empty_cache()
    try:
        plan = optimize_(model, *inputs, budget=budget, loss_fn=loss_fn, allow=allow, autocast=autocast,
                         lossy=args.lossy, compiled=args.compile, progress=True)
    except InfeasibleBudget as error:
        print(f"convmem: error: {error}", file=sys.stderr)
        print(f"convmem: the smallest feasible budget is {_format_budget(error.min_bytes)}: try --budget "
              f"{_format_budget(error.min_bytes)}", file=sys.stderr)
        return 2
    except ValueError as error:
        raise UsageError(str(error)) from None
    plan.eager_measured_peak_bytes = eager_measured

    verification = None
    lossy = any(seg.option == "bf16" for seg in plan.segments)
    if args.verify and name is not None and lossy:
        from .demo import lossy_error

        error = lossy_error(name, plan)
        _stderr(f"[convmem optimize] LOSSY plan: outputs unchanged, relative gradient error {error:.2e} (L2, all "
                f"gradients) on zoo:{name} at its small size, float64 on the CPU")
    elif args.verify and name is not None:
        _stderr(f"[convmem optimize] verifying exact gradients on zoo:{name} at its small size, float64 on the CPU")
        verification = verify_plan(name, plan)
        if args.json:
            _stderr(verification.summary())
    elif args.verify:
        _stderr("[convmem optimize] exact-gradient check skipped: it needs a small input of the model (zoo models "
                "only); compare outputs and gradients in your tests with convmem.apply_(fresh_model, plan)")

    if args.save:
        with open(args.save, "w") as f:
            f.write(plan.to_json())
        _stderr(f"plan written to {args.save}; in a training script: "
                f"convmem.apply_(model, convmem.Plan.from_json(open({args.save!r}).read()))")
    if args.plot:
        try:
            plot_plan(plan, args.plot, title=f"convmem optimize {title}: budget {format_bytes(plan.budget_bytes)}, "
                                             f"planned on {device.type}")
        except ImportError as error:
            raise UsageError(str(error)) from None
        _stderr(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.explain())
        if verification is not None:
            print("\n".join("  " + line for line in verification.summary().splitlines()))
    if verification is not None and not verification.exact:
        _stderr(f"convmem: error: the plan is not exact on zoo:{name} ({verification.max_error:.3g} in "
                f"{verification.worst}); please report this")
        return 1
    return 0


def _format_budget(n: int) -> str:
    """Bytes as a --budget value that parses back to at least `n` (MiB, rounded up)."""
    return f"{-(-n // 2**20)}MiB"


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

    zoo_name(f"zoo:{args.model}")
    budget = parse_budget_arg(args.budget)
    if args.device is not None:
        resolve_device(args.device)
    return run_demo(model=args.model, budget=budget, plot=args.plot or None, device=args.device)


# ------------------------------------------------------------------------------------ parser


def _model_arguments(sub: argparse.ArgumentParser, autocast_help: str) -> None:
    """The model and its example input, as `build` reads them (profile and optimize alike)."""
    sub.add_argument("model", help=f"zoo:NAME ({', '.join(zoo.names())}) or path/to/file.py:factory")
    sub.add_argument("--size", choices=("small", "default"), default="default", help="zoo input size")
    sub.add_argument("--batch", type=int, help="zoo: batch size")
    sub.add_argument("--length", type=int, help="zoo: input length (samples; mel frames for hifigan)")
    sub.add_argument("--input", action="append", default=[],
                     help="your model: input shape such as 8x1x160000 (repeat for several inputs)")
    sub.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    sub.add_argument("--autocast", choices=sorted(AUTOCAST), help=autocast_help)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convmem", description="Where a Conv1d model's GPU memory goes, and how to cut it.")
    sub = p.add_subparsers(dest="command", required=True)

    prof = sub.add_parser("profile", help="per-module memory of one training step")
    _model_arguments(prof, autocast_help="profile under CUDA autocast")
    prof.add_argument("--device", default="cpu", help="cpu (estimate only; default) or cuda (measured too)")
    prof.add_argument("--measure", action="store_true", help="also run the real step on --device (times on CPU)")
    prof.add_argument("--gpu-memory", help="the longest input that fits this much, e.g. 80GiB")
    prof.add_argument("--sample-rate", type=float, help="samples per second, to say lengths in seconds")
    prof.add_argument("--top", type=int, default=15, help="rows in the table")
    prof.add_argument("--json", action="store_true", help="print the profile as JSON")
    prof.add_argument("--plot", help="write a PNG here")
    prof.set_defaults(func=cmd_profile)

    opt = sub.add_parser(
        "optimize", help="plan a training step to a memory budget, apply it, verify exact gradients",
        description="Profile a model, choose per block keep / selective / checkpoint / tile / offload so that one "
                    "training step fits --budget at the least extra time, verify on a small float64 copy that the "
                    "plan changes no number, and explain it (docs/optimize.md).",
    )
    _model_arguments(opt, autocast_help="plan the step under CUDA autocast")
    opt.add_argument("--budget", required=True,
                     help="peak bytes such as 2GiB or 1.5GB, or a share of the untouched peak: 25%% or 0.25")
    opt.add_argument("--allow", default=",".join(OPTIONS),
                     help="options the planner may use, comma-separated (default: all exact ones)")
    opt.add_argument("--device", help="cuda (measures before and after), meta (plans from the estimate, allocates "
                                      "nothing) or cpu; default: cuda if there is a GPU, else meta")
    opt.add_argument("--lossy", action="store_true",
                     help="also allow bfloat16 saved activations per block (gradients change, outputs do not)")
    opt.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                     choices=COMPILE_MODES,
                     help="the model will train under torch.compile (in MODE, e.g. reduce-overhead, whose CUDA "
                          "graphs' pool then counts): on a GPU, judge the plan by the compiled step")
    opt.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip the exact-gradient check on a small float64 copy (zoo models)")
    opt.add_argument("--json", action="store_true", help="print the plan as JSON (Plan.to_dict) and nothing else")
    opt.add_argument("--plot", help="write a PNG here: kept bytes per block before and after, peaks and budget")
    opt.add_argument("--save", help="write the plan here as JSON, for convmem.apply_ in a training script")
    opt.set_defaults(func=cmd_optimize)

    env = sub.add_parser("env", help="versions, device, triton")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=cmd_env)

    demo = sub.add_parser("demo", help="the main job: profile a zoo model, plan it to a budget, verify, explain")
    demo.add_argument("--model", default="tcn", help=f"zoo model ({', '.join(zoo.names())}); default tcn")
    demo.add_argument("--budget", default="25%", help="share of the untouched peak or bytes; default 25%%")
    demo.add_argument("--plot", default="convmem_demo.png", help="where the PNG goes (empty: no plot)")
    demo.add_argument("--device", help="cuda or cpu (default: cuda if there is a GPU)")
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
