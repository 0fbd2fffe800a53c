"""Sizes and durations as people write them in YAML: ``"130MB"``, ``"4Gi"``, ``"250ms"``.

Documents carry human units; the models carry plain ``int`` bytes and ``float``
seconds. Parsing is strict on purpose: ``"12XB"`` or ``"fast"`` must be an error
that names the accepted units, never a silent default. SI prefixes are powers of
10 (``MB`` = 10**6 bytes), binary prefixes powers of 2 (``MiB``/``Mi`` = 2**20), as
in Kubernetes quantities.
"""

from __future__ import annotations

import math
import re

from faastube.errors import InvalidRequest

from faastube_spec.documents import INT_MAX, preview

# Sizes travel as signed 64-bit integers (the wire protocol, Kubernetes quantities).
MAX_SIZE_BYTES = INT_MAX

SIZE_UNITS_BYTES: dict[str, int] = {
    "": 1,
    "B": 1,
    "k": 10**3, "K": 10**3, "kB": 10**3, "KB": 10**3,
    "M": 10**6, "MB": 10**6,
    "G": 10**9, "GB": 10**9,
    "T": 10**12, "TB": 10**12,
    "Ki": 2**10, "KiB": 2**10,
    "Mi": 2**20, "MiB": 2**20,
    "Gi": 2**30, "GiB": 2**30,
    "Ti": 2**40, "TiB": 2**40,
}

DURATION_UNITS_S: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_QUANTITY = re.compile(r"^\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµ]*)\s*$")


class UnitError(InvalidRequest, ValueError):
    """A size or duration could not be parsed; the message says what is accepted."""


def parse_size(value: str | int) -> int:
    """Bytes from an ``int`` or a string such as ``"130MB"``, ``"4Gi"``, ``"512KiB"``.

    Zero is accepted here; callers that need a positive size check it themselves.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UnitError(f"size must be an integer number of bytes or a string like '130MB', "
                        f"got {type(value).__name__} {preview(value)}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"size must not be negative, got {preview(value)}")
        if value > MAX_SIZE_BYTES:
            raise UnitError(f"size {preview(value)} is larger than {MAX_SIZE_BYTES:,} bytes (2**63 - 1)")
        return value
    match = _QUANTITY.match(value)
    if match is None:
        raise UnitError(f"cannot parse size {preview(value)}: expected a number and a unit, e.g. '130MB', "
                        "'4Gi', '512KiB'")
    number, unit = match.groups()
    if unit not in SIZE_UNITS_BYTES:
        raise UnitError(f"unknown size unit {preview(unit)} in {preview(value)}; use one of "
                        f"{', '.join(u for u in SIZE_UNITS_BYTES if u)}")
    amount = float(number) * SIZE_UNITS_BYTES[unit]
    if amount < 0:
        raise UnitError(f"size must not be negative, got {preview(value)}")
    if not math.isfinite(amount) or amount > MAX_SIZE_BYTES:
        raise UnitError(f"size {preview(value)} is larger than {MAX_SIZE_BYTES:,} bytes (2**63 - 1)")
    size_bytes = round(amount)
    if abs(size_bytes - amount) > 1e-6 * max(1.0, amount):
        raise UnitError(f"size {preview(value)} is not a whole number of bytes")
    return size_bytes


def parse_duration(value: str) -> float:
    """Seconds from a string such as ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"500us"``.

    A unit is required: a bare ``1`` could mean seconds or milliseconds, and an SLO
    off by a factor of 1000 is worse than an error. Zero is accepted here; callers
    that need a positive duration check it themselves.
    """
    if not isinstance(value, str):
        raise UnitError(f"duration must be a string with a unit, e.g. '250ms' or '1.5s', "
                        f"got {type(value).__name__} {preview(value)}")
    match = _QUANTITY.match(value)
    if match is None:
        raise UnitError(f"cannot parse duration {preview(value)}: expected a number and a unit, "
                        "e.g. '250ms', '1.5s', '2m', '500us'")
    number, unit = match.groups()
    if unit == "":
        shown = number if len(number) <= 20 else "1"
        raise UnitError(f"duration {preview(value)} has no unit; write e.g. '{shown}s' or '{shown}ms'")
    if unit not in DURATION_UNITS_S:
        raise UnitError(f"unknown duration unit {preview(unit)} in {preview(value)}; use one of "
                        f"{', '.join(DURATION_UNITS_S)}")
    seconds = float(number) * DURATION_UNITS_S[unit]
    if seconds < 0:
        raise UnitError(f"duration must not be negative, got {preview(value)}")
    if not math.isfinite(seconds):
        raise UnitError(f"duration {preview(value)} is not finite")
    return seconds


_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kMGT]?)(B|b|bps)?(/s)?\s*")
_RATE_PREFIXES = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_rate(value: str) -> float:
    """Bytes per second from ``"25Gb/s"``, ``"400Gbps"`` (bits), ``"3GB/s"`` (bytes) or a
    plain number of bytes per second. SI prefixes only: link speeds are quoted that way."""
    match = _RATE.fullmatch(value) if isinstance(value, str) else None
    if match is None or (match[3] is None and match[2]):
        raise UnitError(f"not a rate: {preview(value)} (e.g. 25Gb/s, 3GB/s or 3000000000)")
    rate = float(match[1]) * _RATE_PREFIXES[match[2]]
    if match[3] in ("b", "bps"):
        rate /= 8
    if rate <= 0:
        raise UnitError(f"a rate must be > 0, got {preview(value)}")
    return rate


def format_size(size_bytes: int) -> str:
    """The shortest exact SI or binary spelling (``130000000`` -> ``"130MB"``)."""
    if size_bytes <= 0:
        return str(size_bytes)
    for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "kB"):
        factor = SIZE_UNITS_BYTES[unit]
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return str(size_bytes)


def human_size(size_bytes: int) -> str:
    """For people: the exact spelling when there is a short one (``"130MB"``, ``"8GiB"``), else
    three significant digits of the largest binary unit (``"88.8GiB"``, not ``"90930MiB"``)."""
    if size_bytes < 1024:
        return f"{size_bytes}B"
    exact = format_size(size_bytes)
    if exact != str(size_bytes) and int(exact.rstrip("BKMGTikb")) < 1000:
        return exact
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = SIZE_UNITS_BYTES[unit]
        if size_bytes >= factor:
            return f"{size_bytes / factor:.3g}{unit}"
    return f"{size_bytes}B"  # unreachable: size_bytes >= 1024 here


def format_duration(seconds: float) -> str:
    """A spelling ``parse_duration`` reads back to the same value (``0.25`` -> ``"250ms"``)."""
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        amount = seconds / factor
        if amount >= 1 or unit == "us":
            text = f"{amount:.9g}"
            if parse_duration(text + unit) == seconds:
                return text + unit
    return f"{seconds!r}s"
