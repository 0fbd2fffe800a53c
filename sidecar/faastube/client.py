"""The client functions use to pass arrays through the node's sidecar.

    client = faastube.connect()
    ref = client.put(array, consumers=1)        # a short string: send it anywhere
    array = client.get(ref)                     # zero-copy when the data is already here

Costs: a `put` copies the array into an *arena* of pool memory that the sidecar
leased to this client (once), and publishes it with one message that needs no
reply: no round trip. A `get` is one round trip whose reply carries everything
(the slab on first sight, the fence to order the reader's stream after). GPU work is
ordered with events on the GPU, never with a synchronize.

`get` returns a view into pool memory (read it, don't write it; host views are
read-only mappings) and holds a *lease* on the object until the view is garbage
collected, `release(ref)` is called, or the client closes. A lease that ends
normally counts as one read toward the object's `consumers`; a process that dies
without closing its client counts none. With `copy=True` you get a private copy and
the lease ends at once.

GPU views are ordered on a stream (the current CuPy stream of their device, or
`stream=`): use them there, or synchronize. When a GPU view's lease ends, the read
is reported only once the work queued on that stream so far has finished, so the
memory is never recycled under a kernel still reading it.

The client is synchronous and thread-safe (one request at a time per connection);
function processes normally hold one connection for their whole life.
"""

from __future__ import annotations

import array as _array
import atexit
import collections
import logging
import math
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from faastube import arrays, errors, protocol
from faastube.arena import Arenas
from faastube.fds import close_all
from faastube.locations import HOST, Location
from faastube.mapping import IPC_HANDLE_BYTES, CudaSlab, HostSlab, cuda_importer, map_host_slab

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/faastube/faastube.sock"
_READ_BYTES = 256 << 10
_ANCILLARY_BYTES = socket.CMSG_SPACE(protocol.MAX_FDS_PER_FRAME * _array.array("i").itemsize)
# GPU puts at least this large are copied in two halves, each fenced: a reader on another GPU
# starts copying the first half while the second is still being written.
_SPLIT_PUT_BYTES = 32 << 20
_EVENT_DISABLE_TIMING = 0x2
_FENCE_SPIN_S = 0.005     # poll a pending fence this long before handing the wait to the GPU
_IDLE_ARENA_S = 5.0       # an empty arena larger than the usual one goes back after this long unused
_TIDY_INTERVAL_S = 1.0
# An idle client holding mappings asks this often whether the sidecar wants some back (a `retired`
# notice): the pools shrink, and a GPU short of memory frees it, only once every mapper let go.
_MAPPED_IDLE_S = 1.0

Device = int | str | None
Stream = Any     # a CuPy or torch stream, or a raw cudaStream_t as an int


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


class _Read:
    """One open read: ended by `release`, by its views' death, or by `close`."""

    __slots__ = ("done", "ordinal", "ref", "stream")

    def __init__(self, ref: str, stream: int | None, ordinal: int | None) -> None:
        self.ref = ref
        self.done = False
        self.stream = stream        # GPU views: the stream they are ordered on
        self.ordinal = ordinal


class _Lease:
    """Owned by every view of one `get`: keeps the mapping alive; its death ends the read."""

    __slots__ = ("__weakref__", "read", "slab")

    def __init__(self, read: _Read, slab: HostSlab | CudaSlab) -> None:
        self.read = read
        self.slab = slab


class _HostView:
    """Exposes slab bytes to NumPy; being the array's base keeps its owner alive."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str, owner: object, *, readonly: bool) -> None:
        self.__array_interface__ = {"data": (ptr, readonly), "shape": shape, "typestr": dtype, "version": 3}
        self.owner = owner


class Writable:
    """Pool memory handed out by `empty`: write into `.array`, then `seal` it (or `discard` it)."""

    def __init__(self, client: Client, location: Location, slab_id: int, offset: int, nbytes: int,
                 array: Any) -> None:
        self.array = array
        self.location = location
        self.sealed = False
        self._slot = (slab_id, offset)
        self.nbytes = nbytes
        # Never sealed and forgotten: the range goes back to the arena.
        self._finalizer = weakref.finalize(self, client._forget_range, location, slab_id, offset)

    @property
    def ref(self) -> str | None:
        return getattr(self, "_ref", None)

    def discard(self) -> None:
        """Give the memory back without publishing it."""
        if not self.sealed:
            self._finalizer()

    def __repr__(self) -> str:
        return f"Writable(shape={tuple(self.array.shape)}, location={str(self.location)!r}, sealed={self.sealed})"


class _PendingRelease:
    __slots__ = ("consumed", "event", "ordinal", "ref", "stream")

    def __init__(self, ref: str, consumed: bool, stream: int | None, ordinal: int | None) -> None:
        self.ref = ref
        self.consumed = consumed
        self.stream = stream        # GPU views: report the read once this stream's work so far is done
        self.ordinal = ordinal
        self.event: int | None = None


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
        self._sock = _connect(path)
        self._lock = threading.RLock()
        self._next_id = 1
        self._rbuf = bytearray()
        self._rfds: list[int] = []
        self._slabs: dict[int, HostSlab | CudaSlab] = {}
        self._event_handles: dict[int, bytes] = {}               # event id -> IPC handle
        self._arenas: dict[Location, Arenas] = {}
        self._fences: dict[int, tuple[int, ...]] = {}            # GPU -> this client's ring of fence events
        self._fence_turn = 0
        self._put_streams: dict[int, tuple[Any, int, int]] = {}  # ordinal -> (stream, local event x2)
        self._notifies: collections.deque[tuple[int, protocol.Op, Any]] = collections.deque()
        self._deferred: list[errors.FaastubeError] = []
        # Filled from finalizers (any thread, any moment): deques, whose appends are atomic.
        self._releases: collections.deque[_PendingRelease] = collections.deque()
        self._forgotten: collections.deque[tuple[Location, int, int]] = collections.deque()
        self._idle_events: list[tuple[int, int]] = []            # (ordinal, event) for reuse
        self._reads: dict[str, list[_Read]] = {}
        self._last_tidy = self._last_call = time.monotonic()
        self.closed = False
        self.last_path = "local"
        # A blocking socket whose receive timeout is the kernel's (SO_RCVTIMEO): one recvmsg per
        # reply, no poll() before it, and MSG_DONTWAIT spins really don't block.
        self._sock.settimeout(None)
        if self._timeout_ms > 0:
            seconds, ms = divmod(self._timeout_ms, 1000)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, ms * 1000))
        hello: dict[str, Any] = {"version": protocol.VERSION, "devices": _visible_devices()}
        namespace = namespace or os.environ.get("FAASTUBE_NAMESPACE")
        workflow = workflow or os.environ.get("FAASTUBE_WORKFLOW")
        function = function or os.environ.get("FAASTUBE_FUNCTION")
        for key, value in (("namespace", namespace), ("workflow", workflow), ("function", function)):
            if value:
                hello[key] = value
        try:
            reply, _ = self._call(protocol.Op.HELLO, hello)
            self.backend: str = reply["backend"]
            self.locations: tuple[str, ...] = tuple(reply["locations"])
            self.identity: dict[str, str] = reply["identity"]
            # Set when the sidecar serves cross-node reads: our refs name its node.
            node = reply.get("node")
            self.node: str | None = None if node is None else protocol.check_node(node)
            # This process's CUDA ordinal -> the sidecar's GPU index, and back.
            self._gpu_of = {int(k): int(v) for k, v in reply["device_map"].items()}
            self._arena_bytes = {Location.parse(k): int(v) for k, v in reply.get("arena_bytes", {}).items()}
            _FLUSHER.start()
        except (KeyError, TypeError, ValueError) as e:
            self._sock.close()
            raise errors.ProtocolError(f"malformed hello reply from the sidecar: {e!r}") from None
        except BaseException:
            self._sock.close()
            raise
        self._ordinal_of = {v: k for k, v in self._gpu_of.items()}
        _LIVE.add(self)

    # --- public API ---------------------------------------------------------------------------

    def put(self, obj: Any, *, consumers: int | None = None, ttl: float | None = None) -> str:
        """Copy an array into pool memory where it lives (its GPU, or the host) and publish it.

        No round trip: the copy goes into this client's arena, the publish needs no reply. A
        GPU copy is queued on the array's stream (CuPy's or torch's current stream) and fenced,
        so neither side synchronizes."""
        _check_publish_args(consumers, ttl)
        described = arrays.describe(obj)
        with self._lock:
            self._raise_deferred()
            if isinstance(described, arrays.HostArray):
                src = described.array
                slab, offset = self._place(HOST, src.nbytes)
                if src.nbytes:
                    view = self._view(slab, offset, src.shape, src.dtype.str, slab, readonly=False)
                    np.copyto(view, src, casting="no")
                return self._publish(slab, offset, src.nbytes, src.dtype, src.shape, consumers, ttl,
                                     fence=None, copied="host")
            location = self._location_for(described.device)
            slab, offset = self._place(location, described.nbytes)
            fence = self._copy_in(described, slab, offset) if described.nbytes else None
            return self._publish(slab, offset, described.nbytes, described.dtype, described.shape,
                                 consumers, ttl, fence=fence, copied="local")

    def empty(self, shape: int | Sequence[int], dtype: Any = np.float32, *, device: Device = None) -> Writable:
        """Pool memory to write into directly; `seal` publishes it without a copy."""
        dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise errors.InvalidRequest(f"empty: negative dimension in shape {dims}")
        dt = np.dtype(dtype)
        if dt.kind not in "biufc" or dt.hasobject:
            raise errors.InvalidRequest(f"empty: dtype {dt} is not a plain numeric type")
        nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
        with self._lock:
            self._raise_deferred()
            location = self._resolve(device)
            slab, offset = self._place(location, nbytes)
            view = self._view(slab, offset, dims, dt.str, slab, readonly=False)
            return Writable(self, location, slab.id, offset, nbytes, view)

    def seal(self, writable: Writable, *, consumers: int | None = None, ttl: float | None = None,
             stream: Stream = None) -> str:
        """Publish memory from `empty` (no copy); `consumers` reads release it, `ttl` seconds expire it.

        GPU memory is published after the work queued so far on `stream` (default: CuPy's current
        stream of that device), with no synchronize."""
        if not isinstance(writable, Writable):
            raise errors.InvalidRequest(f"seal takes what empty() returned, got {type(writable).__name__}")
        if writable.sealed:
            raise errors.InvalidRequest(f"this memory was already sealed as {writable.ref}")
        _check_publish_args(consumers, ttl)
        with self._lock:
            self._raise_deferred()
            slab_id, offset = writable._slot
            slab = self._slabs.get(slab_id)
            if slab is None or slab_id not in self._arenas.get(writable.location, ()):
                raise errors.InvalidRequest("seal: this memory is not in one of this client's arenas any more")
            fence = None
            if isinstance(slab, CudaSlab) and writable.nbytes:
                user = _stream_ptr(stream, slab.ordinal)
                fence = self._fence_after(slab, [(user, writable.nbytes)])
            array = writable.array
            ref = self._publish(slab, offset, writable.nbytes, array.dtype, tuple(array.shape), consumers, ttl,
                                fence=fence, copied=None)
            writable.sealed = True
            writable._ref = ref       # type: ignore[attr-defined]
            writable._finalizer.detach()
            return ref

    def get(self, ref: str, *, device: Device = None, copy: bool = False, stream: Stream = None) -> Any:
        """The object's data where you want it: NumPy for the host, CuPy for a GPU.

        On a GPU the view is ordered on `stream` (default: CuPy's current stream of that device)."""
        protocol.check_ref(ref)
        with self._lock:
            self._raise_deferred()
            location = self._resolve(device)
            body: dict[str, Any] = {"ref": ref, "location": str(location)}
            ready = self._ready_releases(wait=False)      # ended reads ride in the same frame
            ended = [r.ref for r in ready if r.consumed]
            if ended:
                body["ended"] = ended[:protocol.MAX_LIST_ITEMS]
            uncounted = [r.ref for r in ready if not r.consumed]
            if uncounted:
                body["ended_uncounted"] = uncounted[:protocol.MAX_LIST_ITEMS]
            if len(ended) > protocol.MAX_LIST_ITEMS or len(uncounted) > protocol.MAX_LIST_ITEMS:
                self._releases.extendleft(reversed(ready))   # too many for one frame: separate frames
                body.pop("ended", None)
                body.pop("ended_uncounted", None)
            reply, fds = self._call(protocol.Op.GET, body)
            try:
                slab = self._slab_for(reply, fds)
                self._learn_events(reply)
                stream_ptr = ordinal = None
                if isinstance(slab, CudaSlab):
                    ordinal = slab.ordinal
                    stream_ptr = _stream_ptr(stream, ordinal)
                    fence = reply.get("fence")
                    if fence:
                        self._wait_fence(fence, ordinal, stream_ptr)
                read = _Read(ref, stream_ptr, ordinal)
                lease = _Lease(read, slab)
                weakref.finalize(lease, self._views_died, read)
                self._reads.setdefault(ref, []).append(read)
                _FLUSHER.start()
                view = self._view(slab, int(reply["alloc"]["offset"]), tuple(reply["shape"]), reply["dtype"],
                                  lease, readonly=True)
            except (KeyError, TypeError, ValueError) as e:
                raise errors.ProtocolError(f"malformed get reply from the sidecar: {e!r}") from None
            self.last_path = reply.get("path", "local")
        if copy:
            out = view.copy()
            del view
            self.release(ref)
            return out
        return view

    def release(self, ref: str, *, consumed: bool = True) -> None:
        """End one read of `ref`.

        It counts toward the object's declared consumers unless `consumed=False` (e.g. the
        call that read it failed and will be retried). For a GPU view the read ends once the
        work queued on its stream so far is done.
        """
        with self._lock:
            read = self._open_read(ref)
            if read is not None:
                self._end_read(read, consumed)
            else:
                # Its views may have been garbage collected already, the read's end queued but not
                # yet sent: this release says how it counts.
                queued = next((item for item in self._releases if item.ref == ref), None)
                if queued is None:
                    raise errors.InvalidRequest(f"release {ref!r}: this client holds no open read of it")
                queued.consumed = consumed
            self._send_releases()     # now, if the reader's GPU work is done (else the flusher will)

    def free(self, ref: str | Writable) -> None:
        """Drop the object now (readers holding views keep their memory until they let go).

        A `Writable` that was never sealed is simply given back."""
        if isinstance(ref, Writable):
            if not ref.sealed:
                ref.discard()
                return
            ref = ref.ref or ""
        with self._lock:
            self._raise_deferred()
            self._call(protocol.Op.FREE, {"ref": ref})

    def stat(self, ref: str) -> ObjectInfo:
        with self._lock:
            self._raise_deferred()
            r, _ = self._call(protocol.Op.STAT, {"ref": ref})
        return ObjectInfo(r["ref"], r["nbytes"], r["dtype"], tuple(r["shape"]), r["state"], tuple(r["locations"]),
                          r["consumers_left"], r["readers"], r["expires_in_s"], r["owner"])

    def hint(self, positions: Mapping[str, int], *, due_in_s: Mapping[str, float] | None = None) -> None:
        """Tell the sidecar where the readers of these objects stand in the workflow's queue.

        `positions`: ref -> the place of the request that will read it (larger: later; an
        arrival sequence number works, as do places counted from the front). `due_in_s`:
        optionally, ref -> seconds until it will be read. When the GPU fills up, the objects
        read last move out first, and come back before their reader's turn. No round trip;
        refs that are gone (or not this workflow's) are ignored.
        """
        items: list[dict[str, Any]] = []
        for ref, position in positions.items():
            protocol.check_ref(ref)
            if not isinstance(position, int) or isinstance(position, bool) or position < 0:
                raise errors.InvalidRequest(f"hint {ref}: position must be a non-negative integer, got {position!r}")
            item: dict[str, Any] = {"ref": ref, "position": position}
            due = (due_in_s or {}).get(ref)
            if due is not None:
                if not isinstance(due, (int, float)) or isinstance(due, bool) or not 0 <= due < float("inf"):
                    raise errors.InvalidRequest(f"hint {ref}: due_in_s must be a non-negative number, got {due!r}")
                item["due_in_s"] = float(due)
            items.append(item)
        with self._lock:
            self._raise_deferred()
            for i in range(0, len(items), protocol.MAX_LIST_ITEMS):
                self._notify(protocol.Op.HINT, {"hints": items[i:i + protocol.MAX_LIST_ITEMS]}, None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._raise_deferred()
            return self._call(protocol.Op.STATS, {})[0]

    def ping(self) -> None:
        """One metadata round trip (it also picks up notices, and raises a deferred error)."""
        with self._lock:
            self._raise_deferred()
            self._call(protocol.Op.PING, {})

    def flush(self) -> None:
        """Send ended reads (waiting for GPU readers' work), pick up notices, raise deferred errors."""
        with self._lock:
            self._drain_releases(wait=True)
            self._call(protocol.Op.PING, {})
            self._raise_deferred()

    def close(self) -> None:
        """Say goodbye: reads still open end and count, arenas and mappings are let go."""
        with self._lock:
            if self.closed:
                return
            try:
                for ref in list(self._reads):
                    while (read := self._open_read(ref)) is not None:
                        self._end_read(read, True)
                self._drain_releases(wait=True)
                self._send([self._frame(protocol.Kind.NOTIFY, protocol.Op.BYE, {})])
                self._sock.shutdown(socket.SHUT_WR)
            except (OSError, errors.FaastubeError) as e:
                logger.debug("goodbye to the sidecar failed: %s", e)
            finally:
                self.closed = True
                self._sock.close()
                for deferred in self._deferred:
                    logger.warning("faastube: %s", deferred)
                self._deferred.clear()
                _LIVE.discard(self)

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

    def _resolve(self, device: Device) -> Location:
        if device in ("cpu", "host"):
            return HOST
        if device is None:
            if not self._gpu_of or self.backend == "host":    # no GPU, or simulated ones: named explicitly
                return HOST
            import cupy

            return self._location_for(int(cupy.cuda.runtime.getDevice()))
        if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
            return self._location_for(int(device))
        raise errors.InvalidRequest(f"device must be None, 'cpu' or a CUDA ordinal, got {device!r}")

    def _location_for(self, ordinal: int) -> Location:
        gpu = self._gpu_of.get(ordinal)
        if gpu is None:
            where = ("the sidecar runs the host backend: use device='cpu'" if self.backend == "host"
                     else f"pools: {', '.join(self.locations)}")
            raise errors.InvalidRequest(f"CUDA device {ordinal} of this process has no pool in the sidecar ({where})")
        from faastube.locations import gpu as gpu_location

        return gpu_location(gpu)

    # --- writing: arenas, copies, fences, publish -------------------------------------------------

    def _place(self, location: Location, nbytes: int) -> tuple[HostSlab | CudaSlab, int]:
        """Room for `nbytes` in one of this client's arenas at `location` (leasing one if needed)."""
        self._take_forgotten()
        arenas = self._arenas.setdefault(location, Arenas())
        hit = arenas.allocate(nbytes)
        if hit is None and arenas.busy():
            # Readers may have let go of earlier objects: their ranges come back on any reply.
            self._call(protocol.Op.PING, {})
            hit = arenas.allocate(nbytes)
        if hit is None:
            reply, fds = self._call(protocol.Op.ARENA, {"location": str(location), "nbytes": int(nbytes)})
            try:
                slab = self._slab_for({"alloc": {"slab": reply["arena"]["slab"]}, **reply}, fds)
                arenas.add(slab.id, int(reply["arena"]["size"]))
                if "fences" in reply and location.gpu is not None:
                    self._fences[location.gpu] = tuple(int(e) for e in reply["fences"])
                self._learn_events(reply)
            except (KeyError, TypeError, ValueError) as e:
                raise errors.ProtocolError(f"malformed arena reply from the sidecar: {e!r}") from None
            hit = arenas.allocate(nbytes)
            if hit is None:
                if reply.get("arena", {}).get("size", 0) >= nbytes:
                    # A hole the sidecar made in one of our arenas, where we still hold memory it can't
                    # see (an `empty` not sealed yet): the pool is full, try again later.
                    raise errors.OutOfPoolMemory(f"no room for {nbytes} bytes at {location}: the pool is full")
                raise errors.ProtocolError(f"the sidecar leased an arena too small for {nbytes} bytes")
        slab_id, offset = hit
        return self._slabs[slab_id], offset

    def _copy_in(self, src: arrays.CudaArray, slab: HostSlab | CudaSlab, offset: int) -> list[list[int]]:
        """Queue the copy into pool memory on the array's stream; return its fence."""
        if not isinstance(slab, CudaSlab):  # pragma: no cover - a GPU location has GPU slabs
            raise errors.ProtocolError("a GPU put was placed in host memory")
        import cupy

        rt = cupy.cuda.runtime
        dst, n = slab.ptr + offset, src.nbytes
        cuts = [n // 2 // 512 * 512, n] if n >= _SPLIT_PUT_BYTES else [n]
        with cupy.cuda.Device(slab.ordinal):
            start = 0
            parts = []
            for end in cuts:
                rt.memcpyAsync(dst + start, src.ptr + start, end - start, 3, src.stream)  # device to device
                parts.append((src.stream, end))
                start = end
            return self._fence_after(slab, parts)

    def _fence_after(self, slab: CudaSlab, parts: list[tuple[int, int]]) -> list[list[int]]:
        """Record fence events after the work queued so far on each part's stream.

        Fences are always recorded on this client's own put stream (chained to the user's
        stream by a local event), taking the next events of the ring the sidecar gave us for
        this GPU: a reader waits for an event's latest record, which is then this put's, or,
        after a deep burst of puts, a later one of the same stream (a little longer, never wrong)."""
        import cupy

        rt = cupy.cuda.runtime
        ring = self._fences.get(slab.gpu)
        if not ring:
            raise errors.ProtocolError(f"no fence events for GPU {slab.gpu} from the sidecar")
        out = []
        with cupy.cuda.Device(slab.ordinal):
            put_stream, local = self._put_stream(slab.ordinal)
            for i, (user_stream, end) in enumerate(parts):
                event_id = ring[self._fence_turn % len(ring)]
                self._fence_turn += 1
                rt.eventRecord(local[i], user_stream)
                rt.streamWaitEvent(put_stream.ptr, local[i], 0)
                rt.eventRecord(self._event(event_id, slab.ordinal), put_stream.ptr)
                out.append([event_id, end])
        return out

    def _put_stream(self, ordinal: int) -> tuple[Any, tuple[int, ...]]:
        held = self._put_streams.get(ordinal)
        if held is None:
            import cupy

            with cupy.cuda.Device(ordinal):
                stream = cupy.cuda.Stream(non_blocking=True)
                local = tuple(cupy.cuda.runtime.eventCreateWithFlags(_EVENT_DISABLE_TIMING) for _ in range(2))
            held = self._put_streams[ordinal] = (stream, *local)
        return held[0], held[1:]

    def _publish(self, slab: HostSlab | CudaSlab, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...],
                 consumers: int | None, ttl: float | None, *, fence: list[list[int]] | None,
                 copied: str | None) -> str:
        ref = protocol.new_ref(self.node)
        body: dict[str, Any] = {"ref": ref, "slab": slab.id, "offset": offset, "nbytes": int(nbytes),
                                "dtype": np.dtype(dtype).str, "shape": [int(d) for d in shape]}
        if consumers is not None:
            body["consumers"] = consumers
        if ttl is not None:
            body["ttl_s"] = ttl
        if fence is not None:
            body["fence"] = fence
        if copied is not None:
            body["copied"] = copied
        self._notify(protocol.Op.PUBLISH, body, (ref, slab.id, offset))
        return ref

    def _forget_range(self, location: Location, slab_id: int, offset: int) -> None:
        # From a finalizer: only queue.
        self._forgotten.append((location, slab_id, offset))

    def _take_forgotten(self) -> None:
        given = False
        while self._forgotten:
            location, slab_id, offset = self._forgotten.popleft()
            arenas = self._arenas.get(location)
            if arenas is not None:
                given = arenas.give(slab_id, offset) or given
        if given:
            surplus = [s for arenas in self._arenas.values() for s in arenas.surplus()]
            if surplus:
                self._unmap(surplus)

    # --- reading ------------------------------------------------------------------------------

    def _learn_events(self, reply: dict[str, Any]) -> None:
        for event_id, handle in (reply.get("events") or {}).items():
            self._event_handles[int(event_id)] = protocol.decode_handle(
                handle, size=IPC_HANDLE_BYTES, what=f"event {event_id}'s handle")

    def _event(self, event_id: int, ordinal: int) -> int:
        handle = self._event_handles.get(event_id)
        if handle is None:
            raise errors.ProtocolError(f"told to use event {event_id} before receiving its handle")
        return cuda_importer().event(handle, ordinal)

    def _wait_fence(self, fence: list[list[int]], ordinal: int, stream_ptr: int) -> None:
        """Order our stream after the last event of the fence (the whole object written)."""
        import cupy

        event = self._event(int(fence[-1][0]), ordinal)
        rt = cupy.cuda.runtime
        # A query sees records made by any process. A GPU-side wait on another process's event that
        # is still pending adds ~0.1 ms before the stream moves on (H200): for a copy about to land,
        # polling the event from here is faster. Past the spin budget, the GPU waits instead.
        deadline = time.perf_counter() + _FENCE_SPIN_S
        while True:
            if rt.eventQuery(event) == 0:
                return
            if time.perf_counter() > deadline:
                break
        with cupy.cuda.Device(ordinal):
            rt.streamWaitEvent(stream_ptr, event, 0)

    def _slab_for(self, reply: dict[str, Any], fds: list[int]) -> HostSlab | CudaSlab:
        intro = reply.get("slab")
        try:
            if intro is not None:
                self._map(intro, fds)
            return self._slabs[int(reply["alloc"]["slab"])]
        except KeyError as e:
            raise errors.ProtocolError(f"reply names slab {e} that was never introduced") from None
        finally:
            close_all(fds)   # anything the mapping did not consume
            fds.clear()

    def _map(self, intro: dict[str, Any], fds: list[int]) -> None:
        slab_id, kind, size = int(intro["id"]), intro["kind"], int(intro["size"])
        count = int(intro.get("fds", 0))
        if count > len(fds):
            raise errors.ProtocolError(f"slab {slab_id}: {count} descriptors announced, {len(fds)} received")
        mine, fds[:count] = fds[:count], []
        if kind == "shm":
            if count != 1:
                close_all(mine)
                raise errors.ProtocolError(f"slab {slab_id}: a shared-memory slab comes with one descriptor")
            self._slabs[slab_id] = map_host_slab(slab_id, size, mine[0], writable=bool(intro.get("writable")))
            return
        if kind == "cuda":
            gpu = int(intro["gpu"])
            ordinal = self._ordinal_of.get(gpu)
            if ordinal is None:
                close_all(mine)
                raise errors.ProtocolError(f"slab {slab_id} is on GPU {gpu}, which this process can't see")
            importer = cuda_importer()
            pool = str(intro["pool"])
            if mine:
                importer.import_pool(pool, ordinal, mine[0])
            elif not importer.has_pool(pool):
                raise errors.ProtocolError(f"slab {slab_id} on GPU {gpu} arrived before its pool {pool}")
            self._slabs[slab_id] = importer.map_slab(pool, slab_id, size, gpu, ordinal, intro["payload"])
            return
        close_all(mine)
        raise errors.ProtocolError(f"slab {slab_id}: unknown kind {kind!r}")

    def _view(self, slab: HostSlab | CudaSlab, offset: int, shape: tuple[int, ...], dtype: str,
              owner: object, *, readonly: bool) -> Any:
        dt = _DTYPES.get(dtype) or np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if offset < 0 or offset + nbytes > slab.size:
            raise errors.ProtocolError(f"object at offset {offset} ({nbytes} bytes) lies outside slab {slab.id}")
        if isinstance(slab, HostSlab):
            return np.asarray(_HostView(slab.ptr + offset, shape, dtype, owner,
                                        readonly=readonly or not slab.writable))
        import cupy

        mem = cupy.cuda.UnownedMemory(slab.ptr + offset, nbytes, owner, device_id=slab.ordinal)
        return cupy.ndarray(shape, dtype=dt, memptr=cupy.cuda.MemoryPointer(mem, 0))

    # --- leases -------------------------------------------------------------------------------

    def _open_read(self, ref: str) -> _Read | None:
        reads = self._reads.get(ref)
        if reads:
            for read in reads:
                if not read.done:
                    return read
            del self._reads[ref]
        return None

    def _end_read(self, read: _Read, consumed: bool) -> None:
        read.done = True
        self._releases.append(_PendingRelease(read.ref, consumed, read.stream, read.ordinal))
        reads = self._reads.get(read.ref)
        if reads is not None:
            reads.remove(read)
            if not reads:
                del self._reads[read.ref]

    def _views_died(self, read: _Read) -> None:
        # From the garbage collector, in any thread, at any moment: no locks, no socket, only queue.
        if not read.done:
            read.done = True
            self._releases.append(_PendingRelease(read.ref, True, read.stream, read.ordinal))

    def _idle_event(self, ordinal: int) -> int:
        for i, (o, event) in enumerate(self._idle_events):
            if o == ordinal:
                del self._idle_events[i]
                return event
        import cupy

        return int(cupy.cuda.runtime.eventCreateWithFlags(_EVENT_DISABLE_TIMING))

    def _ready_releases(self, *, wait: bool) -> list[_PendingRelease]:
        """Pending releases whose readers' GPU work is done (all of them if `wait`), in order."""
        ready: list[_PendingRelease] = []
        held: list[_PendingRelease] = []
        while self._releases:
            item = self._releases.popleft()
            reads = self._reads.get(item.ref)
            if reads is not None:       # ended by its views' death: forget it here
                reads[:] = [r for r in reads if not r.done]
                if not reads:
                    del self._reads[item.ref]
            if item.stream is not None and item.event is None:
                import cupy

                # After everything queued on the reader's stream so far (for a view that died
                # unnoticed, possibly later work too: that only delays the report).
                with cupy.cuda.Device(item.ordinal or 0):
                    item.event = self._idle_event(item.ordinal or 0)
                    cupy.cuda.runtime.eventRecord(item.event, item.stream)
            if item.event is not None:
                import cupy

                rt = cupy.cuda.runtime
                if wait:
                    rt.eventSynchronize(item.event)
                elif rt.eventQuery(item.event) != 0:
                    held.append(item)
                    continue
                self._idle_events.append((item.ordinal or 0, item.event))
                item.event = None
            ready.append(item)
        self._releases.extendleft(reversed(held))
        return ready

    def _release_frames(self, *, wait: bool = False) -> list[bytes]:
        ready = self._ready_releases(wait=wait)
        frames = []
        for consumed in (True, False):
            refs = [r.ref for r in ready if r.consumed is consumed]
            for i in range(0, len(refs), protocol.MAX_LIST_ITEMS):
                body: dict[str, Any] = {"refs": refs[i:i + protocol.MAX_LIST_ITEMS]}
                if not consumed:
                    body["consumed"] = False
                frames.append(self._frame(protocol.Kind.NOTIFY, protocol.Op.RELEASE, body))
        return frames

    def _send_releases(self) -> None:
        frames = self._release_frames()
        if frames:
            self._send(frames)

    def _drain_releases(self, *, wait: bool) -> None:
        frames = self._release_frames(wait=wait)
        if frames:
            self._send(frames)

    def _flush_idle(self) -> None:
        """From the flusher thread: send what is ready, unless the client is busy (it will itself);
        now and then, give back big arenas left empty."""
        now = time.monotonic()
        tidy = now - self._last_tidy > _TIDY_INTERVAL_S
        if self.closed or not (self._releases or tidy) or not self._lock.acquire(blocking=False):
            return
        try:
            if self.closed:
                return
            self._send_releases()
            if tidy:
                self._last_tidy = now
                if any(arenas.busy() for arenas in self._arenas.values()) and now - self._last_call > _IDLE_ARENA_S:
                    # Idle, with objects out: ask whether readers let go (the answer is a freed notice).
                    self._call(protocol.Op.PING, {})
                elif self._slabs and now - self._last_call > _MAPPED_IDLE_S:
                    # Idle, with slabs mapped: the answer may ask us to unmap some (`retired`).
                    self._call(protocol.Op.PING, {})
                stale = [slab for location, arenas in self._arenas.items()
                         for slab in arenas.idle(older_than_s=_IDLE_ARENA_S,
                                                 larger_than=self._arena_bytes.get(location, 0))]
                if stale:
                    self._unmap(stale)
        except errors.FaastubeError as e:
            logger.debug("flushing releases failed: %s", e)
        finally:
            self._lock.release()

    # --- wire ---------------------------------------------------------------------------------

    def _frame(self, kind: protocol.Kind, op: protocol.Op, body: dict[str, Any]) -> bytes:
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        if kind is protocol.Kind.NOTIFY:
            self._notifies.append((request_id, op, None))
        return protocol.encode(kind, request_id, {"op": op.value, **body})

    def _notify(self, op: protocol.Op, body: dict[str, Any], info: Any) -> None:
        """Send a request that wants no reply (ended reads ride along)."""
        frames = self._release_frames()
        frames.append(self._frame(protocol.Kind.NOTIFY, op, body))
        self._notifies[-1] = (self._notifies[-1][0], op, info)
        self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        if self.closed:
            raise errors.Unavailable("this faastube client is closed")
        try:
            self._sock.sendall(frames[0] if len(frames) == 1 else b"".join(frames))
        except OSError as e:
            self._lost(e, "send")

    def _lost(self, e: BaseException, doing: str) -> None:
        # The sidecar may have said why before hanging up (too many connections, no hello in time).
        reason = self._parting_words()
        self.closed = True
        self._sock.close()
        if reason is not None:
            raise reason from e
        raise errors.Unavailable(f"lost the sidecar connection during {doing}: {e}") from e

    def _parting_words(self) -> errors.FaastubeError | None:
        try:
            self._sock.setblocking(False)
            while True:
                try:
                    chunk = self._sock.recv(_READ_BYTES)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                self._rbuf += chunk
            if len(self._rbuf) >= protocol.HEADER_SIZE:
                header = protocol.decode_header(self._rbuf)
                body = protocol.decode_body(self._rbuf[protocol.HEADER_SIZE:protocol.HEADER_SIZE + header.body_bytes])
                if header.kind is protocol.Kind.ERROR:
                    return protocol.exception_for(body)
        except (OSError, errors.FaastubeError):
            pass
        return None

    def _call(self, op: protocol.Op, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self.closed:
                raise errors.Unavailable("this faastube client is closed")
            self._last_call = time.monotonic()
            self._take_forgotten()
            frames = self._release_frames() if op is not protocol.Op.HELLO else []
            frames.append(self._frame(protocol.Kind.REQUEST, op, body))
            request_id = (self._next_id - 1) or 0xFFFFFFFF
            self._send(frames)
            try:
                reply, fds = self._read_reply(request_id)
            except (OSError, EOFError) as e:
                self._lost(e, op.value)
            except errors.FaastubeError:
                raise
            self._notices(reply)
            return reply, fds

    def _read_reply(self, request_id: int) -> tuple[dict[str, Any], list[int]]:
        """Frames until our reply: earlier notifies' errors come first, in order."""
        while True:
            header, body = self._next_frame()
            # Every notify sent before this frame's request was served without error.
            while self._notifies and self._notifies[0][0] != header.request_id and \
                    _before(self._notifies[0][0], header.request_id):
                self._notifies.popleft()
            if self._notifies and self._notifies[0][0] == header.request_id:
                _, op, info = self._notifies.popleft()
                self._notify_failed(op, info, protocol.exception_for(body))
                continue
            fds, self._rfds = self._rfds, []
            if header.request_id != request_id and header.request_id != 0:
                close_all(fds)
                raise errors.ProtocolError(f"reply for request {header.request_id}, expected {request_id}")
            if header.kind is protocol.Kind.ERROR:
                close_all(fds)
                raise protocol.exception_for(body)
            return body, fds

    def _notify_failed(self, op: protocol.Op, info: Any, exc: errors.FaastubeError) -> None:
        if op is protocol.Op.PUBLISH and info is not None:
            ref, slab_id, offset = info
            for arenas in self._arenas.values():
                arenas.give(slab_id, offset)
            exc = type(exc)(f"publishing {ref} failed: {exc}") if not isinstance(exc, errors.RefNotFound) else exc
        logger.error("faastube: %s refused by the sidecar: %s", op.value, exc)
        self._deferred.append(exc)

    def _raise_deferred(self) -> None:
        if self._deferred:
            first, *rest = self._deferred
            self._deferred = []
            for other in rest:
                logger.warning("faastube: also: %s", other)
            raise first

    def _notices(self, reply: dict[str, Any]) -> None:
        freed = reply.pop("freed", None)
        if freed:
            for slab_id, offset in freed:
                for arenas in self._arenas.values():
                    if arenas.give(int(slab_id), int(offset)):
                        break
            surplus = [s for arenas in self._arenas.values() for s in arenas.surplus()]
            if surplus:
                self._unmap(surplus)
        retired = reply.pop("retired", None)
        if retired:
            # An arena holding memory handed out by `empty` and not sealed yet stays mapped until then.
            unmap = [int(s) for s in retired
                     if all(arenas.retire(int(s)) for arenas in self._arenas.values())]
            if unmap:
                self._unmap(unmap)

    def _unmap(self, slab_ids: list[int]) -> None:
        for slab_id in slab_ids:
            self._slabs.pop(slab_id, None)   # live views keep their own mapping reference
        self._send([self._frame(protocol.Kind.NOTIFY, protocol.Op.UNMAP, {"slabs": slab_ids})])

    def _next_frame(self) -> tuple[protocol.Header, dict[str, Any]]:
        while True:
            if len(self._rbuf) >= protocol.HEADER_SIZE:
                header = protocol.decode_header(self._rbuf)
                end = protocol.HEADER_SIZE + header.body_bytes
                if len(self._rbuf) >= end:
                    body = protocol.decode_body(self._rbuf[protocol.HEADER_SIZE:end])
                    del self._rbuf[:end]
                    return header, body
            chunk, ancdata = self._recv()
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = _array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    self._rfds.extend(got)
            if not chunk:
                raise EOFError("the sidecar closed the connection")
            self._rbuf += chunk

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


def _before(a: int, b: int) -> bool:
    """Request id a was sent before b (ids are u32 and wrap)."""
    return 0 < ((b - a) & 0xFFFFFFFF) < 0x80000000


def _check_publish_args(consumers: int | None, ttl: float | None) -> None:
    # Checked here too: a publish is a notify, and its errors would otherwise surface one call late.
    if consumers is not None and (not isinstance(consumers, int) or isinstance(consumers, bool) or consumers < 1):
        raise errors.InvalidRequest(f"consumers must be a positive integer, got {consumers!r}")
    if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl < float("inf")):
        raise errors.InvalidRequest(f"ttl must be a positive number of seconds, got {ttl!r}")


_DTYPES = {np.dtype(t).str: np.dtype(t) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
                                                    "c8", "c16", "?")}


def _stream_ptr(stream: Stream, ordinal: int) -> int:
    if stream is None:
        import cupy

        if cupy.cuda.runtime.getDevice() == ordinal:
            return int(cupy.cuda.get_current_stream().ptr)
        with cupy.cuda.Device(ordinal):
            return int(cupy.cuda.get_current_stream().ptr)
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "cuda_stream"):     # CuPy, torch
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise errors.InvalidRequest(f"stream must be a CuPy or torch stream or a cudaStream_t, got {stream!r}")


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10.0)
    for attempt in range(50):
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            # The sidecar's accept queue is full: a burst of connects. Back off briefly.
            time.sleep(0.001 * (attempt + 1))
        except OSError as e:
            sock.close()
            raise errors.Unavailable(f"cannot reach the faastube sidecar at {path}: {e.strerror or e}") from e
    sock.close()
    raise errors.Unavailable(f"the faastube sidecar at {path} accepts no connections (queue full)")



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


# Clients still open at interpreter exit say goodbye: their open reads end normally.
_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()


class _Flusher:
    """One thread per process that sends reads ended while their client sat idle.

    A view garbage collected ends its read, but the collector may run at any moment (inside
    another call of the same client); it only queues. So does a GPU read whose stream still
    works. This thread sends what became ready, so an idle client holds nothing back for long.
    """

    INTERVAL_S = 0.002

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._guard:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="faastube-releases", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.INTERVAL_S)
            for client in list(_LIVE):
                client._flush_idle()


_FLUSHER = _Flusher()


@atexit.register
def _close_live_clients() -> None:
    for client in list(_LIVE):
        try:
            client.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def connect(socket: str | os.PathLike[str] | None = None, *, namespace: str | None = None,
            workflow: str | None = None, function: str | None = None, timeout_s: float | None = 60.0,
            spin_us: float | None = None) -> Client:
    """Connect to the node's sidecar (default socket: $FAASTUBE_SOCKET).

    `spin_us` (default $FAASTUBE_SPIN_US, else 0): busy-poll that long for each reply
    before sleeping, trading a little CPU for lower round-trip latency.
    """
    return Client(socket, namespace=namespace, workflow=workflow, function=function, timeout_s=timeout_s,
                  spin_us=spin_us)
