"""Shape arithmetic the examples share: sizes scaled down from full resolution stay valid."""

from __future__ import annotations


def round_to_multiple(value: float, multiple: int, *, minimum: int) -> int:
    """``value`` rounded to the nearest multiple of ``multiple``, at least ``minimum``.

    A network's stride (32 for a detector backbone, 8 for a crop grid) needs sides that are
    multiples of it, at every scale.
    """
    return max(minimum, multiple * round(value / multiple))
