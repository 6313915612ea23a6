"""Byte sizes: parsing user input and printing reports. MiB/GiB are powers of two (2**20, 2**30)."""
from __future__ import annotations

import re
from typing import Union

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Union[int, float, str]) -> int:
    """Bytes from an int or a string with units: ``"80GiB"``, ``"1.5 GB"``, ``"512MiB"``, ``4096``.

    Decimal units (KB, MB, GB, TB) are powers of ten, binary units (KiB, MiB, GiB, TiB) powers of two.
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a byte count cannot be negative: {value!r}")
        return int(value)
    match = _PATTERN.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse {value!r} as a size in bytes; write a number with an optional unit, "
            "e.g. '80GiB', '1.5GB', '512MiB' or '4096'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: Union[int, float, None]) -> str:
    """``1.50 GiB``-style text; MiB and GiB are 2**20 and 2**30 bytes."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
