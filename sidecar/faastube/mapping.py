"""Client-side mappings of the sidecar's slabs, each made once per process.

A host slab is a shared-memory fd, mapped with mmap. A GPU slab lives in the
sidecar's IPC-enabled pool: the pool is imported once per GPU from its fd, then each
slab is mapped from its IPC descriptor (gpu-facts pitfall 3: open once, cache).
Views handed to users keep their slab mapping alive through their owner chain.
"""

from __future__ import annotations

import base64
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from faastube import errors


@dataclass(eq=False)
class HostSlab:
    id: int
    size: int
    map: mmap.mmap
    bytes: np.ndarray          # uint8 view of the whole slab

    @property
    def ptr(self) -> int:
        return int(self.bytes.ctypes.data)


@dataclass(eq=False)
class CudaSlab:
    id: int
    size: int
    gpu: int                   # the sidecar's GPU index
    ordinal: int               # this process's CUDA ordinal for that GPU
    buffer: Any                # cuda.core Buffer imported from the sidecar's pool
    ptr: int


def map_host_slab(slab_id: int, size: int, fd: int) -> HostSlab:
    """Map a shared-memory slab; the fd is consumed (closed) either way."""
    try:
        if os.fstat(fd).st_size < size:
            raise errors.ProtocolError(f"slab {slab_id}: segment smaller than the {size} bytes announced")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise errors.ProtocolError(f"slab {slab_id}: cannot map shared memory: {e}") from e
    finally:
        os.close(fd)
    return HostSlab(slab_id, size, mm, np.frombuffer(mm, dtype=np.uint8))


class CudaImporter:
    """Imports the sidecar's GPU pools (once per GPU) and maps slabs from them."""

    def __init__(self) -> None:
        from cuda.core import Device

        self._Device = Device
        self._pools: dict[int, Any] = {}       # sidecar GPU index -> mapped memory resource
        self._streams: dict[int, Any] = {}
        self._events: dict[int, int] = {}      # sidecar GPU index -> its copy event, opened once

    def import_pool(self, gpu: int, ordinal: int, fd: int) -> None:
        from cuda.core import DeviceMemoryResource

        if gpu in self._pools:
            os.close(fd)
            return
        device = self._Device(ordinal)
        device.set_current()
        try:
            # cuda.core may or may not close what it is given: hand it a duplicate, close ours.
            self._pools[gpu] = DeviceMemoryResource.from_allocation_handle(device, os.dup(fd))
        except Exception as e:
            raise errors.ProtocolError(f"cannot import GPU {gpu}'s pool: {e}") from e
        finally:
            os.close(fd)
        self._streams[gpu] = device.create_stream()

    def copy_event(self, gpu: int, ordinal: int, handle_b64: str | None) -> int:
        """The sidecar's inter-process copy event for a GPU (opened on first sight)."""
        event = self._events.get(gpu)
        if event is not None:
            return event
        if handle_b64 is None:
            raise errors.ProtocolError(f"told to wait for GPU {gpu}'s copy event before receiving its handle")
        import cupy

        try:
            handle = base64.b64decode(handle_b64, validate=True)
            with cupy.cuda.Device(ordinal):
                event = int(cupy.cuda.runtime.ipcOpenEventHandle(handle))
        except Exception as e:
            raise errors.ProtocolError(f"cannot open GPU {gpu}'s copy event: {e}") from e
        self._events[gpu] = event
        return event

    def has_pool(self, gpu: int) -> bool:
        return gpu in self._pools

    def map_slab(self, slab_id: int, size: int, gpu: int, ordinal: int, payload_b64: str) -> CudaSlab:
        from cuda.core import Buffer

        try:
            from cuda.core._memory._ipc import IPCBufferDescriptor
        except ImportError:  # pragma: no cover - older layouts
            from cuda.core._memory import IPCBufferDescriptor  # type: ignore[no-redef]
        if gpu not in self._pools:
            raise errors.ProtocolError(f"slab {slab_id} on GPU {gpu} arrived before that GPU's pool")
        try:
            payload = base64.b64decode(payload_b64, validate=True)
            descriptor = IPCBufferDescriptor._init(payload, size)
            self._Device(ordinal).set_current()
            buffer = Buffer.from_ipc_descriptor(self._pools[gpu], descriptor, stream=self._streams[gpu])
            self._streams[gpu].sync()
        except Exception as e:
            raise errors.ProtocolError(f"cannot map slab {slab_id} of GPU {gpu}: {e}") from e
        return CudaSlab(slab_id, size, gpu, ordinal, buffer, int(buffer.handle))
