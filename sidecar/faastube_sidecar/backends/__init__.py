"""Device backends: where slabs come from, how bytes move between them, and fences.

`host` keeps everything in shared-memory segments (no GPU: CI, laptops, CPU nodes);
`cuda` keeps one IPC-enabled stream-ordered pool per (domain, GPU) plus pinned host
slabs. Both speak the same interface, so everything above them (object lifetimes,
tenancy, protocol) is tested on machines without a GPU.

Ownership: the descriptors in an :class:`Export` belong to whoever receives the
export (the reply that carries them closes them once sent).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from faastube.locations import Location

from faastube_sidecar.identity import Domain

# (event id, end offset) pairs: the bytes up to each end are ready once that event is.
Fence = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Span:
    """A byte range inside one slab: the unit copies work on."""

    location: Location
    handle: Any          # the backend's slab handle
    offset: int
    nbytes: int


@dataclass(slots=True)
class CopyTicket:
    """A copy that has been issued. `done` resolves when the bytes have landed.

    `fence`, when set, is an event recorded right after the copy on the destination GPU:
    a GPU consumer orders its own stream after it instead of waiting for `done`.
    """

    path: str
    done: asyncio.Future[None]
    fence: Fence | None = None
    route: str = ""          # the exact route, e.g. h2d-multipath[0,1,2,3] (a metric label), once known


@dataclass(frozen=True, slots=True)
class Export:
    """What a client needs to map a slab: a JSON-able descriptor plus fds it now owns."""

    descriptor: dict[str, Any]
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FenceEvent:
    id: int
    handle: bytes        # the IPC handle a client opens once


class Backend(Protocol):
    name: str

    def locations(self) -> tuple[Location, ...]:
        """Every location this backend has pools for (host first)."""

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        """The GPU index for a client's device, by PCI bus id (None if not ours)."""

    def default_device_map(self) -> dict[int, int]:
        """Client ordinal -> GPU index for a client that names no device (simulated GPUs only)."""

    def gpu_bus_ids(self) -> dict[int, str]:
        """GPU index -> PCI bus id of the real GPUs (for NVML); empty without any."""

    def create_slab(self, domain: Domain, location: Location, nbytes: int) -> Any:
        """A new zeroed slab of `domain`; raises OutOfPoolMemory when the device can't hold it."""

    def destroy_slab(self, handle: Any) -> None: ...

    def freeze_slab(self, handle: Any) -> bool:
        """No new writable mapping of this slab from now on; False where nothing can enforce it (GPU)."""

    def pool_of(self, handle: Any) -> str | None:
        """The name of the pool a client must import to map this slab (None: nothing to import)."""

    def export_slab(self, handle: Any, *, with_pool: bool, writable: bool) -> Export:
        """Descriptor for a client of the slab's domain; `with_pool` adds the domain's pool handle,
        `writable` a mapping that may write (host memory is otherwise exported read-only)."""

    def fence_events(self, domain: Domain, gpu: int, count: int) -> list[FenceEvent]:
        """`count` new inter-process events on `gpu` that one writer of `domain` records its fences on."""

    def event_handle(self, event_id: int) -> bytes: ...

    def fence_done(self, fence: Fence) -> bool:
        """True once the last record of the fence's last event has completed (whoever recorded it)."""

    def drop_events(self, event_ids: list[int]) -> None: ...

    def submit_copy(self, dst: Span, src: Span, *, after: Fence | None, domain: Domain,
                    requester: tuple[str, str] | None = None) -> CopyTicket:
        """Copy src's bytes into dst, each chunk after its fence event; the ticket says which path."""

    def close_domain(self, domain: Domain) -> None:
        """The domain holds no slab any more: let go of its per-domain resources."""

    def memory_of(self, span: Span) -> tuple[int, int, str]:
        """(address, device, "DRAM" | "VRAM") of the span: what NIXL registers and reads."""

    def close(self) -> None: ...


def create_backend(name: str, **options: Any) -> Backend:
    if name == "host":
        from faastube_sidecar.backends.host import HostBackend

        return HostBackend(**options)
    if name == "cuda":
        from faastube_sidecar.backends.cuda import CudaBackend

        return CudaBackend(**options)
    raise ValueError(f"unknown backend {name!r}: expected 'cuda' or 'host'")


def cuda_visible() -> bool:
    """True when a CUDA GPU can be used here (NVML first: it creates no context)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return bool(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML, no driver: no GPU
        return False
