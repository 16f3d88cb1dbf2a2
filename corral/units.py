"""Strict parsing of sizes and CPU amounts given by people.

"256M", "1G", "512MiB", "1073741824" are sizes (binary multiples: M = MiB, as
LXC and the kernel use them); anything else is refused with a clear message.
"""

from __future__ import annotations

import re

from corral.errors import InvalidArgument

# ASCII digits only ([0-9], never \d or str.isdigit(): those take '²' and '١'); matched whole
# (fullmatch: `$` would let a trailing newline through).
_SIZE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)[ \t]*(?P<unit>[KMGTP]?)(?:i?B)?", re.IGNORECASE | re.ASCII)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_MAX_SIZE = 1 << 60
_MAX_TEXT = 64  # longer is no size or CPU amount (and int() refuses over 4300 digits)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from a human size; refuses negatives, unknown units, fractions of a byte."""
    raw = text.strip() if isinstance(text, str) else ""
    match = _SIZE.fullmatch(raw) if len(raw) <= _MAX_TEXT else None
    if not match:
        raise InvalidArgument(
            f"invalid {what} {text!r}: expected a positive number with an optional unit "
            "K, M, G, T (binary, e.g. 256M, 1G, 512MiB)"
        )
    # In integers, exact (a float turns 9007199254740993 into ...992): number * 10^k * factor.
    whole, _, fraction = match["num"].partition(".")
    scaled = int(whole + fraction) * _FACTORS[match["unit"].upper()]
    value, remainder = divmod(scaled, 10 ** len(fraction))
    if remainder:
        raise InvalidArgument(f"invalid {what} {text!r}: not a whole number of bytes")
    if value <= 0 or value > _MAX_SIZE:
        raise InvalidArgument(f"invalid {what} {text!r}: must be more than 0 and at most 1 EiB")
    return value


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


_CPUS = re.compile(r"(?P<whole>[0-9]*)(?:\.(?P<fraction>[0-9]{1,3}))?")
_MILLIS = re.compile(r"(?P<millis>[0-9]+)m")


def parse_cpus(text: str) -> int:
    """CPU amount as thousandths of a CPU: '1' -> 1000, '0.5' -> 500, '250m' -> 250."""
    raw = text.strip() if isinstance(text, str) else ""
    raw = raw if len(raw) <= _MAX_TEXT else ""
    if m := _MILLIS.fullmatch(raw):
        millis = int(m["millis"])
    elif (m := _CPUS.fullmatch(raw)) and (m["whole"] or m["fraction"]):
        millis = int(m["whole"] or "0") * 1000 + int((m["fraction"] or "").ljust(3, "0"))
    else:
        raise InvalidArgument(f"invalid CPU amount {text!r}: expected e.g. 1, 0.5, 2.25 or 250m")
    if millis <= 0 or millis > 1_000_000:
        raise InvalidArgument(f"invalid CPU amount {text!r}: must be more than 0 and at most 1000 CPUs")
    return millis


def format_cpus(millis: int) -> str:
    if millis <= 0:
        return "-"
    return f"{millis / 1000:g}"
