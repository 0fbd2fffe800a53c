"""The host backend: every pool is shared memory, every copy a memmove, no fences."""

from __future__ import annotations

import asyncio

from faastube import errors
from faastube.locations import HOST, Location

from faastube_sidecar.backends import CopyTicket, Export, Fence, FenceEvent, Span
from faastube_sidecar.backends.shm import ShmSegment
from faastube_sidecar.identity import Domain


class HostBackend:
    name = "host"

    def locations(self) -> tuple[Location, ...]:
        return (HOST,)

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        return None

    def create_slab(self, domain: Domain, location: Location, nbytes: int) -> ShmSegment:
        return ShmSegment(nbytes, name="faastube-host")

    def destroy_slab(self, handle: ShmSegment) -> None:
        handle.close()

    def freeze_slab(self, handle: ShmSegment) -> bool:
        handle.freeze()
        return True

    def pool_of(self, handle: ShmSegment) -> str | None:
        return None

    def export_slab(self, handle: ShmSegment, *, with_pool: bool, writable: bool) -> Export:
        return Export({"kind": "shm", "size": handle.size, "writable": writable},
                      (handle.export_fd(writable=writable),))

    def fence_events(self, domain: Domain, gpu: int, count: int) -> list[FenceEvent]:
        raise errors.InvalidRequest("the host backend has no GPUs")

    def event_handle(self, event_id: int) -> bytes:
        raise errors.InvalidRequest(f"no event {event_id}: the host backend has no GPUs")

    def fence_done(self, fence: Fence) -> bool:
        return True

    def drop_events(self, event_ids: list[int]) -> None:
        pass

    def submit_copy(self, dst: Span, src: Span, *, after: Fence | None, domain: Domain,
                    requester: tuple[str, str] | None = None) -> CopyTicket:
        n = src.nbytes
        dst.handle.bytes[dst.offset:dst.offset + n] = src.handle.bytes[src.offset:src.offset + n]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return CopyTicket("host", done)

    def close_domain(self, domain: Domain) -> None:
        pass

    def close(self) -> None:
        pass
