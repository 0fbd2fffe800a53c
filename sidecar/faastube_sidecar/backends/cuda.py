"""The CUDA backend: one IPC-enabled, stream-ordered memory pool per GPU.

Slabs on a GPU are allocations from a cuda.core `DeviceMemoryResource(ipc_enabled=True)`
owned by the sidecar. A client imports each GPU's pool once (its fd travels over the
socket with SCM_RIGHTS) and maps each slab once from its IPC descriptor; it never
allocates in our pools, and it can't outlive-free anything (gpu-facts pitfall 5).

Host slabs are shared-memory segments registered with `cudaHostRegister`, so CPU
functions write straight into pinned memory and host<->GPU copies run at pinned
speed without a staging copy.

Copies are issued on per-GPU streams and awaited from a small thread pool, so the
event loop keeps serving while the copy engines work.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from faastube import errors, protocol

from faastube_sidecar.backends import CopyTicket, Export, Span
from faastube_sidecar.backends.shm import ShmSegment

if TYPE_CHECKING:
    from faastube_sidecar.backends.cuda_transfers import ScheduledTransfers

MULTIPATH_MIN_BYTES = 32 << 20   # below this one cudaMemcpyAsync beats the engine's thread hop

logger = logging.getLogger(__name__)

_MEMCPY_DEFAULT = 4   # cudaMemcpyDefault: direction inferred through unified addressing
_PEER_BYTES_PER_S = 380e9   # measured NVLink peer rate on H100: when to look for a copy's end
_EVENT_DISABLE_TIMING = 0x2
_EVENT_INTERPROCESS = 0x4


def normalize_bus_id(bus_id: str) -> str:
    """'00000000:19:00.0' and '0000:19:00.0' name the same device."""
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id


@dataclass(eq=False)
class GpuSlab:
    gpu: int
    buffer: Any          # cuda.core Buffer, owned
    ptr: int
    size: int
    payload: bytes       # IPC descriptor payload (cudaMemPoolPtrExportData)


@dataclass(eq=False)
class HostSlab:
    segment: ShmSegment
    ptr: int

    @property
    def fd(self) -> int:
        return self.segment.fd

    @property
    def size(self) -> int:
        return self.segment.size


class CudaBackend:
    name = "cuda"

    def __init__(self, *, pool_max_bytes: int = 0, devices: list[int] | None = None,
                 multipath: bool = True, copy_events: bool = True) -> None:
        import cupy
        from cuda.core import Device, DeviceMemoryResource, DeviceMemoryResourceOptions

        self._cupy = cupy
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            raise errors.Unavailable("the cuda backend needs a GPU and none is visible")
        self.gpus = list(range(count)) if devices is None else devices
        self._devices = {i: Device(i) for i in self.gpus}
        self._mrs: dict[int, Any] = {}
        self._alloc_streams: dict[int, Any] = {}
        self._copy_streams: dict[int, Any] = {}
        self._bus_ids: dict[str, int] = {}
        for i in self.gpus:
            dev = self._devices[i]
            dev.set_current()
            options = DeviceMemoryResourceOptions(ipc_enabled=True, max_size=pool_max_bytes)
            self._mrs[i] = DeviceMemoryResource(dev, options)
            self._alloc_streams[i] = dev.create_stream()
            with cupy.cuda.Device(i):
                self._copy_streams[i] = cupy.cuda.Stream(non_blocking=True)
            self._bus_ids[normalize_bus_id(dev.pci_bus_id)] = i
        self._links = self._peer_links()
        rt = cupy.cuda.runtime
        for i in self.gpus:
            peers = [j for j in self.gpus if j != i and self._devices[i].can_access_peer(j)]
            with cupy.cuda.Device(i):
                for j in peers:
                    # Without peer access a peer copy is staged through the host (~38 GB/s, not ~390).
                    try:
                        rt.deviceEnablePeerAccess(j)
                    except cupy.cuda.runtime.CUDARuntimeError as e:
                        if "AlreadyEnabled" not in str(e) and "ALREADY" not in str(e).upper():
                            logger.warning("peer access %d -> %d: %s", i, j, e)
            if peers:
                # Peer copies out of this pool need the peers to have access to it.
                self._mrs[i].peer_accessible_by = peers
        self._ipc_events: dict[int, int] = {}
        self._ipc_event_handles: dict[int, bytes] = {}
        for i in self.gpus if copy_events else ():
            try:
                with cupy.cuda.Device(i):
                    event = rt.eventCreateWithFlags(_EVENT_DISABLE_TIMING | _EVENT_INTERPROCESS)
                    self._ipc_event_handles[i] = bytes(rt.ipcGetEventHandle(event))
                self._ipc_events[i] = event
            except Exception as e:  # noqa: BLE001 - consumers then wait for the copy's end instead
                logger.warning("GPU %d: no inter-process copy event (%s); GPU gets wait for copies", i, e)
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

    def locations(self) -> tuple[str, ...]:
        return (protocol.HOST, *(protocol.gpu_location(i) for i in self.gpus))

    def gpu_for_bus_id(self, pci_bus_id: str) -> int | None:
        try:
            return self._bus_ids.get(normalize_bus_id(pci_bus_id))
        except ValueError:
            return None

    # --- slabs --------------------------------------------------------------------------------

    def create_slab(self, location: str, nbytes: int) -> GpuSlab | HostSlab:
        gpu = protocol.parse_location(location)
        if gpu is None:
            segment = ShmSegment(nbytes, name="faastube-host")
            try:
                self._cupy.cuda.runtime.hostRegister(segment.address, nbytes, 0)
            except Exception as e:
                segment.close()
                raise errors.OutOfPoolMemory(f"cannot pin {nbytes} bytes of host memory: {e}") from e
            return HostSlab(segment, segment.address)
        self._devices[gpu].set_current()
        stream = self._alloc_streams[gpu]
        try:
            buf = self._mrs[gpu].allocate(nbytes, stream=stream)
            stream.sync()
        except Exception as e:
            raise errors.OutOfPoolMemory(f"GPU {gpu} cannot hold a {nbytes}-byte slab: {e}") from e
        _, (payload, _size) = buf.ipc_descriptor.__reduce__()
        return GpuSlab(gpu, buf, int(buf.handle), nbytes, bytes(payload))

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

    def export_slab(self, handle: GpuSlab | HostSlab, *, with_pool: bool) -> Export:
        if isinstance(handle, HostSlab):
            return Export({"kind": "shm", "size": handle.size}, (handle.fd,))
        descriptor = {"kind": "cuda", "gpu": handle.gpu, "size": handle.size,
                      "payload": base64.b64encode(handle.payload).decode()}
        fds: tuple[int, ...] = ()
        if with_pool:
            fds = (int(self._mrs[handle.gpu].allocation_handle.handle),)
        return Export(descriptor, fds)

    # --- copies -------------------------------------------------------------------------------

    @staticmethod
    def _ptr(span: Span) -> int:
        return int(span.handle.ptr) + span.offset

    def path_for(self, dst_location: str, src_location: str) -> str:
        dst, src = protocol.parse_location(dst_location), protocol.parse_location(src_location)
        if dst is None and src is None:
            return "host"
        if dst is None:
            return "d2h"
        if src is None:
            return "h2d"
        if dst == src:
            return "local"
        return self._links[(src, dst)]

    def _relays_pay(self, src_location: str, dst_location: str) -> bool:
        """A GPU-to-GPU copy whose planned route is not just the direct link (asymmetric boxes)."""
        src, dst = protocol.parse_location(src_location), protocol.parse_location(dst_location)
        if src is None or dst is None or src == dst or self._scheduled is None:
            return False
        key = (src, dst)
        verdict = self._relay_verdicts.get(key)
        if verdict is None:
            # Idle-link planning: the verdict depends on the topology only, so decide once per pair.
            verdict = self._relay_verdicts[key] = self._scheduled.needs_engine(src, dst)
        return verdict

    def _submit_scheduled(self, dst: Span, src: Span, path: str, requester: tuple[str, str] | None,
                          done: asyncio.Future[None]) -> CopyTicket:
        assert self._scheduled is not None
        loop = asyncio.get_running_loop()
        workflow, function = requester or ("", "sidecar")
        route, future = self._scheduled.submit(
            src=_endpoint(src.location), dst=_endpoint(dst.location),
            src_address=self._ptr(src), dst_address=self._ptr(dst), nbytes=src.nbytes,
            workflow=workflow, function=function)

        future.add_done_callback(lambda f: loop.call_soon_threadsafe(_settle, done, f.exception()))
        return CopyTicket(path, done, None, route)

    def submit_copy(self, dst: Span, src: Span, *, requester: tuple[str, str] | None = None) -> CopyTicket:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        path = self.path_for(dst.location, src.location)
        if path == "host":
            n = src.nbytes
            dst.handle.segment.bytes[dst.offset:dst.offset + n] = src.handle.segment.bytes[src.offset:src.offset + n]
            done.set_result(None)
            return CopyTicket(path, done)
        # Issue on the stream of the GPU that receives (or, for d2h, sends) the bytes.
        dst_gpu = protocol.parse_location(dst.location)
        gpu = dst_gpu if dst_gpu is not None else protocol.parse_location(src.location)
        assert gpu is not None
        if self._scheduled is not None and src.nbytes >= MULTIPATH_MIN_BYTES and (
                path in ("h2d", "d2h") or self._relays_pay(src.location, dst.location)):
            return self._submit_scheduled(dst, src, path, requester, done)
        stream = self._copy_streams[gpu]
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(gpu):
            if path in ("nvlink", "pcie", "peer"):
                src_gpu = protocol.parse_location(src.location)
                rt.memcpyPeerAsync(self._ptr(dst), gpu, self._ptr(src), src_gpu, src.nbytes, stream.ptr)
            else:
                rt.memcpyAsync(self._ptr(dst), self._ptr(src), src.nbytes, _MEMCPY_DEFAULT, stream.ptr)
            wait_gpu = None
            ipc_event = self._ipc_events.get(gpu)
            if dst_gpu is not None and ipc_event is not None:
                # Consumers on this GPU order their stream after this record: no round trip to wait for.
                rt.eventRecord(ipc_event, stream.ptr)
                wait_gpu = gpu
            finished = stream.record()
        if wait_gpu is None:
            # Someone waits for this copy (a CPU reader): block a helper thread on it.
            future = loop.run_in_executor(self._waiters, finished.synchronize)
            future.add_done_callback(lambda f: _settle(done, f.exception()))
        else:
            # The consumer's stream already waits on the GPU; we only need to know when the
            # memory is free to recycle, so poll from the loop instead of waking a thread.
            estimate_s = max(src.nbytes / _PEER_BYTES_PER_S, 50e-6)
            loop.call_later(estimate_s, self._poll_copy, loop, finished, done, estimate_s)
        return CopyTicket(path, done, wait_gpu)

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

    def copy_event(self, gpu: int) -> bytes | None:
        return self._ipc_event_handles.get(gpu)

    def memory_info(self, location: str) -> tuple[int, int]:
        gpu = protocol.parse_location(location)
        if gpu is None:
            import os

            page = os.sysconf("SC_PAGE_SIZE")
            return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
        with self._cupy.cuda.Device(gpu):
            free, total = self._cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.close()
        self._waiters.shutdown(wait=True)
        for mr in self._mrs.values():
            try:
                mr.close()
            except Exception:
                logger.exception("closing a GPU pool failed")


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(None)


def _endpoint(location: str) -> int | Literal["host"]:
    gpu = protocol.parse_location(location)
    return "host" if gpu is None else gpu
