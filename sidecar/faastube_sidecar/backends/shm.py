"""Shared-memory segments: a memfd, mapped here, whose fd is passed to clients.

memfd segments have no name in any filesystem, so a crashed sidecar leaves nothing
behind in /dev/shm; the memory is gone once the last mapping and fd close. A new
segment reads as zeros (the kernel clears pages on first touch), so a fresh slab
never shows anyone's old bytes.

Readers get a *read-only* descriptor: the memfd reopened through /proc/self/fd with
O_RDONLY, a new open file description that can't be mapped for writing. Only the
writer of an arena gets the read-write descriptor. Reopening a read-only descriptor
read-write through /proc would get around that, so once a segment's writers hold
their mappings it is *frozen* with F_SEAL_FUTURE_WRITE: from then on no new writable
mapping and no write() is possible, for anyone (root included); the mappings made
before keep working.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import numpy as np
from faastube import errors

# linux/fcntl.h; Python's fcntl module does not name it. Linux >= 5.1.
F_SEAL_FUTURE_WRITE = 0x0010


class ShmSegment:
    """Owns one memfd and its mapping."""

    def __init__(self, nbytes: int, *, name: str = "faastube") -> None:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
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
        self.frozen = False

    @property
    def address(self) -> int:
        return int(self.bytes.ctypes.data)

    def freeze(self) -> None:
        """No new writable mapping of this segment, ever; existing ones keep working."""
        if self.frozen:
            return
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except OSError as e:
            raise errors.InternalError(f"cannot seal a shared-memory slab against writes: {e}") from e
        self.frozen = True

    def export_fd(self, *, writable: bool) -> int:
        """A new descriptor for a client (the caller owns it): read-write, or read-only."""
        if writable:
            if self.frozen:
                raise errors.InternalError("a frozen shared-memory slab can't be handed out for writing")
            return os.dup(self.fd)
        try:
            return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise errors.InternalError(f"cannot open a read-only descriptor of a shared-memory slab: {e}") from e

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.bytes          # drop the export before closing the mapping
        self.map.close()
        os.close(self.fd)
        self.fd = -1
