"""Device backends: where slabs come from and how bytes move between them.

`host` keeps everything in shared-memory segments (no GPU: CI, laptops, CPU nodes);
`cuda` keeps one IPC-enabled stream-ordered pool per GPU plus pinned host slabs.
Both speak the same slab/export/copy interface, so everything above them (object
table, protocol, lifetimes) is tested on machines without a GPU.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Span:
    """A byte range inside one slab: the unit copies work on."""

    location: str
    handle: Any          # the backend's slab handle
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class CopyTicket:
    """A copy that has been issued. `done` resolves when the bytes have landed.

    `wait_gpu` names the GPU whose inter-process copy event was recorded right after
    this copy: a GPU consumer can order its own stream after the copy
    (cudaStreamWaitEvent) instead of waiting for a round trip that says it finished.
    """

    path: str
    done: asyncio.Future[None]
    wait_gpu: int | None = None
    route: str = ""          # the exact route, e.g. h2d-multipath[0,1,2,3] (a metric label)


@dataclass(frozen=True, slots=True)
class Export:
    """What a client needs to map a slab: a JSON-able descriptor plus fds to pass."""

    descriptor: dict[str, Any]
    fds: tuple[int, ...]


class Backend(Protocol):
    name: str

    def locations(self) -> tuple[str, ...]:
        """Every location this backend has a pool for ("host", "gpu:0", ...)."""

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        """The GPU index for a client's device, by PCI bus id (None if not ours)."""

    def create_slab(self, location: str, nbytes: int) -> Any:
        """A new slab; raises OutOfPoolMemory when the device can't hold it."""

    def destroy_slab(self, handle: Any) -> None: ...

    def export_slab(self, handle: Any, *, with_pool: bool) -> Export:
        """Descriptor for a client; `with_pool` adds the per-location pool handle."""

    def submit_copy(self, dst: Span, src: Span, *, requester: tuple[str, str] | None = None) -> CopyTicket:
        """Issue a copy of src's bytes into dst for (workflow, function); the ticket says which path."""

    def copy_event(self, gpu: int) -> bytes | None:
        """The IPC handle of `gpu`'s copy event (None: consumers must wait for `done`)."""

    def memory_info(self, location: str) -> tuple[int, int]:
        """(free, total) bytes of the device behind a location."""

    def close(self) -> None: ...


def create_backend(name: str, **options: Any) -> Backend:
    if name == "host":
        from faastube_sidecar.backends.host import HostBackend

        return HostBackend()
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
