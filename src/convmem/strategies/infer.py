"""Exact inference on inputs of any length in bounded GPU memory: ``convmem.infer_tiled(model, x, tile_length)``.

# NOTE [Streaming inference]
# The input may live in (pinned) CPU memory and the model on a GPU: each window (tile + halo) is
# copied to the model's device, run under no_grad, and its own outputs are copied back into the
# full-length output, which lives with the input (pinned too when the input is) or is the `out`
# the caller gives. The GPU then holds the weights and one window's activations, whatever the
# length: hours of audio through a vocoder, a chromosome through a genomics tower. Copies from
# pinned memory are asynchronous, and so are the copies of each tile's output into a pinned output
# (contiguous along time: a (batch 1, channel 1) waveform): the CPU queues the next tile's kernels
# while the GPU still runs this one, instead of waiting for every tile's copy back. The device is
# synchronized once, before the output is returned. The tiling is analysed, probed and verified on a
# prefix of the input first, as for `convmem.nn.Tiled`.
#
# NOTE [Verified once per model and tiling]
# The check runs the model untiled and tiled on a prefix of two tiles and more: on an hour of audio
# through HiFi-GAN (H200) it is a seventh of the whole call (2.70 s with it, 2.32 s without, at
# 8192-frame tiles). A script that runs many files through one model pays it once: the analysis is
# kept per model (weakly) and per what it depends on -- tile length, time axis, the input's other
# dims, dtype and device, and every submodule's name, class and train/eval mode -- and a call that
# matches a verified one reuses it. Weights may change between calls (they do not change which
# positions an output depends on); a changed structure or mode is checked again.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..analysis.windows import plan_windows
from ..nn.tiled import _Runner, check_tile_length, check_tiling
from ..profile.step import model_device
from ._common import check_model

__all__ = ["infer_tiled"]

_STRATEGY = "infer_tiled"
_PROGRESS_TILES = 16  # inputs of at least this many tiles show a progress bar by default
# model -> {what the check depends on -> its analysis}: NOTE [Verified once per model and tiling]
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, Dict[Hashable, Any]]" = weakref.WeakKeyDictionary()


class _Progress:
    """A progress bar on stderr: tqdm's when it is installed, else a one-line counter."""

    def __init__(self, total: int, tiles: int):
        self.total, self.tiles, self.done, self.shown = total, tiles, 0, -1
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="sample", unit_scale=True, desc=_STRATEGY, file=sys.stderr)

    def __call__(self, stop: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(stop - self.bar.n)
            return
        percent = 100 * stop // max(self.total, 1)
        if percent != self.shown:
            self.shown = percent
            sys.stderr.write(f"\r{_STRATEGY}: {percent:3d}% ({self.done}/{self.tiles} tiles, {stop:,}/{self.total:,} samples)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


def infer_tiled(
    model: nn.Module,
    x: torch.Tensor,
    tile_length: int,
    out: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    *,
    length_axis: int = -1,
    progress: Optional[bool] = None,
    verify: bool = True,
) -> Any:
    """``model(x)`` for an `x` of any length, exactly, holding one tile's activations at a time.

    Args:
        model: a length-local model (NOTE [Streaming inference]); run in its current mode, so call
            ``model.eval()`` first (BatchNorm is local in eval mode only; an active Dropout is
            refused). Runs under ``torch.no_grad()``.
        x: ``(batch, channels, length)`` or ``(batch, length)``, on the model's device or in
            (preferably pinned) CPU memory.
        tile_length: input samples per tile; rounded down to a multiple of the model's alignment
            period. Larger tiles waste less on halos; the GPU must hold one tile's activations.
        out: where to write the output (a tensor, or one per tensor output of the model), on any
            device; default: allocated beside `x` (pinned when `x` is).
        length_axis: the time axis of `x`.
        progress: show a progress bar on stderr (default: for inputs of 16 tiles or more).
        verify: verify the tiling against the untiled model on a prefix of `x` first (once per
            model and tiling: NOTE [Verified once per model and tiling]).

    Returns what ``model(x)`` returns, its tensors on `x`'s device (or `out`).
    Raises ValueError, naming the submodule and the reason, for a model that is not length-local.

    Example::

        >>> vocoder = convmem.zoo.get("hifigan").model.cuda().eval()
        >>> mel = torch.randn(1, 80, 1_000_000).pin_memory()       # ~3 hours of audio, in CPU memory
        >>> audio = convmem.infer_tiled(vocoder, mel, tile_length=2048)   # (1, 1, 256_000_000) on the CPU
    """
    check_model(model, _STRATEGY)
    tile_length = check_tile_length(tile_length)
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise TypeError(f"{_STRATEGY}: x must be a sequence tensor, got {type(x).__name__}")
    if isinstance(out, torch.Tensor):
        out = [out]
    elif out is not None and not (isinstance(out, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in out)):
        raise TypeError(f"{_STRATEGY}: out must be a tensor or a sequence of tensors, got {type(out).__name__}")
    axis = length_axis % x.ndim
    device = model_device(model, [x])
    key = _check_key(model, x, axis, tile_length, device)
    rf = _VERIFIED.get(model, {}).get(key)
    if rf is None:
        rf, problem = check_tiling(model, x, (), {}, axis, tile_length, verify, device=device)
        if problem is not None:
            raise ValueError(f"{_STRATEGY}: cannot tile {type(model).__name__}: {problem}")
        if verify:
            _VERIFIED.setdefault(model, {})[key] = rf

    windows = plan_windows(rf, x.shape[axis], tile_length // rf.period * rf.period)
    runner = _Runner(model, rf, windows, axis, (), {})
    pinned = x.device.type == "cpu" and device.type != "cpu" and x.is_pinned()
    bar = _Progress(x.shape[axis], len(windows)) if (progress if progress is not None else len(windows) >= _PROGRESS_TILES) else None
    try:
        with torch.no_grad():
            outs = runner.forward(
                x, [], outs=out,
                move=(lambda w: w.to(device, non_blocking=pinned)) if x.device != device else None,
                allocate=lambda shape, dtype: torch.empty(shape, dtype=dtype, device=x.device, pin_memory=pinned),
                progress=bar,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except ValueError as error:
        raise ValueError(f"{_STRATEGY}: {error}") from None
    finally:
        if bar is not None:
            bar.close()
    return runner.unflatten(outs)


def _check_key(model: nn.Module, x: torch.Tensor, axis: int, tile_length: int, device: torch.device) -> Tuple:
    """What the check of NOTE [Verified once per model and tiling] depends on."""
    others = tuple(n for i, n in enumerate(x.shape) if i != axis)
    structure = tuple((name, type(m), m.training) for name, m in model.named_modules())
    return tile_length, axis, x.ndim, others, x.dtype, str(device), structure
