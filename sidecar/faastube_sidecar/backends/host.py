"""The host backend: every pool is shared memory, every copy a memmove, no fences.

With `simulated_gpus`, it also offers pools at ``gpu:0`` .. ``gpu:N-1``, made of shared
memory like the host's, so that everything above the backend that depends on there
being GPUs (the memory policy's eviction from a GPU to a peer GPU or to the host, and
the restore) runs, and is tested, on machines without one. Copies between simulated
locations are labelled with the path a GPU would take (``nvlink``, ``d2h``, ``h2d``).
Clients that name no CUDA device see simulated GPU i as their ordinal i.
"""

from __future__ import annotations

import asyncio

from faastube import errors
from faastube.locations import HOST, Location, gpu

from faastube_sidecar.backends import CopyTicket, Export, Fence, FenceEvent, Span
from faastube_sidecar.backends.shm import ShmSegment
from faastube_sidecar.devicememory import DeviceMemory
from faastube_sidecar.identity import Domain


class HostBackend:
    name = "host"

    def __init__(self, *, simulated_gpus: int = 0, memory: DeviceMemory | None = None) -> None:
        if not 0 <= simulated_gpus <= 64:
            raise ValueError(f"simulated_gpus must be in 0..64, got {simulated_gpus}")
        self.simulated_gpus = simulated_gpus
        self.memory = memory      # the simulated GPUs' memory: a slab past it fails, as cudaMalloc would

    def locations(self) -> tuple[Location, ...]:
        return (HOST, *(gpu(i) for i in range(self.simulated_gpus)))

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        return None

    def default_device_map(self) -> dict[int, int]:
        return {i: i for i in range(self.simulated_gpus)}

    def gpu_bus_ids(self) -> dict[int, str]:
        return {}

    def create_slab(self, domain: Domain, location: Location, nbytes: int) -> ShmSegment:
        if location.gpu is not None and self.memory is not None:
            info = self.memory.info(location.gpu)
            if info is not None and info.free_bytes < nbytes:
                raise errors.OutOfPoolMemory(f"simulated GPU {location.gpu} is out of memory ({info.free_bytes} "
                                             f"bytes free, {nbytes} wanted)")
        return ShmSegment(nbytes, name="faastube-host" if location.is_host else f"faastube-sim-{location}")

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
        if gpu < self.simulated_gpus:
            return []       # a simulated GPU's writes are CPU writes: done when published
        raise errors.InvalidRequest("the host backend has no GPUs")

    def event_handle(self, event_id: int) -> bytes:
        raise errors.InvalidRequest(f"no event {event_id}: the host backend has no GPUs")

    def fence_done(self, fence: Fence) -> bool:
        return True

    def drop_events(self, event_ids: list[int]) -> None:
        pass

    @staticmethod
    def path_for(dst: Location, src: Location) -> str:
        if dst.is_host and src.is_host:
            return "host"
        if dst.gpu is None:
            return "d2h"
        if src.gpu is None:
            return "h2d"
        return "local" if dst.gpu == src.gpu else "nvlink"

    def submit_copy(self, dst: Span, src: Span, *, after: Fence | None, domain: Domain,
                    requester: tuple[str, str] | None = None) -> CopyTicket:
        n = src.nbytes
        dst.handle.bytes[dst.offset:dst.offset + n] = src.handle.bytes[src.offset:src.offset + n]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return CopyTicket(self.path_for(dst.location, src.location), done)

    def memory_of(self, span: Span) -> tuple[int, int, str]:
        return span.handle.address + span.offset, 0, "DRAM"

    def close_domain(self, domain: Domain) -> None:
        pass

    def close(self) -> None:
        pass
