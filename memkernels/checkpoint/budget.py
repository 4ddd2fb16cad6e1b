"""Memory budgets: an int of bytes (or a whole-number float, ``2e9``), or a string with a unit.

Decimal units are powers of 1000 (``"2GB"`` = 2,000,000,000 bytes: kB/KB, MB, GB, TB), binary units
powers of 1024 (``"512MiB"`` = 536,870,912 bytes: KiB, MiB, GiB, TiB); ``"B"`` or no unit is bytes.
Units are matched case-insensitively, so ``"2gib"`` is 2 GiB; a fraction is rounded down to a byte.
"""
from __future__ import annotations

import math
import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_budget(budget: int | float | str) -> int:
    """Bytes of `budget`: a non-negative int (or whole float), or a string such as "2GB", "512MiB", "1e9"."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget must be an int of bytes or a string such as '2GB' or '512MiB', "
                        f"got {type(budget).__name__} {budget!r}")
    if isinstance(budget, float):
        if not budget.is_integer():
            raise ValueError(f"budget must be a whole number of bytes, got {budget!r}")
        budget = int(budget)
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        return budget
    match = _PATTERN.match(budget)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"budget {budget!r} is not a number of bytes with an optional unit "
                         f"({', '.join(u for u in ('B', 'kB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))}), "
                         "e.g. '2GB' (2e9 bytes) or '512MiB' (512 * 2**20 bytes)")
    value = float(match.group(1)) * UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"budget {budget!r} is not finite")
    if value < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget!r}")
    return int(value)
