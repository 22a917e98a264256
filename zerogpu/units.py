"""Sizes as people write them: '64MB', '1.5GiB', '4096'. Units are binary: 1GB = 1GiB = 2**30 bytes.

Also the arithmetic that lays bytes out: `round_up` to an alignment.
"""

from __future__ import annotations

import math
import re

from .errors import InvalidArgument

UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in '64MB', '1GB', '1.5GiB', '512MiB', '100m' or a plain number of bytes."""
    match = SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidArgument(f"{what} {text!r} is not a size: write e.g. 64MB, 1GB, 1.5GiB or 4096")
    number, unit = match.groups()
    return int(float(number) * UNITS[unit.lower()])


def describe_size(nbytes: float) -> str:
    """'1.5 GiB', '64 MiB', '512 B'."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= factor:
            return f"{nbytes / factor:.3g} {unit}"
    return f"{int(nbytes)} B"


def check_seconds(value: object, what: str, *, positive: bool = False, finite: bool = True) -> float:
    """`value` if it is a number of seconds (an int or a float, not a bool), else InvalidArgument.

    It must be at least 0, or above 0 when `positive`; never NaN, and infinite
    only when not `finite` (a queue timeout may wait forever).
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or math.isnan(value) or value < 0 or (positive and value == 0) or (finite and math.isinf(value)):
        kind = "positive" if positive else "non-negative"
        raise InvalidArgument(f"{what} must be a {kind} number of seconds, not {value!r}")
    return value


def round_up(value: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least `value`."""
    return -(-value // multiple) * multiple
