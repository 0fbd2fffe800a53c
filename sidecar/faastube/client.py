"""The client functions use to pass arrays through the node's sidecar.

    client = faastube.connect()
    ref = client.put(array, consumers=1)        # a short string: send it anywhere
    array = client.get(ref)                     # zero-copy when the data is already here

`get` returns a view into pool memory (read it, don't write it) and holds a *lease*
on the object until the view is garbage collected or `release(ref)` is called; the
object's memory is never recycled while a lease is open. With `copy=True` you get a
private copy and the lease ends at once.

The client is synchronous and thread-safe (one request at a time per connection);
function processes normally hold one connection for their whole life.
"""

from __future__ import annotations

import array as _array
import logging
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from faastube import arrays, errors, protocol
from faastube.mapping import CudaImporter, CudaSlab, HostSlab, map_host_slab

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/faastube/faastube.sock"
_READ_BYTES = 256 << 10
_ANCILLARY_BYTES = socket.CMSG_SPACE(protocol.MAX_FDS_PER_FRAME * _array.array("i").itemsize)

Device = int | str | None


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    ref: str
    size_bytes: int
    dtype: str
    shape: tuple[int, ...]
    state: str
    locations: tuple[str, ...]
    consumers_left: int | None
    readers: int
    expires_in_s: float
    owner: dict[str, str]


class _LeaseState:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class _Lease:
    """Owned by every view of one `get`; its death ends the read."""

    __slots__ = ("__weakref__", "slab", "state")

    def __init__(self, slab: HostSlab | CudaSlab) -> None:
        self.state = _LeaseState()
        self.slab = slab            # keeps the mapping alive while views exist


class _HostView:
    """Exposes slab bytes to NumPy; being the array's base keeps the lease alive."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str, owner: object, *, readonly: bool) -> None:
        self.__array_interface__ = {"data": (ptr, readonly), "shape": shape, "typestr": dtype, "version": 3}
        self.owner = owner


class Writable:
    """Pool memory handed out by `empty`: write into `.array`, then `seal` it."""

    def __init__(self, ref: str, array: Any, location: str) -> None:
        self.ref = ref
        self.array = array
        self.location = location
        self.sealed = False

    def __repr__(self) -> str:
        return f"Writable({self.ref!r}, shape={tuple(self.array.shape)}, location={self.location!r})"


class Client:
    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, namespace: str | None = None,
                 workflow: str | None = None, function: str | None = None, timeout_s: float | None = 60.0,
                 spin_us: float | None = None) -> None:
        path = os.fspath(socket_path or os.environ.get("FAASTUBE_SOCKET") or DEFAULT_SOCKET)
        self.socket_path = path
        self._timeout_ms = -1 if timeout_s is None else max(1, int(timeout_s * 1000))
        # Busy-poll this long for a reply before sleeping: a sleeping process pays a wake-up
        # (tens of us in a VM) on every round trip. Costs CPU only while a reply is due.
        raw_spin = os.environ.get("FAASTUBE_SPIN_US", "0") if spin_us is None else spin_us
        try:
            self._spin_s = float(raw_spin) / 1e6
        except (TypeError, ValueError):
            raise errors.InvalidRequest(f"spin_us ($FAASTUBE_SPIN_US) must be a number, got {raw_spin!r}") from None
        if not 0 <= self._spin_s <= 0.01:
            raise errors.InvalidRequest(f"spin_us ($FAASTUBE_SPIN_US) must be in [0, 10000], got {raw_spin!r}")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        for attempt in range(50):
            try:
                self._sock.connect(path)
                break
            except BlockingIOError:
                # The sidecar's accept queue is full: a burst of connects. Back off briefly.
                time.sleep(0.001 * (attempt + 1))
            except OSError as e:
                self._sock.close()
                raise errors.Unavailable(f"cannot reach the faastube sidecar at {path}: {e.strerror or e}") from e
        else:
            self._sock.close()
            raise errors.Unavailable(f"the faastube sidecar at {path} accepts no connections (queue full)")
        self._lock = threading.RLock()
        self._next_id = 1
        self._slabs: dict[int, HostSlab | CudaSlab] = {}
        self._cuda: CudaImporter | None = None
        self._pending_releases: list[str] = []
        self._pending_lock = threading.Lock()
        self._open_leases: dict[str, list[weakref.ref[_Lease]]] = {}
        self.closed = False
        # A blocking socket whose receive timeout is the kernel's (SO_RCVTIMEO): one recvmsg per
        # reply, no poll() before it, and MSG_DONTWAIT spins really don't block.
        self._sock.settimeout(None)
        if self._timeout_ms > 0:
            seconds, ms = divmod(self._timeout_ms, 1000)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, ms * 1000))
        devices = _visible_devices()
        hello: dict[str, Any] = {"version": protocol.VERSION, "devices": devices}
        namespace = namespace or os.environ.get("FAASTUBE_NAMESPACE")
        workflow = workflow or os.environ.get("FAASTUBE_WORKFLOW")
        function = function or os.environ.get("FAASTUBE_FUNCTION")
        for key, value in (("namespace", namespace), ("workflow", workflow), ("function", function)):
            if value:
                hello[key] = value
        try:
            reply, _ = self._call(protocol.Op.HELLO, hello)
        except BaseException:
            self._sock.close()
            raise
        self.backend: str = reply["backend"]
        self.locations: tuple[str, ...] = tuple(reply["locations"])
        self.identity: dict[str, str] = reply["identity"]
        # This process's CUDA ordinal -> the sidecar's GPU index, and back.
        self._gpu_of = {int(k): int(v) for k, v in reply["device_map"].items()}
        self._ordinal_of = {v: k for k, v in self._gpu_of.items()}

    # --- public API ---------------------------------------------------------------------------

    def put(self, obj: Any, *, consumers: int | None = None, ttl: float | None = None) -> str:
        """Copy an array into the pool where it lives (same GPU, or host) and publish it."""
        described = arrays.describe(obj)
        if isinstance(described, arrays.HostArray):
            src = described.array
            writable = self._alloc(src.nbytes, src.dtype, src.shape, protocol.HOST)
            if src.nbytes:
                np.copyto(writable.array, src, casting="no")
        else:
            writable = self._alloc(described.nbytes, described.dtype, described.shape,
                                   self._location_for(described.device))
            if described.nbytes:
                import cupy

                with cupy.cuda.Device(described.device):
                    stream = cupy.cuda.get_current_stream()
                    # Same GPU, device to device: never through host memory.
                    cupy.cuda.runtime.memcpyAsync(writable.array.data.ptr, described.ptr, described.nbytes,
                                                  4, stream.ptr)
        return self._seal(writable, consumers=consumers, ttl=ttl,
                          copied="host" if writable.location == protocol.HOST else "local")

    def empty(self, shape: int | Sequence[int], dtype: Any = np.float32, *, device: Device = None) -> Writable:
        """Pool memory to write into directly; `seal` publishes it without a copy."""
        dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        dt = np.dtype(dtype)
        return self._alloc(int(np.prod(dims, dtype=np.int64)) * dt.itemsize, dt, dims, self._resolve(device))

    def seal(self, writable: Writable | str, *, consumers: int | None = None, ttl: float | None = None) -> str:
        """Publish memory from `empty` (no copy); `consumers` reads release it, `ttl` seconds expire it."""
        return self._seal(writable, consumers=consumers, ttl=ttl, copied=None)

    def _seal(self, writable: Writable | str, *, consumers: int | None, ttl: float | None,
              copied: str | None) -> str:
        if isinstance(writable, Writable):
            gpu = protocol.parse_location(writable.location)
            if gpu is not None:
                import cupy

                # The writer's kernels must be done before readers can see the bytes.
                with cupy.cuda.Device(self._ordinal_of[gpu]):
                    cupy.cuda.get_current_stream().synchronize()
            ref = writable.ref
        else:
            ref = writable
        body: dict[str, Any] = {"ref": ref}
        if consumers is not None:
            body["consumers"] = consumers
        if ttl is not None:
            body["ttl_s"] = ttl
        if copied is not None:
            body["copied"] = copied
        self._call(protocol.Op.SEAL, body)
        if isinstance(writable, Writable):
            writable.sealed = True
        return ref

    def get(self, ref: str, *, device: Device = None, copy: bool = False) -> Any:
        """The object's data where you want it: NumPy for the host, CuPy for a GPU."""
        location = self._resolve(device)
        reply, fds = self._call(protocol.Op.GET, {"ref": ref, "location": location})
        slab = self._slab_for(reply, fds)
        lease = _Lease(slab)
        state = lease.state
        weakref.finalize(lease, self._lease_died, ref, state)
        self._open_leases.setdefault(ref, []).append(weakref.ref(lease))
        alloc = reply["alloc"]
        wait = reply.get("wait")
        if wait is not None:
            self._order_after_copy(wait, slab)
        view = self._view(slab, alloc["offset"], tuple(reply["shape"]), reply["dtype"], lease, readonly=True)
        self.last_path: str = reply.get("path", "local")
        if copy:
            out = view.copy()
            del view
            self.release(ref)
            return out
        return view

    def release(self, ref: str, *, consumed: bool = True) -> None:
        """End one read of `ref`.

        It counts toward the object's declared consumers unless `consumed=False`
        (e.g. the call that read it failed and will be retried).
        """
        lease = None
        for candidate in self._open_leases.get(ref, []):
            lease = candidate()
            if lease is not None and not lease.state.done:
                break
            lease = None
        if lease is None:
            # Its views may already be garbage collected, with the release queued: send it now.
            with self._pending_lock:
                queued = ref in self._pending_releases
                if queued:
                    self._pending_releases.remove(ref)
            if not queued:
                raise errors.InvalidRequest(f"release {ref!r}: this client holds no open read of it")
        else:
            lease.state.done = True
        self._forget_lease(ref)
        body: dict[str, Any] = {"refs": [ref]}
        if not consumed:
            body["consumed"] = False
        self._call(protocol.Op.RELEASE, body)

    def free(self, ref: str) -> None:
        """Drop the object now (readers holding views keep their memory until they let go)."""
        self._call(protocol.Op.FREE, {"ref": ref})

    def stat(self, ref: str) -> ObjectInfo:
        r, _ = self._call(protocol.Op.STAT, {"ref": ref})
        return ObjectInfo(r["ref"], r["nbytes"], r["dtype"], tuple(r["shape"]), r["state"], tuple(r["locations"]),
                          r["consumers_left"], r["readers"], r["expires_in_s"], r["owner"])

    def stats(self) -> dict[str, Any]:
        return self._call(protocol.Op.STATS, {})[0]

    def ping(self) -> None:
        self._call(protocol.Op.PING, {})

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - destructors never raise
            pass

    # --- locations ----------------------------------------------------------------------------

    @property
    def gpu_indices(self) -> dict[int, int]:
        """This process's CUDA ordinal -> the node's GPU index, for every GPU the sidecar pools."""
        return dict(self._gpu_of)

    def cuda_ordinal(self, gpu_index: int) -> int | None:
        """This process's CUDA ordinal of the node's GPU `gpu_index` (None: not visible here)."""
        return self._ordinal_of.get(gpu_index)

    def _resolve(self, device: Device) -> str:
        if device in ("cpu", "host"):
            return protocol.HOST
        if device is None:
            if not self._gpu_of:
                return protocol.HOST
            import cupy

            return self._location_for(int(cupy.cuda.runtime.getDevice()))
        if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
            return self._location_for(int(device))
        raise errors.InvalidRequest(f"device must be None, 'cpu' or a CUDA ordinal, got {device!r}")

    def _location_for(self, ordinal: int) -> str:
        gpu = self._gpu_of.get(ordinal)
        if gpu is None:
            raise errors.InvalidRequest(
                f"CUDA device {ordinal} of this process has no pool in the sidecar (backend {self.backend}; "
                f"pools: {', '.join(self.locations)})")
        return protocol.gpu_location(gpu)

    # --- memory -------------------------------------------------------------------------------

    def _alloc(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...], location: str) -> Writable:
        reply, fds = self._call(protocol.Op.ALLOC, {"nbytes": int(nbytes), "dtype": dtype.str,
                                                     "shape": list(shape), "location": location})
        slab = self._slab_for(reply, fds)
        view = self._view(slab, reply["alloc"]["offset"], shape, dtype.str, slab, readonly=False)
        return Writable(reply["ref"], view, location)

    def _slab_for(self, reply: dict[str, Any], fds: list[int]) -> HostSlab | CudaSlab:
        intro = reply.get("slab")
        try:
            if intro is not None:
                self._map(intro, fds)
            alloc = reply["alloc"]
            return self._slabs[alloc["slab"]]
        except KeyError as e:
            raise errors.ProtocolError(f"reply names slab {e} that was never introduced") from None
        finally:
            for fd in fds:   # anything the mapping did not consume
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _map(self, intro: dict[str, Any], fds: list[int]) -> None:
        slab_id, kind, size = int(intro["id"]), intro["kind"], int(intro["size"])
        count = int(intro.get("fds", 0))
        if count > len(fds):
            raise errors.ProtocolError(f"slab {slab_id}: {count} descriptors announced, {len(fds)} received")
        mine, fds[:count] = fds[:count], []
        if kind == "shm":
            self._slabs[slab_id] = map_host_slab(slab_id, size, mine[0])
            return
        if kind == "cuda":
            gpu = int(intro["gpu"])
            ordinal = self._ordinal_of.get(gpu)
            if ordinal is None:
                for fd in mine:
                    os.close(fd)
                raise errors.ProtocolError(f"slab {slab_id} is on GPU {gpu}, which this process can't see")
            if self._cuda is None:
                self._cuda = CudaImporter()
            if mine:
                self._cuda.import_pool(gpu, ordinal, mine[0])
            self._slabs[slab_id] = self._cuda.map_slab(slab_id, size, gpu, ordinal, intro["payload"])
            return
        for fd in mine:
            os.close(fd)
        raise errors.ProtocolError(f"slab {slab_id}: unknown kind {kind!r}")

    def _view(self, slab: HostSlab | CudaSlab, offset: int, shape: tuple[int, ...], dtype: str,
              owner: object, *, readonly: bool) -> Any:
        if isinstance(slab, HostSlab):
            return np.asarray(_HostView(slab.ptr + offset, shape, dtype, owner, readonly=readonly))
        import cupy

        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        mem = cupy.cuda.UnownedMemory(slab.ptr + offset, nbytes, owner, device_id=slab.ordinal)
        return cupy.ndarray(shape, dtype=dt, memptr=cupy.cuda.MemoryPointer(mem, 0))

    def _order_after_copy(self, wait: dict[str, Any], slab: HostSlab | CudaSlab) -> None:
        """The sidecar replied before its copy finished: make our stream wait for it on the GPU."""
        if not isinstance(slab, CudaSlab) or self._cuda is None:
            raise errors.ProtocolError("a copy-event wait arrived for memory that is not on a GPU")
        event = self._cuda.copy_event(int(wait["gpu"]), slab.ordinal, wait.get("event"))
        import cupy

        with cupy.cuda.Device(slab.ordinal):
            cupy.cuda.runtime.streamWaitEvent(cupy.cuda.get_current_stream().ptr, event, 0)

    # --- leases -------------------------------------------------------------------------------

    def _lease_died(self, ref: str, state: _LeaseState) -> None:
        # Runs from the garbage collector: only queue; the next request carries it.
        if not state.done:
            state.done = True
            with self._pending_lock:
                self._pending_releases.append(ref)

    def _forget_lease(self, ref: str) -> None:
        live = [w for w in self._open_leases.get(ref, []) if (lease := w()) is not None and not lease.state.done]
        if live:
            self._open_leases[ref] = live
        else:
            self._open_leases.pop(ref, None)

    def flush(self) -> None:
        """Send releases queued by views that were garbage collected."""
        self._call(protocol.Op.PING, {})

    # --- wire ---------------------------------------------------------------------------------

    def _call(self, op: protocol.Op, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self.closed:
                raise errors.Unavailable("this faastube client is closed")
            with self._pending_lock:
                pending, self._pending_releases = self._pending_releases, []
            if pending and op is not protocol.Op.HELLO:
                for ref in set(pending):
                    self._forget_lease(ref)
                self._roundtrip(protocol.Op.RELEASE, {"refs": pending})
            return self._roundtrip(op, body)

    def _roundtrip(self, op: protocol.Op, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        try:
            self._sock.sendall(protocol.encode(protocol.Kind.REQUEST, request_id, {"op": op.value, **body}))
            header, reply, fds = self._read_frame()
        except (OSError, EOFError) as e:
            self.closed = True
            self._sock.close()
            raise errors.Unavailable(f"lost the sidecar connection during {op.value}: {e}") from e
        if header.request_id != request_id and header.request_id != 0:
            _close_all(fds)
            raise errors.ProtocolError(f"reply for request {header.request_id}, expected {request_id}")
        if header.kind is protocol.Kind.ERROR:
            _close_all(fds)
            raise protocol.exception_for(reply)
        retired = reply.pop("retired", None)
        if retired:
            self._unmap(retired)
        return reply, fds

    def _unmap(self, slab_ids: list[int]) -> None:
        for slab_id in slab_ids:
            self._slabs.pop(int(slab_id), None)   # live views keep their own mapping reference
        self._roundtrip(protocol.Op.UNMAP, {"slabs": [int(s) for s in slab_ids]})

    def _recv(self) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        if self._spin_s:
            end = time.perf_counter() + self._spin_s
            while time.perf_counter() < end:
                try:
                    chunk, ancdata, _flags, _addr = self._sock.recvmsg(_READ_BYTES, _ANCILLARY_BYTES,
                                                                       socket.MSG_DONTWAIT)
                    return chunk, ancdata
                except BlockingIOError:
                    continue
        try:
            chunk, ancdata, _flags, _addr = self._sock.recvmsg(_READ_BYTES, _ANCILLARY_BYTES)
        except BlockingIOError:   # SO_RCVTIMEO ran out
            raise TimeoutError(f"no reply from the sidecar within {self._timeout_ms} ms") from None
        return chunk, ancdata

    def _read_frame(self) -> tuple[protocol.Header, dict[str, Any], list[int]]:
        # One request is outstanding at a time, so whatever arrives belongs to its reply:
        # read in large chunks (usually the whole reply, and its fds, in one recvmsg).
        data = bytearray()
        fds: list[int] = []
        header: protocol.Header | None = None
        try:
            while True:
                chunk, ancdata = self._recv()
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = _array.array("i")
                        got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                        fds.extend(got)
                if not chunk:
                    raise EOFError("the sidecar closed the connection")
                data += chunk
                if header is None and len(data) >= protocol.HEADER_SIZE:
                    header = protocol.decode_header(data)
                if header is not None and len(data) >= protocol.HEADER_SIZE + header.body_bytes:
                    if len(data) > protocol.HEADER_SIZE + header.body_bytes:
                        raise errors.ProtocolError("sidecar sent bytes beyond the reply frame")
                    return header, protocol.decode_body(data[protocol.HEADER_SIZE:]), fds
        except BaseException:
            _close_all(fds)
            raise


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _visible_devices() -> list[dict[str, Any]]:
    """This process's CUDA devices by PCI bus id, so the sidecar can map virtualised ordinals."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or "cupy" not in _importable():
        return []
    try:
        import cupy

        return [{"ordinal": i, "pci_bus_id": cupy.cuda.Device(i).pci_bus_id}
                for i in range(cupy.cuda.runtime.getDeviceCount())]
    except Exception:  # noqa: BLE001 - no driver or no GPU: a CPU-only client
        return []


def _importable() -> set[str]:
    import importlib.util

    return {name for name in ("cupy",) if importlib.util.find_spec(name) is not None}


def connect(socket: str | os.PathLike[str] | None = None, *, namespace: str | None = None,
            workflow: str | None = None, function: str | None = None, timeout_s: float | None = 60.0,
            spin_us: float | None = None) -> Client:
    """Connect to the node's sidecar (default socket: $FAASTUBE_SOCKET).

    `spin_us` (default $FAASTUBE_SPIN_US, else 0): busy-poll that long for each reply
    before sleeping, trading a little CPU for lower round-trip latency.
    """
    return Client(socket, namespace=namespace, workflow=workflow, function=function, timeout_s=timeout_s,
                  spin_us=spin_us)
