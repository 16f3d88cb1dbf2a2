"""Strict parsing of sizes and CPU amounts given by people.

"256M", "1G", "512MiB", "1073741824" are sizes (binary multiples: M = MiB, as
LXC and the kernel use them); anything else is refused with a clear message.
"""

from __future__ import annotations

import re

from corral.errors import InvalidArgument

_SIZE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGTP]?)(?:i?B)?$", re.IGNORECASE)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_MAX_SIZE = 1 << 60


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from a human size; refuses negatives, unknown units, fractions of a byte."""
    raw = text.strip() if isinstance(text, str) else ""
    match = _SIZE.match(raw)
    if not match:
        raise InvalidArgument(
            f"invalid {what} {text!r}: expected a positive number with an optional unit "
            "K, M, G, T (binary, e.g. 256M, 1G, 512MiB)"
        )
    value = float(match["num"]) * _FACTORS[match["unit"].upper()]
    if value != int(value):
        raise InvalidArgument(f"invalid {what} {text!r}: not a whole number of bytes")
    if value <= 0 or value > _MAX_SIZE:
        raise InvalidArgument(f"invalid {what} {text!r}: must be more than 0 and at most 1 EiB")
    return int(value)


def format_size(n: int) -> str:
    """Short human form: 268435456 -> '256M'."""
    if n <= 0:
        return "-"
    for unit in ("P", "T", "G", "M", "K"):
        factor = _FACTORS[unit]
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


_CPUS = re.compile(r"^(?:[0-9]+(?:\.[0-9]{1,3})?|\.[0-9]{1,3})$")


def parse_cpus(text: str) -> int:
    """CPU amount as thousandths of a CPU: '1' -> 1000, '0.5' -> 500, '250m' -> 250."""
    raw = text.strip() if isinstance(text, str) else ""
    if raw.endswith("m") and raw[:-1].isdigit():
        millis = int(raw[:-1])
    elif _CPUS.match(raw):
        millis = round(float(raw) * 1000)
    else:
        raise InvalidArgument(f"invalid CPU amount {text!r}: expected e.g. 1, 0.5, 2.25 or 250m")
    if millis <= 0 or millis > 1_000_000:
        raise InvalidArgument(f"invalid CPU amount {text!r}: must be more than 0 and at most 1000 CPUs")
    return millis


def format_cpus(millis: int) -> str:
    if millis <= 0:
        return "-"
    return f"{millis / 1000:g}"
