"""The host backend: every pool is shared memory, every copy a memmove."""

from __future__ import annotations

import asyncio
import os

from faastube import protocol

from faastube_sidecar.backends import CopyTicket, Export, Span
from faastube_sidecar.backends.shm import ShmSegment


class HostBackend:
    name = "host"

    def locations(self) -> tuple[str, ...]:
        return (protocol.HOST,)

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        return None

    def create_slab(self, location: str, nbytes: int) -> ShmSegment:
        return ShmSegment(nbytes, name=f"faastube-{location}")

    def destroy_slab(self, handle: ShmSegment) -> None:
        handle.close()

    def export_slab(self, handle: ShmSegment, *, with_pool: bool) -> Export:
        return Export({"kind": "shm", "size": handle.size}, (handle.fd,))

    def submit_copy(self, dst: Span, src: Span, *, requester: tuple[str, str] | None = None) -> CopyTicket:
        n = src.nbytes
        dst.handle.bytes[dst.offset:dst.offset + n] = src.handle.bytes[src.offset:src.offset + n]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return CopyTicket("host", done)

    def copy_event(self, gpu: int) -> bytes | None:
        return None

    def memory_info(self, location: str) -> tuple[int, int]:
        pages = os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        return avail * page, pages * page

    def close(self) -> None:
        pass
