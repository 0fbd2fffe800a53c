"""Stacking requests' arrays along axis 0 and splitting a batched result back, per request.

A batched handler call (``sdk.execute_batch``) in ``"stack"`` mode receives, for each input,
the requests' arrays concatenated along axis 0; each request's *rows* are the length of its
arrays' axis 0. The concatenation is the one copy batching adds (the requests' inputs are
separate objects in pool memory, and a handler needs one contiguous array); the split is
free: each request's part of an output is a view of rows of the batched output, which the
runtime then stores as that request's own object.

Only the store's array types reach here: NumPy (host data) and CuPy (GPU data). Handlers
that compute in torch get zero-copy DLPack views of the stacked CuPy array, and their
torch outputs are converted back to CuPy (``sdk.to_storable``) before they are split.
NumPy only at import; CuPy is imported when a CuPy array shows up.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from faastube import errors


class NotSplittable(errors.InvalidRequest):
    """A batched output does not have one block of rows per request along axis 0."""


def _kind(array: Any) -> str:
    return type(array).__module__.split(".", 1)[0]


def stack_key(arrays: Mapping[str, Any]) -> Hashable | None:
    """What must match for requests to stack (per input: array type, device, dtype, shape after
    axis 0), or None when this request cannot stack with any other.

    A request cannot stack when an input is a scalar (no axis 0) or when its inputs disagree
    on their number of rows (then no row count splits the output back).
    """
    key: list[Hashable] = []
    rows: int | None = None
    for name in sorted(arrays):
        array = arrays[name]
        shape = tuple(getattr(array, "shape", ()))
        if not shape:
            return None
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            return None
        device = getattr(getattr(array, "device", None), "id", None) if _kind(array) == "cupy" else None
        key.append((name, _kind(array), device, str(array.dtype), shape[1:]))
    return tuple(key)


def rows_of(arrays: Mapping[str, Any]) -> int:
    """The request's rows: the length of its inputs' axis 0 (``stack_key`` checked they agree)."""
    first = next(iter(arrays.values()))
    return int(first.shape[0])


def concatenate(parts: Sequence[Any]) -> Any:
    """The parts joined along axis 0, on the parts' device: the one gather copy of a batch."""
    kinds = {_kind(p) for p in parts}
    if kinds == {"numpy"}:
        return np.concatenate(parts, axis=0)
    if kinds == {"cupy"}:
        import cupy

        with cupy.cuda.Device(parts[0].device.id):
            return cupy.concatenate(parts, axis=0)
    raise errors.InvalidRequest(f"cannot stack arrays of types {sorted(kinds)}: inputs are NumPy or CuPy arrays")


def split_rows(array: Any, rows: Sequence[int]) -> list[Any]:
    """``array``'s axis 0 cut into one view per request.

    The output has either the batch's rows (``sum(rows)``, one output row per input row) or
    a whole multiple ``k`` of them (each input row produced ``k`` rows, e.g. ``k`` crops per
    frame); request ``i`` gets its ``rows[i]`` (times ``k``) rows, in order.
    """
    total = sum(rows)
    shape = tuple(getattr(array, "shape", ()))
    if not shape:
        raise NotSplittable("a batched output must have the batch along axis 0; got a scalar")
    if total <= 0 or shape[0] % total:
        raise NotSplittable(f"a batched output must have the batch's {total} rows (or a whole multiple) "
                            f"along axis 0, one block per request ({list(rows)}); got shape {list(shape)}")
    factor = shape[0] // total
    pieces = []
    start = 0
    for count in rows:
        stop = start + count * factor
        pieces.append(array[start:stop])
        start = stop
    return pieces


def zeros(shape: Sequence[int], dtype: str, *, device: int | None) -> Any:
    """Zeros on the host (``device`` None) or on a GPU: what a warm-up call computes on."""
    if device is None:
        return np.zeros(tuple(shape), dtype=dtype)
    import cupy

    with cupy.cuda.Device(device):
        return cupy.zeros(tuple(shape), dtype=dtype)


def nbytes_of(shape: Sequence[int], dtype: str) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


__all__ = ["NotSplittable", "concatenate", "nbytes_of", "rows_of", "split_rows", "stack_key", "zeros"]
