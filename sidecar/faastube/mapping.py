"""Client-side mappings of the sidecar's slabs and events, each made once per process.

A host slab is a shared-memory fd, mapped with mmap: read-only unless it is one of
this client's arenas (the sidecar sends a read-only descriptor then, so the kernel
enforces it). A GPU slab lives in the sidecar's IPC pool of this client's workflow:
the pool is imported once per GPU from its fd, then each slab is mapped from its
export data (opening costs ~0.1-0.2 ms each, so never per object). Fence events are
inter-process events the sidecar owns, opened once by id.

Everything CUDA goes through the driver API (the public way to import one pool
allocation), inside the device's primary context pushed for the call, so the
caller's current device is left as it was. Views handed to users keep their slab
mapping alive through their owner chain; a mapping is undone when its last user
goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from faastube import errors, protocol

logger = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64        # CUipcEventHandle and CUmemPoolPtrExportData are both 64 bytes
MAX_OPEN_EVENTS = 256


@dataclass(eq=False)
class HostSlab:
    id: int
    size: int
    map: mmap.mmap
    bytes: np.ndarray          # uint8 view of the whole slab
    writable: bool

    @property
    def ptr(self) -> int:
        return int(self.bytes.ctypes.data)


@dataclass(eq=False)
class CudaSlab:
    id: int
    size: int
    gpu: int                   # the sidecar's GPU index
    ordinal: int               # this process's CUDA ordinal for that GPU
    ptr: int
    _finalizer: Any = None

    writable = True            # CUDA IPC has no read-only mapping

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def map_host_slab(slab_id: int, size: int, fd: int, *, writable: bool) -> HostSlab:
    """Map a shared-memory slab; the fd is consumed (closed) either way."""
    try:
        if os.fstat(fd).st_size < size:
            raise errors.ProtocolError(f"slab {slab_id}: segment smaller than the {size} bytes announced")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    except OSError as e:
        raise errors.ProtocolError(f"slab {slab_id}: cannot map shared memory "
                                   f"({'read-write' if writable else 'read-only'}): {e}") from e
    finally:
        os.close(fd)
    data = np.frombuffer(mm, dtype=np.uint8)
    if not writable:
        data = data.view()
        data.flags.writeable = False
    return HostSlab(slab_id, size, mm, data, writable)


class CudaImporter:
    """Imports the sidecar's GPU pools, maps slabs, opens events: once per *process*.

    Every client of a process shares this (see `cuda_importer()`): CUDA maps one pool
    allocation once per process, whichever client asks. Pools are known by the name the
    sidecar gives them (unique for its life, random per sidecar), slabs by their pool and
    export data, events by their handle.
    """

    def __init__(self) -> None:
        from cuda.bindings import driver

        self._d = driver
        self._lock = threading.RLock()
        self._contexts: dict[int, Any] = {}     # ordinal -> retained primary context
        self._pools: dict[str, Any] = {}                        # the sidecar's pool name -> CUmemoryPool
        self._slabs: weakref.WeakValueDictionary[tuple[str, bytes], CudaSlab] = weakref.WeakValueDictionary()
        self._events: OrderedDict[bytes, Any] = OrderedDict()   # handle -> CUevent

    def _check(self, result: Any, what: str) -> Any:
        err = result[0]
        if err != self._d.CUresult.CUDA_SUCCESS:
            raise errors.ProtocolError(f"{what}: CUDA error {err.name if hasattr(err, 'name') else err}")
        return result[1] if len(result) > 1 else None

    @contextlib.contextmanager
    def on_device(self, ordinal: int) -> Iterator[None]:
        """Run driver calls in the device's primary context without moving the caller's."""
        d = self._d
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                self._check(d.cuInit(0), "cuInit")
                dev = self._check(d.cuDeviceGet(ordinal), f"device {ordinal}")
                ctx = self._check(d.cuDevicePrimaryCtxRetain(dev), f"primary context of device {ordinal}")
                self._contexts[ordinal] = ctx
        self._check(d.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            d.cuCtxPopCurrent()

    def has_pool(self, name: str) -> bool:
        return name in self._pools

    def import_pool(self, name: str, ordinal: int, fd: int) -> None:
        """Import the pool the sidecar calls `name` from its fd (consumed either way)."""
        key = name
        try:
            with self._lock:
                if key not in self._pools:
                    d = self._d
                    with self.on_device(ordinal):
                        self._pools[key] = self._check(d.cuMemPoolImportFromShareableHandle(
                            fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                            "importing a GPU pool")
        finally:
            os.close(fd)

    def map_slab(self, pool_key: str, slab_id: int, size: int, gpu: int, ordinal: int,
                 payload_b64: str) -> CudaSlab:
        payload = protocol.decode_handle(payload_b64, size=IPC_HANDLE_BYTES, what=f"slab {slab_id}'s export data")
        with self._lock:
            pool = self._pools.get(pool_key)
            if pool is None:
                raise errors.ProtocolError(f"slab {slab_id} on GPU {gpu} arrived before that GPU's pool")
            known = self._slabs.get((pool_key, payload))
            if known is not None:
                return known
            d = self._d
            export = d.CUmemPoolPtrExportData()
            ctypes.memmove(export.getPtr(), payload, IPC_HANDLE_BYTES)
            with self.on_device(ordinal):
                ptr = self._check(d.cuMemPoolImportPointer(pool, export), f"mapping slab {slab_id} of GPU {gpu}")
            slab = CudaSlab(slab_id, size, gpu, ordinal, int(ptr))
            slab._finalizer = weakref.finalize(slab, _unmap, self, ordinal, ptr)
            self._slabs[(pool_key, payload)] = slab
            return slab

    def event(self, handle: bytes, ordinal: int) -> int:
        """An inter-process event (a CUevent as an int), opened on first use."""
        with self._lock:
            event = self._events.get(handle)
            if event is not None:
                self._events.move_to_end(handle)
                return int(event)
            d = self._d
            raw = d.CUipcEventHandle()
            ctypes.memmove(raw.getPtr(), handle, IPC_HANDLE_BYTES)
            with self.on_device(ordinal):
                event = self._check(d.cuIpcOpenEventHandle(raw), "opening a fence event")
            self._events[handle] = event
            while len(self._events) > MAX_OPEN_EVENTS:
                _, old = self._events.popitem(last=False)
                d.cuEventDestroy(old)
            return int(event)


_IMPORTER: CudaImporter | None = None


def cuda_importer() -> CudaImporter:
    global _IMPORTER
    if _IMPORTER is None:
        _IMPORTER = CudaImporter()
    return _IMPORTER


def _unmap(importer: CudaImporter, ordinal: int, ptr: Any) -> None:
    # A finalizer: never raises.
    try:
        with importer.on_device(ordinal):
            importer._d.cuMemFree(ptr)
    except Exception:  # noqa: BLE001
        logger.debug("unmapping a GPU slab failed", exc_info=True)
