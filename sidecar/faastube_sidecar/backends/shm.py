"""Shared-memory segments: a memfd, mapped here, whose fd is passed to clients.

memfd segments have no name in any filesystem, so a crashed sidecar leaves nothing
behind in /dev/shm; the memory is gone once the last mapping and fd close.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
from faastube import errors


class ShmSegment:
    """Owns one memfd and its mapping."""

    def __init__(self, nbytes: int, *, name: str = "faastube") -> None:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as e:
            raise errors.OutOfPoolMemory(f"memfd_create failed: {e}") from e
        try:
            os.ftruncate(fd, nbytes)
            self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise errors.OutOfPoolMemory(f"cannot reserve {nbytes} bytes of shared memory: {e}") from e
        self.fd = fd
        self.size = nbytes
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)

    @property
    def address(self) -> int:
        return int(self.bytes.ctypes.data)

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.bytes          # drop the export before closing the mapping
        self.map.close()
        os.close(self.fd)
        self.fd = -1
