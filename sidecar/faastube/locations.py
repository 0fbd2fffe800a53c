"""Where bytes live: the host, or one of the node's GPUs.

On the wire a location is the text ``"host"`` or ``"gpu:N"`` (N: the sidecar's GPU
index, not a client's CUDA ordinal). It is parsed into a :class:`Location` once, at
the edge (request validation, reply decoding); everything behind the edge compares
and hashes typed values.
"""

from __future__ import annotations

from dataclasses import dataclass

from faastube import errors

_MAX_GPU_INDEX = 9999


@dataclass(frozen=True, slots=True, order=True)
class Location:
    gpu: int | None = None       # None: host memory

    @property
    def is_host(self) -> bool:
        return self.gpu is None

    def __str__(self) -> str:
        return "host" if self.gpu is None else f"gpu:{self.gpu}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    @staticmethod
    def parse(text: object) -> Location:
        """A location from its wire text; InvalidRequest naming what was wrong."""
        if text == "host":
            return HOST
        if isinstance(text, str):
            prefix, _, rest = text.partition(":")
            if prefix == "gpu" and rest.isdigit() and len(rest) <= 4:
                return gpu(int(rest))
        raise errors.InvalidRequest(f"bad location {text!r:.40}: expected 'host' or 'gpu:N'")


HOST = Location(None)
_GPUS = tuple(Location(i) for i in range(64))


def gpu(index: int) -> Location:
    if not 0 <= index <= _MAX_GPU_INDEX:
        raise errors.InvalidRequest(f"GPU index {index} out of range")
    return _GPUS[index] if index < len(_GPUS) else Location(index)
