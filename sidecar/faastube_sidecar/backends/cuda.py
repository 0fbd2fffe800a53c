"""The CUDA backend: one IPC-enabled, stream-ordered memory pool per (domain, GPU).

Tenancy. An imported IPC pool is a capability for every allocation in it, and CUDA
has no read-only mapping, so each domain (namespace + workflow) gets pools of its
own: a client imports only its domain's pools and maps only its domain's slabs.
A new slab is wiped before anyone sees it (the memory may have held another
domain's freed bytes inside this process: ~0.13 ms per 512 MiB on H200, measured).
Copies of a domain run on that domain's streams and record that domain's events, so
a hostile client that stalls its own fences stalls only its own workflow.

Fences. Writers order their GPU writes with *fence events*: inter-process events
this backend creates (one set per writer and GPU) and the writer records on its
stream after each written range. The sidecar owns them, so they outlive the writer;
its copies wait on them on the GPU (cudaStreamWaitEvent), and readers do the same.

Host slabs are shared-memory segments registered with `cudaHostRegister`, so CPU
functions write straight into pinned memory and host<->GPU copies run at pinned
speed without a staging copy.

Slab and pointer export go through the driver API (cuMemPoolExportPointer), the
public way to name one allocation of an IPC pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from faastube import errors, protocol
from faastube.locations import HOST, Location

from faastube_sidecar.backends import CopyTicket, Export, Fence, FenceEvent, Span
from faastube_sidecar.backends.shm import ShmSegment
from faastube_sidecar.identity import Domain

if TYPE_CHECKING:
    from faastube_sidecar.backends.cuda_transfers import ScheduledTransfers

MULTIPATH_MIN_BYTES = 32 << 20   # GPU-to-GPU copies below this take their direct link, relays or not
FENCE_TIMEOUT_S = 60.0           # a writer whose fence never completes: its copies fail after this
COPY_EVENTS = 4                  # per domain and GPU, recorded in turn after the sidecar's copies

logger = logging.getLogger(__name__)

_MEMCPY_DEFAULT = 4   # cudaMemcpyDefault: direction inferred through unified addressing
_PEER_BYTES_PER_S = 380e9   # measured NVLink peer rate on H100/H200: when to look for a copy's end
_EVENT_DISABLE_TIMING = 0x2
_EVENT_INTERPROCESS = 0x4
_EXPORT_DATA_BYTES = 64   # sizeof(CUmemPoolPtrExportData)
_event_ids = itertools.count(1)
_pool_ids = itertools.count(1)


def normalize_bus_id(bus_id: str) -> str:
    """'00000000:19:00.0' and '0000:19:00.0' name the same device."""
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id


@dataclass(eq=False)
class GpuSlab:
    gpu: int
    domain: Domain
    buffer: Any          # cuda.core Buffer, owned
    ptr: int
    size: int
    payload: bytes       # cudaMemPoolPtrExportData of the allocation


@dataclass(eq=False)
class HostSlab:
    segment: ShmSegment
    ptr: int

    @property
    def size(self) -> int:
        return self.segment.size


@dataclass(eq=False)
class _Event:
    gpu: int
    domain: Domain
    ptr: int             # cudaEvent_t
    handle: bytes        # cudaIpcEventHandle_t


@dataclass(eq=False)
class _DomainGpu:
    """One domain's resources on one GPU."""

    name: str                        # unique for this sidecar's life: clients key imported pools by it
    mr: Any                          # cuda.core DeviceMemoryResource(ipc_enabled=True)
    stream: Any                      # cupy Stream for this domain's copies issued on this GPU
    copy_events: tuple[int, ...] = ()   # a ring of event ids, one recorded after each copy landing here
    next_event: int = 0
    slabs: int = 0

    def copy_event(self) -> int | None:
        if not self.copy_events:
            return None
        event = self.copy_events[self.next_event % len(self.copy_events)]
        self.next_event += 1
        return event


class CudaBackend:
    name = "cuda"

    def __init__(self, *, pool_max_bytes: int = 0, devices: list[int] | None = None,
                 multipath: bool = True, copy_events: bool = True) -> None:
        import cupy
        from cuda.bindings import driver
        from cuda.core import Device

        self._cupy = cupy
        self._driver = driver
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            raise errors.Unavailable("the cuda backend needs a GPU and none is visible")
        self.gpus = list(range(count)) if devices is None else devices
        self._pool_max_bytes = pool_max_bytes
        self._copy_events_enabled = copy_events
        self._devices = {i: Device(i) for i in self.gpus}
        self._alloc_streams: dict[int, Any] = {}
        self._bus_ids: dict[str, int] = {}
        for i in self.gpus:
            dev = self._devices[i]
            dev.set_current()
            self._alloc_streams[i] = dev.create_stream()
            self._bus_ids[normalize_bus_id(dev.pci_bus_id)] = i
        self._links = self._peer_links()
        rt = cupy.cuda.runtime
        self._peers: dict[int, list[int]] = {}
        for i in self.gpus:
            self._peers[i] = [j for j in self.gpus if j != i and self._devices[i].can_access_peer(j)]
            with cupy.cuda.Device(i):
                for j in self._peers[i]:
                    # Without peer access a peer copy is staged through the host (~38 GB/s, not ~390).
                    try:
                        rt.deviceEnablePeerAccess(j)
                    except cupy.cuda.runtime.CUDARuntimeError as e:
                        if "AlreadyEnabled" not in str(e) and "ALREADY" not in str(e).upper():
                            logger.warning("peer access %d -> %d: %s", i, j, e)
        self._domains: dict[tuple[Domain, int], _DomainGpu] = {}
        self._instance = os.urandom(6).hex()    # pool names from an earlier sidecar never match ours
        self._events: dict[int, _Event] = {}
        self._waiters = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, 2 * len(self.gpus)),
                                                              thread_name_prefix="faastube-cuda")
        self._scheduled = self._start_transfer_engine() if multipath else None
        self._relay_verdicts: dict[tuple[int, int], bool] = {}
        logger.info("cuda backend: GPUs %s, links %s", self.gpus, self._links)

    def _start_transfer_engine(self) -> ScheduledTransfers | None:
        """Large host<->GPU copies use every GPU's PCIe link; needs the NVML topology."""
        try:
            from faastube_sidecar.backends.cuda_transfers import ScheduledTransfers
            from faastube_sidecar.discovery import discover_local_node

            topology = discover_local_node()
            cuda_of = {g.index: self._bus_ids[normalize_bus_id(g.pcie_bus_id)] for g in topology.gpus
                       if normalize_bus_id(g.pcie_bus_id) in self._bus_ids}
            if len(cuda_of) != len(topology.gpus):
                raise ValueError("NVML and CUDA disagree on the GPUs")
            return ScheduledTransfers(topology, cuda_of)
        except Exception as e:  # noqa: BLE001 - single-link copies still work: say so loudly
            logger.warning("multi-path host<->GPU copies are off (%s): large copies use one PCIe link", e)
            return None

    def _peer_links(self) -> dict[tuple[int, int], str]:
        """Label each GPU pair by the link a peer copy takes: 'nvlink' or 'pcie'."""
        links: dict[tuple[int, int], str] = {}
        nvlinked: set[tuple[int, int]] = set()
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = {}
            for bus, i in self._bus_ids.items():
                handles[i] = pynvml.nvmlDeviceGetHandleByPciBusId(bus.upper())
            for i, hi in handles.items():
                for j, hj in handles.items():
                    if i < j:
                        status = pynvml.nvmlDeviceGetP2PStatus(hi, hj, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                        if status == pynvml.NVML_P2P_STATUS_OK:
                            nvlinked.update({(i, j), (j, i)})
            pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001 - labels only; the copy works either way
            logger.warning("cannot read NVLink status from NVML (%s); peer copies are labelled 'peer'", e)
            return {(i, j): "peer" for i in self.gpus for j in self.gpus if i != j}
        for i in self.gpus:
            for j in self.gpus:
                if i != j:
                    links[(i, j)] = "nvlink" if (i, j) in nvlinked else "pcie"
        return links

    # --- locations ----------------------------------------------------------------------------

    def locations(self) -> tuple[Location, ...]:
        from faastube.locations import gpu

        return (HOST, *(gpu(i) for i in self.gpus))

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        try:
            return self._bus_ids.get(normalize_bus_id(pci_bus_id))
        except ValueError:
            return None

    def default_device_map(self) -> dict[int, int]:
        return {}     # a client's GPUs are matched by PCI bus id, never guessed

    def gpu_bus_ids(self) -> dict[int, str]:
        return {i: bus for bus, i in self._bus_ids.items()}

    # --- per-domain resources -----------------------------------------------------------------

    def _domain_gpu(self, domain: Domain, gpu: int) -> _DomainGpu:
        held = self._domains.get((domain, gpu))
        if held is not None:
            return held
        from cuda.core import DeviceMemoryResource, DeviceMemoryResourceOptions

        dev = self._devices[gpu]
        dev.set_current()
        try:
            mr = DeviceMemoryResource(dev, DeviceMemoryResourceOptions(ipc_enabled=True,
                                                                       max_size=self._pool_max_bytes))
        except Exception as e:
            raise errors.OutOfPoolMemory(f"GPU {gpu}: cannot create a memory pool for workflow {domain}: {e}") from e
        if self._peers[gpu]:
            # Peer copies out of this pool need the peers to have access to it.
            mr.peer_accessible_by = self._peers[gpu]
        with self._cupy.cuda.Device(gpu):
            stream = self._cupy.cuda.Stream(non_blocking=True)
        held = _DomainGpu(f"{self._instance}-{next(_pool_ids)}", mr, stream)
        if self._copy_events_enabled:
            try:
                held.copy_events = tuple(self._new_event(domain, gpu).id for _ in range(COPY_EVENTS))
            except Exception as e:  # noqa: BLE001 - consumers then wait for the copy's end instead
                logger.warning("GPU %d: no inter-process copy event for %s (%s); GPU gets wait for copies",
                               gpu, domain, e)
        self._domains[(domain, gpu)] = held
        return held

    def memory_of(self, span: Span) -> tuple[int, int, str]:
        handle = span.handle
        if isinstance(handle, GpuSlab):
            return handle.ptr + span.offset, handle.gpu, "VRAM"
        return handle.ptr + span.offset, 0, "DRAM"

    def close_domain(self, domain: Domain) -> None:
        for (dom, gpu), held in list(self._domains.items()):
            if dom != domain:
                continue
            if held.slabs:
                logger.warning("GPU %d: workflow %s still holds %d slabs; its pool stays", gpu, domain, held.slabs)
                continue
            del self._domains[(dom, gpu)]
            self.drop_events(list(held.copy_events))
            try:
                held.stream.synchronize()
                held.mr.close()
            except Exception:  # noqa: BLE001 - closing must go on
                logger.exception("GPU %d: closing the pool of %s failed", gpu, domain)
        for event_id, event in list(self._events.items()):
            if event.domain == domain:
                self.drop_events([event_id])

    # --- slabs --------------------------------------------------------------------------------

    def create_slab(self, domain: Domain, location: Location, nbytes: int) -> GpuSlab | HostSlab:
        gpu = location.gpu
        if gpu is None:
            segment = ShmSegment(nbytes, name="faastube-host")
            try:
                self._cupy.cuda.runtime.hostRegister(segment.address, nbytes, 0)
            except Exception as e:
                segment.close()
                raise errors.OutOfPoolMemory(f"cannot pin {nbytes} bytes of host memory: {e}") from e
            return HostSlab(segment, segment.address)
        if gpu not in self._devices:
            raise errors.InvalidRequest(f"no GPU {gpu} in this sidecar")
        held = self._domain_gpu(domain, gpu)
        self._devices[gpu].set_current()
        stream = self._alloc_streams[gpu]
        try:
            buf = held.mr.allocate(nbytes, stream=stream)
        except Exception as e:
            raise errors.OutOfPoolMemory(f"GPU {gpu} cannot hold a {nbytes}-byte slab: {e}") from e
        try:
            ptr = int(buf.handle)
            # Wipe: the pool's memory may have held another domain's bytes in this process.
            self._cupy.cuda.runtime.memsetAsync(ptr, 0, nbytes, int(stream.handle))
            stream.sync()
            payload = self._export_pointer(ptr)
        except Exception:
            buf.close(stream)
            raise
        held.slabs += 1
        return GpuSlab(gpu, domain, buf, ptr, nbytes, payload)

    def _export_pointer(self, ptr: int) -> bytes:
        d = self._driver
        err, data = d.cuMemPoolExportPointer(ptr)
        if err != d.CUresult.CUDA_SUCCESS:
            raise errors.InternalError(f"cuMemPoolExportPointer failed: {err}")
        return ctypes.string_at(data.getPtr(), _EXPORT_DATA_BYTES)

    def destroy_slab(self, handle: GpuSlab | HostSlab) -> None:
        if isinstance(handle, HostSlab):
            try:
                self._cupy.cuda.runtime.hostUnregister(handle.ptr)
            finally:
                handle.segment.close()
            return
        self._devices[handle.gpu].set_current()
        handle.buffer.close(self._alloc_streams[handle.gpu])
        self._alloc_streams[handle.gpu].sync()
        held = self._domains.get((handle.domain, handle.gpu))
        if held is not None:
            held.slabs -= 1

    def freeze_slab(self, handle: GpuSlab | HostSlab) -> bool:
        if isinstance(handle, HostSlab):
            handle.segment.freeze()
            return True
        return False     # CUDA IPC has no read-only mapping: whoever maps a GPU slab may write it

    def pool_of(self, handle: GpuSlab | HostSlab) -> str | None:
        if isinstance(handle, HostSlab):
            return None
        return self._domains[(handle.domain, handle.gpu)].name

    def export_slab(self, handle: GpuSlab | HostSlab, *, with_pool: bool, writable: bool) -> Export:
        if isinstance(handle, HostSlab):
            return Export({"kind": "shm", "size": handle.size, "writable": writable},
                          (handle.segment.export_fd(writable=writable),))
        held = self._domains[(handle.domain, handle.gpu)]
        descriptor = {"kind": "cuda", "gpu": handle.gpu, "size": handle.size, "pool": held.name,
                      "payload": protocol.encode_handle(handle.payload)}
        fds: tuple[int, ...] = ()
        if with_pool:
            fds = (os.dup(int(held.mr.allocation_handle.handle)),)
        return Export(descriptor, fds)

    # --- fence events -------------------------------------------------------------------------

    def _new_event(self, domain: Domain, gpu: int) -> FenceEvent:
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(gpu):
            ptr = rt.eventCreateWithFlags(_EVENT_DISABLE_TIMING | _EVENT_INTERPROCESS)
            try:
                handle = bytes(rt.ipcGetEventHandle(ptr))
            except Exception:
                rt.eventDestroy(ptr)
                raise
        event = _Event(gpu, domain, ptr, handle)
        event_id = next(_event_ids)
        self._events[event_id] = event
        return FenceEvent(event_id, handle)

    def fence_events(self, domain: Domain, gpu: int, count: int) -> list[FenceEvent]:
        if gpu not in self._devices:
            raise errors.InvalidRequest(f"no GPU {gpu} in this sidecar")
        return [self._new_event(domain, gpu) for _ in range(count)]

    def event_handle(self, event_id: int) -> bytes:
        return self._events[event_id].handle

    def fence_done(self, fence: Fence) -> bool:
        # Measured on H200: an inter-process event's query reflects records made by any process
        # (not ready while another process's recorded work runs, success after).
        event = self._events.get(fence[-1][0])
        if event is None:
            return True
        return bool(self._cupy.cuda.runtime.eventQuery(event.ptr) == 0)

    def drop_events(self, event_ids: list[int]) -> None:
        for event_id in event_ids:
            event = self._events.pop(event_id, None)
            if event is None:
                continue
            try:
                with self._cupy.cuda.Device(event.gpu):
                    self._cupy.cuda.runtime.eventDestroy(event.ptr)
            except Exception:  # noqa: BLE001 - an event we can't destroy is a small leak, not a failure
                logger.exception("destroying event %d failed", event_id)

    # --- copies -------------------------------------------------------------------------------

    @staticmethod
    def _ptr(span: Span) -> int:
        return int(span.handle.ptr) + span.offset

    def path_for(self, dst: Location, src: Location) -> str:
        if dst.is_host and src.is_host:
            return "host"
        if dst.gpu is None:
            return "d2h"
        if src.gpu is None:
            return "h2d"
        if dst.gpu == src.gpu:
            return "local"
        return self._links[(src.gpu, dst.gpu)]

    def _relays_pay(self, src: Location, dst: Location) -> bool:
        """A GPU-to-GPU copy whose planned route is not just the direct link (asymmetric boxes)."""
        if src.gpu is None or dst.gpu is None or src.gpu == dst.gpu or self._scheduled is None:
            return False
        key = (src.gpu, dst.gpu)
        verdict = self._relay_verdicts.get(key)
        if verdict is None:
            # Idle-link planning: the verdict depends on the topology only, so decide once per pair.
            verdict = self._relay_verdicts[key] = self._scheduled.needs_engine(src.gpu, dst.gpu)
        return verdict

    def submit_copy(self, dst: Span, src: Span, *, after: Fence | None, domain: Domain,
                    requester: tuple[str, str] | None = None) -> CopyTicket:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        path = self.path_for(dst.location, src.location)
        if path == "host":
            n = src.nbytes
            dst.handle.segment.bytes[dst.offset:dst.offset + n] = src.handle.segment.bytes[src.offset:src.offset + n]
            done.set_result(None)
            return CopyTicket(path, done)
        scheduled = self._scheduled
        if scheduled is not None and (
                # The engine itself knows from what size splitting over several links pays.
                (path in ("h2d", "d2h")
                 and scheduled.wants_engine(_endpoint(src.location), _endpoint(dst.location), src.nbytes))
                or (src.nbytes >= MULTIPATH_MIN_BYTES and self._relays_pay(src.location, dst.location))):
            return self._submit_scheduled(dst, src, path, after, domain, requester, done)
        # Issue on the domain's stream of the GPU that receives (or, for d2h, sends) the bytes.
        gpu = dst.location.gpu if dst.location.gpu is not None else src.location.gpu
        if gpu is None:  # pragma: no cover - path "host" returned above
            raise errors.InternalError("a host-to-host copy reached the GPU path")
        held = self._domain_gpu(domain, gpu)
        stream = held.stream
        rt = self._cupy.cuda.runtime
        chunks = after or ((0, src.nbytes),)
        ready: list[Any] = [None] * len(chunks)
        src_gpu = src.location.gpu
        if after and src_gpu is not None and src_gpu != gpu:
            # A fence is waited on by a stream of its own GPU only (a stream of another GPU waiting
            # on an event another process recorded crashes the driver, seen on H200): the source
            # GPU's domain stream waits for it and marks each chunk with an event of ours.
            source = self._domain_gpu(domain, src_gpu).stream
            with self._cupy.cuda.Device(src_gpu):
                for i, (event_id, _) in enumerate(chunks):
                    event = self._events.get(event_id)
                    if event is not None:
                        rt.streamWaitEvent(source.ptr, event.ptr, 0)
                    ready[i] = source.record()
        with self._cupy.cuda.Device(gpu):
            start = 0
            for i, (event_id, end) in enumerate(chunks):
                mark = ready[i]
                if mark is not None:
                    stream.wait_event(mark)
                else:
                    event = self._events.get(event_id)
                    if event is not None:
                        rt.streamWaitEvent(stream.ptr, event.ptr, 0)
                if end > start:
                    if path in ("nvlink", "pcie", "peer"):
                        rt.memcpyPeerAsync(self._ptr(dst) + start, gpu, self._ptr(src) + start,
                                           src.location.gpu, end - start, stream.ptr)
                    else:
                        rt.memcpyAsync(self._ptr(dst) + start, self._ptr(src) + start, end - start,
                                       _MEMCPY_DEFAULT, stream.ptr)
                start = end
            fence: Fence | None = None
            copy_event = held.copy_event() if dst.location.gpu is not None else None
            if copy_event is not None:
                # Readers on this GPU order their stream after this record: no round trip to wait for.
                rt.eventRecord(self._events[copy_event].ptr, stream.ptr)
                fence = ((copy_event, dst.nbytes),)
            finished = stream.record()
        if fence is None:
            # Someone waits for this copy (a CPU reader): block a helper thread on it.
            future = loop.run_in_executor(self._waiters, finished.synchronize)
            future.add_done_callback(lambda f: _settle(done, f.exception()))
        else:
            # The reader's stream already waits on the GPU; we only need to know when the
            # memory is free to recycle, so poll from the loop instead of waking a thread.
            estimate_s = max(src.nbytes / _PEER_BYTES_PER_S, 50e-6)
            loop.call_later(estimate_s, self._poll_copy, loop, finished, done, estimate_s)
        return CopyTicket(path, done, fence)

    def _submit_scheduled(self, dst: Span, src: Span, path: str, after: Fence | None, domain: Domain,
                          requester: tuple[str, str] | None, done: asyncio.Future[None]) -> CopyTicket:
        """Through the transfer engine, whose streams every domain shares: so the writer's fence is
        awaited on the host first (a fence that never completes then stalls only this copy)."""
        scheduled = self._scheduled
        if scheduled is None:  # pragma: no cover - checked by the caller
            raise errors.InternalError("the transfer engine is off")
        loop = asyncio.get_running_loop()
        workflow, function = requester or ("", "sidecar")
        ticket = CopyTicket(path, done, None, f"{path}-engine")

        def start() -> None:
            route, future = scheduled.submit(
                src=_endpoint(src.location), dst=_endpoint(dst.location),
                src_address=self._ptr(src), dst_address=self._ptr(dst), nbytes=src.nbytes,
                workflow=workflow, function=function)
            ticket.route = route
            future.add_done_callback(lambda f: loop.call_soon_threadsafe(_settle, done, f.exception()))

        if after:
            # Order a marker of our own after the writer's fence on the domain's stream, and poll it:
            # the engine starts once the writer's bytes are there.
            gpu = src.location.gpu if src.location.gpu is not None else dst.location.gpu
            if gpu is None:  # pragma: no cover - fences only exist on GPUs
                raise errors.InternalError("a fence on host memory")
            held = self._domain_gpu(domain, gpu)
            with self._cupy.cuda.Device(gpu):
                for event_id, _ in after:
                    event = self._events.get(event_id)
                    if event is not None:
                        self._cupy.cuda.runtime.streamWaitEvent(held.stream.ptr, event.ptr, 0)
                marker = held.stream.record()
            deadline = time.monotonic() + FENCE_TIMEOUT_S

            def check(interval_s: float) -> None:
                if done.done():
                    return
                if marker.done:
                    start()
                elif time.monotonic() > deadline:
                    _settle(done, errors.Unavailable(
                        f"the writer's GPU work never finished ({FENCE_TIMEOUT_S:g}s): copy abandoned"))
                else:
                    loop.call_later(interval_s, check, min(interval_s * 2, 0.005))

            loop.call_soon(check, 50e-6)
        else:
            start()
        return ticket

    def _poll_copy(self, loop: asyncio.AbstractEventLoop, finished: Any, done: asyncio.Future[None],
                   interval_s: float) -> None:
        try:
            landed = finished.done
        except Exception as e:  # noqa: BLE001 - a failed copy fails its waiters
            _settle(done, e)
            return
        if landed:
            _settle(done, None)
        else:
            loop.call_later(min(interval_s * 2, 0.01), self._poll_copy, loop, finished, done, min(interval_s * 2, 0.01))

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.close()
        self._waiters.shutdown(wait=True)
        for domain in {d for d, _ in self._domains}:
            self.close_domain(domain)
        self.drop_events(list(self._events))


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(None)


def _endpoint(location: Location) -> int | Literal["host"]:
    return "host" if location.gpu is None else location.gpu
