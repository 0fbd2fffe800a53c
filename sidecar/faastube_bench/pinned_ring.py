"""A pinned host ring buffer for the transfer benchmark and the executor's GPU tests.

Pinning host memory runs at only ~1-2 GB/s and pageable copies go through the
driver's small staging buffer (7-9 GB/s instead of ~55 GB/s), so a buffer is pinned
once and sub-allocated circularly. The sidecar itself does the same with its host
pool: its slabs are memfd segments registered once with cudaHostRegister, which CPU
functions write into directly (`empty` + `seal`); this standalone ring lets the
benchmark drive the transfer engine without a sidecar.

``RingAllocator`` is the pure circular allocator (frees may come out of order;
space is reclaimed when the oldest allocation is freed). ``PinnedHostRing`` adds
the memory and, optionally, ``cudaHostRegister`` (CuPy imported lazily).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import os
import threading
from typing import Any

from faastube.errors import RetryableError
from faastube_sidecar.transfers.scheduler import TransferError

logger = logging.getLogger(__name__)

_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not just the current one


class RingFull(RetryableError):
    """No contiguous space in the ring now; retry after earlier slices are freed."""


@dataclasses.dataclass(frozen=True)
class RingSlice:
    offset_bytes: int
    size_bytes: int


@dataclasses.dataclass(eq=False)
class _Entry:
    offset: int
    size: int  # aligned size actually held
    freed: bool = False


class RingAllocator:
    """Circular sub-allocation of ``capacity_bytes``; not thread-safe."""

    def __init__(self, capacity_bytes: int, *, align_bytes: int = 4096) -> None:
        if capacity_bytes <= 0:
            raise TransferError(f"capacity_bytes: must be > 0, got {capacity_bytes}")
        if align_bytes <= 0 or align_bytes & (align_bytes - 1):
            raise TransferError(f"align_bytes: must be a power of two, got {align_bytes}")
        self.capacity_bytes = capacity_bytes
        self._align = align_bytes
        self._entries: collections.deque[_Entry] = collections.deque()
        self._live: dict[int, _Entry] = {}

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._live.values())

    def allocate(self, size_bytes: int) -> RingSlice:
        if size_bytes <= 0:
            raise TransferError(f"size_bytes: must be > 0, got {size_bytes}")
        size = -(-size_bytes // self._align) * self._align
        if size > self.capacity_bytes:
            raise TransferError(f"size_bytes: {size_bytes} exceeds the ring's capacity "
                                f"{self.capacity_bytes}")
        offset = self._place(size)
        if offset is None:
            raise RingFull(f"host ring: no contiguous {size_bytes} bytes free "
                           f"({self.used_bytes} of {self.capacity_bytes} in use)")
        entry = _Entry(offset, size)
        self._entries.append(entry)
        self._live[offset] = entry
        return RingSlice(offset, size_bytes)

    def _place(self, size: int) -> int | None:
        if not self._entries:
            return 0
        head = self._entries[0].offset
        last = self._entries[-1]
        tail = last.offset + last.size
        if last.offset >= head:  # not wrapped: free space is [tail, cap) then [0, head)
            if tail + size <= self.capacity_bytes:
                return tail
            return 0 if size <= head else None
        return tail if tail + size <= head else None  # wrapped: free space is [tail, head)

    def free(self, piece: RingSlice) -> None:
        entry = self._live.pop(piece.offset_bytes, None)
        if entry is None:
            raise TransferError(f"slice at offset {piece.offset_bytes}: not allocated (double free?)")
        entry.freed = True
        while self._entries and self._entries[0].freed:
            self._entries.popleft()


class PinnedHostRing:
    """A memfd-backed host buffer, pinned once, sub-allocated circularly; thread-safe."""

    def __init__(self, capacity_bytes: int, *, register: bool = True, align_bytes: int = 4096,
                 name: str = "faastube-hostring") -> None:
        self._alloc = RingAllocator(capacity_bytes, align_bytes=align_bytes)
        self._lock = threading.Lock()
        self._registered = False
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._closed = False
        try:
            os.ftruncate(self._fd, capacity_bytes)
            self._mmap = mmap.mmap(self._fd, capacity_bytes, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._closed = True
            os.close(self._fd)
            raise
        import numpy as np

        self._array: Any = np.frombuffer(self._mmap, dtype=np.uint8)
        self.address = int(self._array.ctypes.data)
        if register:
            try:
                import cupy

                cupy.cuda.runtime.hostRegister(self.address, capacity_bytes,
                                               _CUDA_HOST_REGISTER_PORTABLE)
                self._registered = True
            except BaseException:
                self.close()
                raise
        logger.info("host ring: %d bytes at %#x, pinned=%s", capacity_bytes, self.address,
                    self._registered)

    @property
    def capacity_bytes(self) -> int:
        return self._alloc.capacity_bytes

    @property
    def pinned(self) -> bool:
        return self._registered

    @property
    def fd(self) -> int:
        """The memfd; ``os.dup`` it before handing it to another process."""
        return self._fd

    @property
    def is_closed(self) -> bool:
        return self._closed

    def allocate(self, size_bytes: int) -> RingSlice:
        with self._lock:
            return self._alloc.allocate(size_bytes)

    def free(self, piece: RingSlice) -> None:
        with self._lock:
            self._alloc.free(piece)

    def address_of(self, piece: RingSlice) -> int:
        return self.address + piece.offset_bytes

    def view(self, piece: RingSlice) -> Any:
        """A writable numpy uint8 view of the slice."""
        return self._array[piece.offset_bytes:piece.offset_bytes + piece.size_bytes]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._registered:
            try:
                import cupy

                cupy.cuda.runtime.hostUnregister(self.address)
            except Exception:  # never raise from cleanup; the process may be exiting
                logger.exception("host ring: cudaHostUnregister failed")
            self._registered = False
        self._array = None
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            logger.warning("host ring: views still alive at close; mapping kept")
        os.close(self._fd)

    def __enter__(self) -> PinnedHostRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # destructors never raise
            pass
