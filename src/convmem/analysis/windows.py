"""Tile windows: which slice of the input each tile runs on, and which outputs it keeps.

# NOTE [Tiling halo]
# Tiles partition the *input* axis into runs of `tile_length` samples (a multiple of the alignment
# period P); tile k owns the outputs j whose anchor ``j * stride`` falls in its run, the last tile
# also every output past the input's end (a conv's padding can make outputs there). Its window is
# sized from those outputs: from the first input the first output needs to the last input the last
# output needs (NOTE [Validity ranges] in trace.py: "needs" includes the inputs that must exist for
# an output to exist, so trimming transposed convs and flooring strided convs are covered). The
# window's start is rounded down to a multiple of P, its length up to whole periods (skip
# connections across a down- and up-sampling then see equal lengths), both clamped to the sequence:
# at the sequence's true ends the window's padding is the untiled run's padding. The halo is thus
# only as large as the receptive field needs, and each window's outputs outside the tile's own range
# are cropped.
#
# NOTE [Aligned windows]
# Where the sequence allows, a window of 256 samples or more is also a multiple of 8 samples long
# (of lcm(8, P)): some more context on the right (or, at the sequence's end, on the left), cropped
# like the rest; shorter windows, where 7 more samples would be a larger share, are left as they
# are. GPU convolution kernels pick slower code paths for lengths that are not: on an H200 a tcn
# training step on 8,702 samples took 16.2-16.3 ms and on 8,704 samples 13.6-15.0 ms (two runs), and
# 8,702 is the length of the first and last windows of 8,192-sample tiles with tcn's 510-sample
# halos. Aligning to 32, 128 or 512 samples measured the same as 8.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Tuple

from .receptive_field import ReceptiveField

__all__ = ["Window", "plan_windows"]

_ALIGN = 8  # window lengths in multiples of this many samples where they can be (NOTE [Aligned windows])
_ALIGN_FROM = 256  # for windows at least this long


@dataclasses.dataclass(frozen=True)
class Window:
    """One tile: run the module on input ``[start, stop)``; for every output ``(offset, first, count)``:
    window output positions ``offset .. offset + count`` are full output positions ``first ..``."""

    start: int
    stop: int
    crops: Tuple[Tuple[int, int, int], ...]


def plan_windows(rf: ReceptiveField, length: int, tile_length: int) -> List[Window]:
    """Windows covering every output of a `length`-sample input, tiles of `tile_length` input samples.

    `tile_length` must be a positive multiple of ``rf.period``. Example: a stack with halo 2 + 2
    and stride 1, length 10, tiles of 4 -> windows [0, 6), [2, 10), [6, 10) keeping outputs
    [0, 4), [4, 8), [8, 10).
    """
    period = rf.period
    if tile_length < period or tile_length % period:
        raise ValueError(f"tile_length {tile_length} must be a positive multiple of the alignment period {period}")
    out_lengths = rf.output_lengths(length)
    align = period * _ALIGN // math.gcd(period, _ALIGN)
    tiles = max(1, math.ceil(length / tile_length))
    windows = []
    for k in range(tiles):
        first_needed, last_needed, ranges = None, None, []
        for omap, out_length in zip(rf.outputs, out_lengths):
            begin = min(out_length, int(k * tile_length / omap.stride))
            end = out_length if k == tiles - 1 else min(out_length, int((k + 1) * tile_length / omap.stride))
            ranges.append((begin, end))
            if end > begin:
                low, high = omap.needs(begin)[0], omap.needs(end - 1)[1]
                first_needed = low if first_needed is None else min(first_needed, low)
                last_needed = high if last_needed is None else max(last_needed, high)
        if first_needed is None:
            continue
        start = min(max(0, first_needed // period * period), (length - 1) // period * period)
        stop = min(length, last_needed + 1)
        while True:  # start only falls and stop only rises: this settles
            settled = (start, stop)
            if start == 0:  # the sequence's ends: reflect/replicate padding reads inwards (NOTE [Edge reads])
                stop = max(stop, rf.edge_stop(length))
            if stop == length:
                start = min(start, rf.edge_start(length) // period * period)
            stop = min(length, start - (-(stop - start) // period) * period)  # whole periods
            aligned = -(-(stop - start) // align) * align  # NOTE [Aligned windows]
            if stop - start >= _ALIGN_FROM:
                if start + aligned <= length:
                    stop = start + aligned
                elif stop == length and stop - aligned >= 0 and (stop - aligned) % period == 0:
                    start = stop - aligned
            # A window the module rejects (a kernel longer than a short intermediate) grows to one it takes.
            while not rf.valid_length(stop - start) and stop < length:
                stop = min(length, stop + period)
            while not rf.valid_length(stop - start) and start > 0:
                start -= period
            if (start, stop) == settled:
                break
        span = stop - start
        crops = tuple(
            (begin - int(start / omap.stride), begin, end - begin) for (begin, end), omap in zip(ranges, rf.outputs)
        )
        if windows and (windows[-1].start, windows[-1].stop) == (start, start + span):
            # Halos longer than the input give identical windows: run them once.
            previous = windows.pop()
            crops = tuple((a[0], a[1], a[2] + b[2]) for a, b in zip(previous.crops, crops))
        windows.append(Window(start, start + span, crops))
    return windows
