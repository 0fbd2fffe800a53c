"""The data-plane service: pools, objects and sessions, one method per request.

Everything here runs on the sidecar's event loop thread; only device copies leave
it (the backend awaits them). Methods take validated request fields (the dispatch
layer parsed them) and return reply bodies plus the fds to pass with them (the
reply owns those fds).

Tenancy: every pool belongs to one domain (namespace + workflow). A session only
ever receives handles to its own domain's slabs and fence events, publishes only
into arenas leased to it, and reads only its domain's objects.

The fast path: a writer sub-allocates objects in its arena itself and publishes
each with one notify (no reply); a reader's `get` is one round trip whose reply
carries everything the reader needs (the slab on first sight, the fence to order
its stream after). GPU writes are ordered by fence events the writer records on
the GPU, never by a synchronize.

Memory (``elastic``, ``sizing``, ``eviction``): every publish and every copy made for a
reader is one execution of a function, whose traffic sizes its pool; the sweep keeps
each pool at its target and under its cap, and with an evicting policy a request that
finds its pool full waits for objects to move out rather than failing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from faastube import errors, protocol
from faastube.locations import Location

from faastube_sidecar import elastic
from faastube_sidecar.backends import Backend, Span
from faastube_sidecar.devicememory import DeviceMemory, MemoryInfo
from faastube_sidecar.eviction import Evictor
from faastube_sidecar.identity import Domain, Identity
from faastube_sidecar.lifetimes import Fence, Lifetimes, ObjectRecord, Replica
from faastube_sidecar.pool import (
    ALIGN_BYTES,
    LARGE_ROUND_BYTES,
    Allocation,
    Budget,
    Pool,
    PoolLimits,
    PoolStats,
    Slab,
    align_up,
)
from faastube_sidecar.sizing import SizingSettings, TrafficSizing

logger = logging.getLogger(__name__)

# Only plain numeric dtypes travel: an object dtype would be a pointer into another process.
_DTYPE_KINDS = set("biufc")
_DTYPES: dict[str, np.dtype] = {}


def _dtype(text: str) -> np.dtype:
    """A dtype from its wire text (cached: a few dozen distinct ones ever reach a sidecar)."""
    dtype = _DTYPES.get(text)
    if dtype is not None:
        return dtype
    try:
        dtype = np.dtype(text)
    except Exception as e:  # noqa: BLE001 - numpy's parser of dtype strings raises all sorts (SyntaxError...)
        raise errors.InvalidRequest(f"publish: bad dtype {text!r:.40}: {type(e).__name__}: {str(e)[:80]}") from None
    if dtype.kind not in _DTYPE_KINDS or dtype.hasobject:
        raise errors.InvalidRequest(f"publish: dtype {dtype.str} is not a plain numeric type")
    if len(_DTYPES) < 1024:
        _DTYPES[text] = dtype
    return dtype


# The one place pool defaults are written (flags, settings and tests start from these).
# Each workflow may hold half of a location's pools by default: one workflow can't starve the rest.
DEFAULT_HOST_LIMITS = PoolLimits(slab_bytes=64 << 20, max_bytes=8 << 30, arena_bytes=16 << 20,
                                 quota_bytes=4 << 30)
DEFAULT_GPU_LIMITS = PoolLimits(slab_bytes=512 << 20, max_bytes=16 << 30, arena_bytes=64 << 20,
                                quota_bytes=8 << 30)
DEFAULT_TTL_S = 600.0
DEFAULT_MEMORY_POLICY = elastic.MemoryPolicy()
# Elastic pools take back an empty arena its writer still holds after this long (the writer is
# told, and unmaps); when memory is short, after this much shorter time.
LEASED_IDLE_S = 1.0
PRESSURE_LEASED_IDLE_S = 0.1


class RemoteGets(Protocol):
    """Fetches objects other nodes' sidecars hold (``network.reader``): set when this sidecar
    serves cross-node passing."""

    async def fetch(self, session: Session, ref: str, location: Location) -> None:
        """Bring `ref` into this sidecar for the session: afterwards ``lifetimes.find(ref)`` has it."""


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    default_ttl_s: float = DEFAULT_TTL_S        # objects nobody frees die after this
    max_ttl_s: float = 86400.0
    max_consumers: int = 1 << 16
    host_limits: PoolLimits = DEFAULT_HOST_LIMITS
    gpu_limits: PoolLimits = DEFAULT_GPU_LIMITS
    # A get of a ref not published yet waits this long for it: publishes are notifies, and the
    # writer's notify can reach the sidecar after the reader's get that it made possible.
    publish_grace_s: float = 0.2
    # A writer records its fences on a ring of events: a reader waits for the last record of an
    # event, so a ring keeps that record this writer's put, not a later one, in all but deep bursts.
    fence_events_per_gpu: int = 8
    fence_poll_s: float = 0.002    # how long a copy waits for a writer's first fence by polling it
    max_sessions_per_identity: int = 1024   # connections one function (or one pod) may hold
    memory: elastic.MemoryPolicy = DEFAULT_MEMORY_POLICY
    sizing: SizingSettings = SizingSettings()


@dataclass(eq=False)
class Session:
    """One client connection's state: who it is and what it holds."""

    id: int
    identity: Identity | None = None
    device_map: dict[int, int] = field(default_factory=dict)     # client ordinal -> our GPU index
    mapped: dict[int, bool] = field(default_factory=dict)        # slab id -> mapped writable
    known_pools: set[str] = field(default_factory=set)          # pools the client was given (by name)
    known_events: set[int] = field(default_factory=set)
    arenas: set[int] = field(default_factory=set)
    fences: dict[int, tuple[int, ...]] = field(default_factory=dict)   # GPU -> its fence event ids
    freed_notices: list[list[int]] = field(default_factory=list)       # [slab, offset] of its arenas
    retired_notices: list[int] = field(default_factory=list)
    said_bye: bool = False

    @property
    def domain(self) -> Domain:
        if self.identity is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        return self.identity.domain


class TransferObserver:
    """Where the data plane reports what it did (metrics); a no-op by default."""

    def transfer(self, path: str, nbytes: int, seconds: float, *, route: str = "",
                 requester: Identity | None = None) -> None:
        pass


Reply = tuple[dict[str, Any], list[int]]


@dataclass(frozen=True, slots=True)
class BudgetView:
    location: Location
    max_bytes: int
    quota_bytes: int
    refusals: int
    by_domain: tuple[tuple[Domain, int], ...]


@dataclass(frozen=True, slots=True)
class MemoryView:
    """The memory policy's figures as of one moment (metrics)."""

    policy: str = "static"
    caps: tuple[tuple[Location, int], ...] = ()
    device_free: tuple[tuple[Location, int], ...] = ()
    targets: tuple[tuple[Domain, Location, int], ...] = ()
    reservations: tuple[tuple[Domain, str, Location, int], ...] = ()
    releases: tuple[tuple[Location, str, int], ...] = ()
    evictions: tuple[tuple[Location, Location, str, int], ...] = ()
    evicted_bytes_total: tuple[tuple[Location, int], ...] = ()
    restores: tuple[tuple[Location, str, int], ...] = ()
    evicted_now: tuple[tuple[Location, int, int], ...] = ()      # home, objects, bytes
    aborted: int = 0
    failed_room: int = 0
    borrowed: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Pool and object figures as of one moment, for readers on other threads (metrics).

    Built on the event loop (`refresh_snapshot`), replaced whole: a scrape never walks
    tables the loop is changing.
    """

    pools: tuple[PoolStats, ...] = ()
    budgets: tuple[BudgetView, ...] = ()
    objects_by_location: tuple[tuple[Location, int], ...] = ()
    draining: int = 0
    memory: MemoryView = MemoryView()


class DataPlane:
    def __init__(self, backend: Backend, config: DataPlaneConfig = DataPlaneConfig(), *,
                 observer: TransferObserver | None = None, device_memory: DeviceMemory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        problems = config.memory.problems()
        if problems:
            raise ValueError("memory policy: " + "; ".join(problems))
        self.backend = backend
        self.config = config
        self.policy = config.memory
        self.observer = observer or TransferObserver()
        self._clock = clock
        self.locations: tuple[Location, ...] = tuple(backend.locations())
        self.budgets = {loc: Budget(loc, self._limits(loc)) for loc in self.locations}
        self.pools: dict[tuple[Domain, Location], Pool[Any]] = {}
        self._slab_pool: dict[int, Pool[Any]] = {}                  # slab id -> its pool
        self._by_range: dict[tuple[int, int], ObjectRecord] = {}    # (slab, offset) -> the object there
        self.device_memory = device_memory
        self.device_info: dict[Location, MemoryInfo] = {}
        self.sizing: TrafficSizing[tuple[Domain, str, Location]] = TrafficSizing(config.sizing, clock=clock)
        self._live_by_function: Counter[tuple[Domain, str, Location]] = Counter()
        self.targets: dict[tuple[Domain, Location], int] = {}
        self._releases: dict[Location, Counter[str]] = {loc: Counter() for loc in self.locations}
        self.lifetimes = Lifetimes(self._free_memory)
        self.evictor = Evictor(self)
        self.sessions: dict[int, Session] = {}
        self._next_session = 1
        self._awaiting: dict[str, list[asyncio.Future[None]]] = {}  # refs a get waits to see published
        self._fence_users: Counter[int] = Counter()                 # event id -> replicas fenced by it
        self._orphan_events: set[int] = set()                       # their writer left
        self._open_domains: set[Domain] = set()                     # domains the backend holds resources of
        self._per_identity: dict[Identity, int] = {}
        self.node: str | None = None          # this sidecar's node, when it serves cross-node passing
        self.remote: RemoteGets | None = None
        self.snapshot = Snapshot()
        self.refresh_snapshot()

    def _limits(self, location: Location) -> PoolLimits:
        return self.config.host_limits if location.is_host else self.config.gpu_limits

    # --- pools --------------------------------------------------------------------------------

    def _pool(self, domain: Domain, location: Location) -> Pool[Any]:
        pool = self.pools.get((domain, location))
        if pool is None:
            pool = Pool(domain, location, self.backend, self._limits(location), self.budgets[location],
                        reclaim=self._reclaim, on_slab=self._index_slab, clock=self._clock)
            pool.releases = self._releases[location]     # kept here: pools come and go
            pool.grow_exact = self.policy.elastic
            self.pools[(domain, location)] = pool
        return pool

    pool = _pool

    def _reclaim(self, location: Location) -> None:
        leased = PRESSURE_LEASED_IDLE_S if self.policy.elastic else None
        for (_, loc), pool in list(self.pools.items()):
            if loc == location:
                pool.collect(force=True, leased_idle_s=leased)
        self.announce_retired()

    reclaim = _reclaim

    def pool_of_slab(self, slab_id: int) -> Pool[Any]:
        return self._slab_pool[slab_id]

    def record_at(self, slab_id: int, offset: int) -> ObjectRecord | None:
        return self._by_range.get((slab_id, offset))

    def now(self) -> float:
        return self._clock()

    def excess_bytes(self, domain: Domain, location: Location) -> int:
        """What `domain`'s pool at `location` holds beyond its target (its own policy's share)."""
        pool = self.pools.get((domain, location))
        if pool is None:
            return 0
        return max(0, pool.active_bytes - self.targets.get((domain, location), 0))

    def fits_without_growth(self, domain: Domain, location: Location, nbytes: int) -> bool:
        """Room for `nbytes` in the domain's shared slabs there, without growing the pool."""
        reserved = align_up(max(nbytes, 1), ALIGN_BYTES)
        pool = self.pools.get((domain, location))
        return pool is not None and any(not s.arena and not s.retired and s.free.largest() >= reserved for s in pool)

    def announce_retired(self) -> None:
        """Tell every client mapping a newly retired slab to unmap it (on its next reply)."""
        for pool in list(self.pools.values()):
            for slab_id in pool.take_retired():
                for session in self.sessions.values():
                    if slab_id in session.mapped:
                        session.retired_notices.append(slab_id)

    def pools_at(self, location: Location) -> Iterator[Pool[Any]]:
        return (pool for (_, loc), pool in self.pools.items() if loc == location)

    def _index_slab(self, slab_id: int, pool: Pool[Any] | None) -> None:
        if pool is None:
            self._slab_pool.pop(slab_id, None)
            self.evictor.memory_freed()
        else:
            self._slab_pool[slab_id] = pool

    # --- replicas ------------------------------------------------------------------------------

    def add_replica(self, record: ObjectRecord, location: Location, replica: Replica) -> None:
        record.replicas[location] = replica
        self._by_range[(replica.alloc.slab_id, replica.alloc.offset)] = record
        if replica.function is not None:
            key = (record.domain, replica.function, location)
            self._live_by_function[key] += 1
            # One execution of the function put these bytes in the pool: its traffic, for sizing.
            self.sizing.observe(key, record.nbytes, self._live_by_function[key])

    def drop_replica(self, record: ObjectRecord, location: Location) -> None:
        """Free one replica's memory (nobody may be reading it: the caller checked)."""
        self._release_replica(record, record.replicas.pop(location))

    def _release_replica(self, record: ObjectRecord, replica: Replica) -> None:
        self._drop_fence(replica)
        alloc = replica.alloc
        if self._by_range.get((alloc.slab_id, alloc.offset)) is record:
            del self._by_range[(alloc.slab_id, alloc.offset)]
        if replica.function is not None:
            key = (record.domain, replica.function, alloc.location)
            left = self._live_by_function[key] - 1
            if left > 0:
                self._live_by_function[key] = left
            else:
                self._live_by_function.pop(key, None)
        writer = self._slab_pool[alloc.slab_id].free(alloc)
        if writer is not None:
            owner = self.sessions.get(writer)
            if owner is not None:
                owner.freed_notices.append([alloc.slab_id, alloc.offset])

    # --- sessions -----------------------------------------------------------------------------

    def open_session(self) -> Session:
        session = Session(self._next_session)
        self._next_session += 1
        self.sessions[session.id] = session
        return session

    def hello(self, session: Session, identity: Identity, fields: Mapping[str, Any]) -> Reply:
        if session.identity is not None:
            raise errors.InvalidRequest("hello: this connection already said hello")
        held = self._per_identity.get(identity, 0)
        if held >= self.config.max_sessions_per_identity:
            raise errors.Unavailable(f"hello: {identity.pod or identity.function!r} of workflow {identity.domain} "
                                     f"already holds {held} connections (limit {self.config.max_sessions_per_identity})")
        self._per_identity[identity] = held + 1
        session.identity = identity
        for device in fields.get("devices") or ():
            gpu = self.backend.gpu_for_bus_id(device["pci_bus_id"])
            if gpu is not None:
                session.device_map[device["ordinal"]] = gpu
        if not session.device_map:
            session.device_map = self.backend.default_device_map()
        return {"session": session.id, "backend": self.backend.name,
                "locations": [str(loc) for loc in self.locations],
                "device_map": {str(k): v for k, v in session.device_map.items()},
                "identity": {"namespace": identity.namespace, "workflow": identity.workflow,
                             "function": identity.function},
                **({"node": self.node} if self.node is not None else {}),
                "align": ALIGN_BYTES,
                "arena_bytes": {str(loc): self._limits(loc).arena_bytes for loc in self.locations},
                "quota_bytes": {str(loc): self.budgets[loc].quota_bytes for loc in self.locations}}, []

    def bye(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        """A clean goodbye: reads still open end now, and count."""
        session.said_bye = True
        self.lifetimes.end_session(session.id, clean=True)
        return {}, []

    def close_session(self, session: Session) -> None:
        """The client went away (cleanly or not): give back everything it held."""
        self.sessions.pop(session.id, None)
        if session.identity is not None:
            left = self._per_identity.get(session.identity, 0) - 1
            if left > 0:
                self._per_identity[session.identity] = left
            else:
                self._per_identity.pop(session.identity, None)
        self.lifetimes.end_session(session.id, clean=session.said_bye)
        if session.identity is not None:
            for (domain, _), pool in list(self.pools.items()):
                if domain == session.domain:
                    pool.writer_left(session.id)
                    pool.unmapped_by(session.id)
                    pool.collect()
        for event_ids in session.fences.values():
            self._orphan_events.update(event_ids)
            self._drop_unused_events(event_ids)
        self._forget_empty_pools()

    # --- requests -----------------------------------------------------------------------------

    def _location(self, location: Location) -> Location:
        if location not in self.budgets:
            known = ", ".join(str(loc) for loc in self.locations)
            raise errors.InvalidRequest(f"location {location} has no pool on this node (known: {known})")
        return location

    def _check_access(self, session: Session, record: ObjectRecord, action: str) -> None:
        who = session.identity
        if who is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        if who.domain != record.domain:
            raise errors.PermissionDenied(
                f"{action} {record.ref}: function {who.function!r} of workflow {who.domain} "
                f"may not touch data of workflow {record.domain}")

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.config.default_ttl_s
        if ttl_s <= 0 or ttl_s > self.config.max_ttl_s:
            raise errors.InvalidRequest(f"ttl_s must be in (0, {self.config.max_ttl_s}], got {ttl_s}")
        return float(ttl_s)

    def arena(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        domain = session.domain
        location = self._location(fields["location"])
        pool = self._pool(domain, location)
        slab = pool.grant_arena(session.id, fields["nbytes"], usual_bytes=self._usual_arena(session, location))
        return self._arena_reply(session, pool, slab)

    def _usual_arena(self, session: Session, location: Location) -> int | None:
        """Elastic pools: an arena holds what the writer's function has alive at once (R_size x R_con),
        up to `--gpu-arena`; a function putting 256 KiB at a time gets 2 MiB, not 64."""
        if not self.policy.elastic or session.identity is None:
            return None
        r = self.sizing.reservation((session.domain, session.identity.function, location))
        if r is None or not r.size_bytes:
            return None
        return align_up(r.size_bytes * r.concurrency, LARGE_ROUND_BYTES)

    def arena_now(self, session: Session, fields: Mapping[str, Any]) -> Reply | None:
        """`arena`, or None when the pool is full and objects must move out first (`arena_with_room`)."""
        try:
            return self.arena(session, fields)
        except errors.OutOfPoolMemory:
            location = fields["location"]
            if not self.evictor.active or location not in self.budgets or location.is_host:
                raise
            return None

    async def arena_with_room(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        """An arena once eviction made room: a new slab, or a hole in one of the writer's own arenas."""
        domain = session.domain
        location = self._location(fields["location"])
        nbytes = fields["nbytes"]
        room = await self.evictor.make_room(domain, location, grow_bytes=align_up(max(nbytes, 1), LARGE_ROUND_BYTES),
                                            hole_bytes=align_up(max(nbytes, 1), ALIGN_BYTES), writer=session.id)
        pool = self._pool(domain, location)
        if room is not None and room.hole_slab is not None and room.hole_slab in pool.slabs:
            return self._arena_reply(session, pool, pool.slab(room.hole_slab))
        try:
            with self.budgets[location].lend(room.loan_bytes if room is not None else 0):
                return self.arena(session, fields)
        except errors.OutOfPoolMemory as e:
            raise errors.OutOfPoolMemory(f"{e} (and no object could leave {location} within "
                                         f"{self.policy.evict_wait_s:g}s to make room)") from None

    def _arena_reply(self, session: Session, pool: Pool[Any], slab: Slab[Any]) -> Reply:
        domain, location = pool.domain, pool.location
        session.arenas.add(slab.id)
        reply, fds = self._introduce(session, pool, slab.id, writable=True)
        reply["arena"] = {"slab": slab.id, "size": slab.size, "location": str(location)}
        if location.gpu is not None and location.gpu not in session.fences:
            events = self.backend.fence_events(domain, location.gpu, self.config.fence_events_per_gpu)
            session.fences[location.gpu] = tuple(e.id for e in events)
            reply["fences"] = [e.id for e in events]
            reply["events"] = {str(e.id): protocol.encode_handle(e.handle) for e in events}
            session.known_events.update(e.id for e in events)
        return self._with_notices(session, reply), fds

    def publish(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        identity = session.identity
        if identity is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        slab_id = fields["slab"]
        pool = self._slab_pool.get(slab_id)
        if pool is None or slab_id not in session.arenas:
            raise errors.InvalidRequest(f"publish: slab {slab_id} is not an arena of this client")
        nbytes, shape = fields["nbytes"], tuple(fields["shape"])
        dtype = _dtype(fields["dtype"])
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise errors.InvalidRequest(
                f"publish: nbytes {nbytes} != product of shape {list(shape)} x itemsize {dtype.itemsize}")
        consumers = fields.get("consumers")
        if consumers is not None and not 1 <= consumers <= self.config.max_consumers:
            raise errors.InvalidRequest(f"publish: consumers must be in [1, {self.config.max_consumers}], "
                                        f"got {consumers}")
        ttl_s = self._ttl(fields.get("ttl_s"))
        fence = self._fence(session, pool.location, nbytes, fields.get("fence"))
        copied = fields.get("copied")
        if copied is not None and copied not in ("local", "host"):
            raise errors.InvalidRequest(f"publish: copied must be 'local' or 'host', got {copied!r:.20}")
        ref = fields["ref"]
        node = protocol.ref_node(ref)
        if node is not None and node != self.node:
            raise errors.InvalidRequest(f"publish: ref {ref} names node {node!r}, but this sidecar is "
                                        f"{self.node or 'not serving cross-node passing'}: refs name the node "
                                        f"whose sidecar holds them (use the client's put, or new_ref(client.node))")
        if self.lifetimes.find(ref) is not None or self.lifetimes.fate(ref) is not None:
            raise errors.InvalidRequest(f"publish: ref {ref} is already in use; use a fresh one")
        alloc = pool.claim(session.id, slab_id, fields["offset"], nbytes)
        now = self._clock()
        record = ObjectRecord(ref, identity, nbytes, dtype.str, shape, {}, session.id, now, now + ttl_s, consumers,
                              last_used_s=now)
        self.add_replica(record, pool.location, Replica(alloc, fence, function=identity.function))
        self.lifetimes.publish(record)
        if fence is not None:
            self._fence_users.update(event for event, _ in fence)
        if copied is not None:
            self.observer.transfer(copied, nbytes, 0.0)
        for waiter in self._awaiting.pop(ref, ()):
            if not waiter.done():
                waiter.set_result(None)
        return {}, []

    def _fence(self, session: Session, location: Location, nbytes: int, raw: list[list[int]] | None) -> Fence | None:
        if raw is None:
            return None
        gpu = location.gpu
        own = session.fences.get(gpu, ()) if gpu is not None else ()
        for event, end in raw:
            if event not in own:
                raise errors.InvalidRequest(f"publish: fence event {event} is not one of this client's "
                                            f"events for {location}")
            if end > nbytes:
                raise errors.InvalidRequest(f"publish: fence end {end} is past the object's {nbytes} bytes")
        if raw[-1][1] != nbytes:
            raise errors.InvalidRequest("publish: the last fence must end at the object's last byte")
        return tuple((event, end) for event, end in raw)

    # --- get ----------------------------------------------------------------------------------

    def get_local(self, session: Session, fields: Mapping[str, Any]) -> Reply | None:
        """Serve a get without awaiting anything, if the data is already where it is wanted."""
        record = self.lifetimes.find(fields["ref"])
        if record is None:
            return None
        self._check_access(session, record, "get")
        location = self._location(fields["location"])
        replica = record.replicas.get(location)
        if replica is None or (replica.landing is not None and replica.fence is None):
            return None
        self.lifetimes.open_lease(record, session.id)
        record.last_used_s = self._clock()
        # A GPU reader ordered after a restore still in flight waited for it.
        path = "restore" if replica.landing is not None and record.home is not None else "local"
        return self._get_reply(session, record, replica, path)

    async def get(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        ref = fields["ref"]
        location = self._location(fields["location"])
        if session.identity is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        fetched = self.lifetimes.find(ref) is None and self._is_remote(ref)
        if fetched:
            await self._fetch_remote(session, ref, location)
        record = await self._open_read(session, ref)
        try:
            replica, path = await self._readable(session, record, location, landed=False)
        except BaseException:
            self.lifetimes.end_lease(session.id, ref, counted=False)
            raise
        if fetched and path == "local":
            path = "network"     # read from the owner's node for this get
        return self._get_reply(session, record, replica, path)

    async def _open_read(self, session: Session, ref: str) -> ObjectRecord:
        """The record, checked for the session, with one read (lease) opened on it."""
        record = self.lifetimes.find(ref)
        if record is None:
            record = await self._published(ref)
        self._check_access(session, record, "get")
        # The lease starts now, so a free() during a copy can't recycle the bytes under it.
        self.lifetimes.open_lease(record, session.id)
        record.last_used_s = self._clock()
        return record

    async def _readable(self, session: Session, record: ObjectRecord, location: Location, *,
                        landed: bool) -> tuple[Replica, str]:
        """The replica at `location` (copied there if need be) and the read's path label. Waits
        for the copy into it unless the reader can order itself after it on a GPU (its fence);
        with `landed`, always (a reader that can't wait on GPU events)."""
        replica = record.replicas.get(location)
        path = "local"
        if replica is None:
            await self._first_bytes_written(record, location)
            replica, path = await self._replicate_with_room(session, record, location)
        elif replica.landing is not None and record.home is not None:
            path = "restore"     # it was on its way back: the reader waits for the rest
        if replica.landing is not None and (landed or replica.fence is None):
            # A CPU reader, or the copy went through the transfer engine: wait for it here.
            await asyncio.shield(replica.landing)
            if record.replicas.get(location) is not replica:
                raise errors.InternalError(f"get {record.ref}: the copy to {location} failed; see the sidecar's log")
        return replica, path

    def _is_remote(self, ref: str) -> bool:
        node = protocol.ref_node(ref)
        return node is not None and node != self.node

    async def _fetch_remote(self, session: Session, ref: str, location: Location) -> None:
        if self.remote is None:
            raise errors.RefNotFound(ref, f"held by node {protocol.ref_node(ref)!r}, and this sidecar does not "
                                          f"serve cross-node passing (--peer-port)")
        await self.remote.fetch(session, ref, location)

    # --- cross-node: what network.service and network.reader use ----------------------------------

    async def lend(self, session: Session, ref: str, location: Location | None) -> tuple[ObjectRecord, Span]:
        """Open one read of `ref` for a peer's reader (its session) and return the span to lend:
        the replica at `location` (made if need be), else the object's origin, once its bytes
        are all written. The caller ends the lease (``lifetimes.end_lease``)."""
        record = await self._open_read(session, ref)
        try:
            where = self._location(location) if location is not None else self._best_source(record, record.origin)
            replica, _ = await self._readable(session, record, where, landed=True)
            while replica.fence is not None and not self.backend.fence_done(replica.fence):
                await asyncio.sleep(50e-6)      # a GPU writer still writing: NIXL can't wait on its events
        except BaseException:
            self.lifetimes.end_lease(session.id, ref, counted=False)
            raise
        return record, self._span(replica.alloc)

    def reserve(self, session: Session, location: Location, nbytes: int) -> tuple[Allocation, Span]:
        """Room in the session's pool at `location` for bytes a peer lends (freed by ``unreserve``
        if the read fails, or owned by the record ``adopt`` makes)."""
        alloc = self._pool(session.domain, self._location(location)).allocate(nbytes)
        return alloc, self._span(alloc)

    def unreserve(self, alloc: Allocation) -> None:
        self._slab_pool[alloc.slab_id].free(alloc)

    def adopt(self, session: Session, ref: str, alloc: Allocation, *, dtype: str, shape: tuple[int, ...],
              reads: int, expires_in_s: float) -> ObjectRecord:
        """Make the bytes read from a peer this node's copy of `ref`, for `reads` reads here."""
        identity = session.identity
        if identity is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        now = self._clock()
        ttl_s = min(max(expires_in_s, 1.0), self.config.default_ttl_s)
        record = ObjectRecord(ref, identity, alloc.nbytes, dtype, shape, {}, None, now, now + ttl_s, reads,
                              last_used_s=now)
        self.add_replica(record, alloc.location, Replica(alloc, None))
        self.lifetimes.forget_fate(ref)       # an earlier copy here was consumed; this is a new read of it
        self.lifetimes.publish(record)
        return record

    async def _first_bytes_written(self, record: ObjectRecord, location: Location) -> None:
        """Before copying an object still being written, poll its first fence for a moment.

        A copy stream waiting on the GPU for another process's pending event starts ~0.1 ms
        after the event completes (H200); polling here (serving other requests meanwhile)
        starts it at once. The first chunk is enough: later chunks are written while the first
        is copied. Past the budget, the copy waits on the GPU as usual.
        """
        source = record.replicas.get(self._best_source(record, location))
        if source is None or source.fence is None or source.landing is not None:
            return
        first = source.fence[:1]
        deadline = time.monotonic() + self.config.fence_poll_s
        while not self.backend.fence_done(first) and time.monotonic() < deadline:
            await asyncio.sleep(0)

    async def _published(self, ref: str) -> ObjectRecord:
        fate = self.lifetimes.fate(ref)
        if fate is not None:
            raise errors.RefNotFound(ref, fate)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaiting.setdefault(ref, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, self.config.publish_grace_s)
        except TimeoutError:
            pass
        finally:
            waiters = self._awaiting.get(ref)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._awaiting[ref]
        record = self.lifetimes.find(ref)
        if record is None:
            raise errors.RefNotFound(ref, self.lifetimes.fate(ref) or
                                     f"unknown to this sidecar (not published within {self.config.publish_grace_s:g}s)")
        return record

    def _get_reply(self, session: Session, record: ObjectRecord, replica: Replica, path: str) -> Reply:
        alloc = replica.alloc
        pool = self._slab_pool[alloc.slab_id]
        reply, fds = self._introduce(session, pool, alloc.slab_id, writable=alloc.slab_id in session.arenas)
        reply.update(ref=record.ref, dtype=record.dtype, shape=list(record.shape), path=path,
                     alloc={"slab": alloc.slab_id, "location": str(alloc.location), "offset": alloc.offset,
                            "nbytes": alloc.nbytes})
        fence = replica.fence
        if fence is not None and replica.landing is None and self.backend.fence_done(fence):
            # The writer's bytes are there: later readers need not wait for anything (and won't wait
            # for a later record of the same event either).
            self._drop_fence(replica)
            fence = None
        if fence is not None:
            reply["fence"] = [list(pair) for pair in fence]
            unseen = [event for event, _ in fence if event not in session.known_events]
            if unseen:
                reply["events"] = {str(e): protocol.encode_handle(self.backend.event_handle(e)) for e in unseen}
                session.known_events.update(unseen)
        return self._with_notices(session, reply), fds

    def _drop_fence(self, replica: Replica) -> None:
        fence, replica.fence = replica.fence, None
        if fence:
            events = [event for event, _ in fence if self._fence_users.get(event)]
            self._fence_users.subtract(events)
            self._drop_unused_events(events)

    def _drop_unused_events(self, event_ids: Any) -> None:
        dead = [e for e in event_ids if e in self._orphan_events and self._fence_users.get(e, 0) <= 0]
        if dead:
            for e in dead:
                self._orphan_events.discard(e)
                self._fence_users.pop(e, None)
            self.backend.drop_events(dead)

    async def _replicate_with_room(self, session: Session, record: ObjectRecord,
                                   location: Location) -> tuple[Replica, str]:
        try:
            return self.replicate(session, record, location)
        except errors.OutOfPoolMemory:
            if not self.evictor.active or location.is_host:
                raise
        room = await self.evictor.make_room(record.domain, location,
                                            grow_bytes=align_up(record.nbytes, LARGE_ROUND_BYTES),
                                            hole_bytes=align_up(max(record.nbytes, 1), ALIGN_BYTES))
        if room is None:
            raise errors.OutOfPoolMemory(f"get {record.ref}: no room for {record.nbytes} bytes at {location}, and "
                                         f"no object could leave it within {self.policy.evict_wait_s:g}s")
        existing = record.replicas.get(location)     # a restore may have landed meanwhile
        if existing is not None:
            return existing, "restore" if existing.landing is not None else "local"
        with self.budgets[location].lend(room.loan_bytes):
            return self.replicate(session, record, location)

    def replicate(self, session: Session | None, record: ObjectRecord, location: Location) -> tuple[Replica, str]:
        """Start a copy of `record` to `location` (for a reader's get, or a restore when `session` is None).

        Returns the new replica and the get's path label: the copy's path, or ``restore`` when
        the object had been evicted from its GPU and comes back.
        """
        source_location = self._best_source(record, location)
        src = record.replicas[source_location]
        dst = self._pool(record.domain, location).allocate(record.nbytes)
        after = src.fence if src.fence is not None and not self.backend.fence_done(src.fence) else None
        start = self._clock()
        who = session.identity if session is not None else None
        restoring = record.home is not None and not location.is_host    # back on a GPU (a CPU read is a d2h)
        try:
            ticket = self.backend.submit_copy(
                self._span(dst), self._span(src.alloc), after=after, domain=record.domain,
                requester=(str(record.domain), who.function if who else "sidecar"))
        except BaseException:
            self._slab_pool[dst.slab_id].free(dst)
            raise
        replica = Replica(dst, ticket.fence, ticket.done, function=who.function if who else None)
        self.add_replica(record, location, replica)
        self.lifetimes.copy_started(record, location)
        logger.debug("replicating %s to %s over %s %s (%d bytes)%s", record.ref, location, ticket.path, ticket.route,
                     record.nbytes, " (restore)" if restoring else "")

        def finished(done: asyncio.Future[None]) -> None:
            replica.landing = None
            if done.cancelled() or done.exception() is not None:
                logger.error("copy of %s to %s failed: %s", record.ref, location,
                             "cancelled" if done.cancelled() else done.exception())
                if record.replicas.get(location) is replica:
                    self.drop_replica(record, location)
            else:
                replica.fence = None      # landed: later readers need not wait for anything
                route = ticket.route or ticket.path
                self.observer.transfer("restore" if restoring else ticket.path, record.nbytes,
                                       self._clock() - start, route=f"restore-{route}" if restoring else route,
                                       requester=who)
                if restoring:
                    if session is not None:
                        self.evictor.restores[(location, "read")] += 1
                    self.evictor.landed(record, location)
            self.lifetimes.copy_finished(record, location)

        ticket.done.add_done_callback(finished)
        return replica, "restore" if restoring else ticket.path

    @staticmethod
    def _best_source(record: ObjectRecord, location: Location) -> Location:
        # A GPU source beats the host for a GPU destination (NVLink beats PCIe); else the origin.
        # Replicas still landing without a fence can't be ordered after: skip them.
        candidates = [loc for loc, rep in record.replicas.items() if rep.landing is None or rep.fence is not None]
        if not location.is_host:
            for loc in candidates:
                if not loc.is_host:
                    return loc
        return record.origin if record.origin in candidates else candidates[0]

    def _span(self, alloc: Allocation) -> Span:
        slab = self._slab_pool[alloc.slab_id].slab(alloc.slab_id)
        return Span(alloc.location, slab.handle, alloc.offset, alloc.nbytes)

    span = _span

    # --- the rest of an object's life ------------------------------------------------------------

    def release(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        if fields.get("consumed", True):
            self.end_reads(session, fields["refs"], ())
        else:
            self.end_reads(session, (), fields["refs"])
        return self._with_notices(session, {}), []

    def end_reads(self, session: Session, counted: Iterable[str], uncounted: Iterable[str]) -> None:
        """Reads the client finished; a late or duplicate end is harmless (nothing held, nothing ends)."""
        if session.identity is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        for ref in counted:
            self.lifetimes.end_lease(session.id, ref, counted=True)
        for ref in uncounted:
            self.lifetimes.end_lease(session.id, ref, counted=False)

    def free(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        record = self.lifetimes.lookup(fields["ref"])
        self._check_access(session, record, "free")
        who = session.identity
        self.lifetimes.release(record, f"freed by function {who.function if who else '?'!r}")
        return self._with_notices(session, {}), []

    def _free_memory(self, record: ObjectRecord) -> None:
        for replica in record.replicas.values():
            self._release_replica(record, replica)
        record.replicas = {}
        self.evictor.forget(record)
        self.evictor.memory_freed()
        if self.evictor.evicted:
            self.evictor.kick()      # room for an evicted object to come back

    def hint(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        """Where the readers of some of this workflow's objects stand in its queue.

        Refs that are gone, or another workflow's, are skipped without a word: a hint is
        advice, and it must not tell a workflow which refs of others exist.
        """
        domain = session.domain
        now = self._clock()
        applied = 0
        evicted = False
        for item in fields["hints"]:
            record = self.lifetimes.find(item["ref"])
            if record is None or record.domain != domain:
                continue
            due = item.get("due_in_s")
            record.hint = elastic.Hint(item["position"], None if due is None else now + due, now)
            applied += 1
            evicted = evicted or record.home is not None
        if applied:
            self.evictor.hinted(domain)
            if evicted:
                self.evictor.kick()       # an evicted object's reader may be near: restore in time
        return self._with_notices(session, {"applied": applied}), []

    def stat(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        record = self.lifetimes.lookup(fields["ref"])
        self._check_access(session, record, "stat")
        return self._with_notices(session, {
            "ref": record.ref, "nbytes": record.nbytes, "dtype": record.dtype, "shape": list(record.shape),
            "state": "evicted" if record.home is not None else "sealed",
            "locations": [str(loc) for loc in record.replicas],
            "consumers_left": record.consumers_left, "readers": record.lease_count(),
            "expires_in_s": max(0.0, record.expiry_s - self._clock()),
            "owner": {"namespace": record.owner.namespace, "workflow": record.owner.workflow,
                      "function": record.owner.function},
        }), []

    def unmap(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        domain = session.domain
        slab_ids = set(fields["slabs"])
        for slab_id in slab_ids:
            session.mapped.pop(slab_id, None)
            if slab_id in session.arenas:
                session.arenas.discard(slab_id)
                pool = self._slab_pool.get(slab_id)
                if pool is not None:
                    pool.return_arena(session.id, slab_id)
        for (dom, _), pool in list(self.pools.items()):
            if dom == domain:
                pool.unmapped_by(session.id, slab_ids)
                pool.collect()
        self._forget_empty_pools()
        return self._with_notices(session, {}), []

    def ping(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        return self._with_notices(session, {}), []

    def stats_body(self, session: Session, fields: Mapping[str, Any]) -> Reply:
        mine = session.identity.domain if session.identity is not None else None
        return {"pools": [_stats_dict(s) for s in self.pool_stats()],
                "domain_reserved_bytes": {str(loc): budget.by_domain.get(mine, 0) if mine else 0
                                          for loc, budget in self.budgets.items()},
                "objects": len(self.lifetimes), "draining": len(self.lifetimes.draining),
                "sessions": len(self.sessions), "memory": self._memory_stats()}, []

    def _memory_stats(self) -> dict[str, Any]:
        """The memory policy's counts, node-wide (no workflow's names or refs)."""
        ev = self.evictor
        return {"policy": self.policy.name,
                "caps": {str(loc): b.limit_bytes for loc, b in self.budgets.items()},
                "evictions": sum(ev.evictions.values()),
                "evictions_by_order": {order: sum(n for (_, _, o), n in ev.evictions.items() if o == order)
                                       for order in ("queue", "lru")},
                "restores": {trigger: sum(n for (_, t), n in ev.restores.items() if t == trigger)
                             for trigger in ("proactive", "read")},
                "evicted_now": len(ev.evicted), "aborted": ev.aborted, "room_failures": ev.failed_room,
                "over_cap": ev.borrowed}

    # --- replies ------------------------------------------------------------------------------

    def _introduce(self, session: Session, pool: Pool[Any], slab_id: int, *, writable: bool) -> Reply:
        """A reply that introduces the slab if this client has not mapped it (or only read-only)."""
        mapped = session.mapped.get(slab_id)
        if mapped is not None and (mapped or not writable):
            return {}, []
        slab = pool.slab(slab_id)
        if slab.domain != session.domain:   # pragma: no cover - the checks above make this impossible
            raise errors.InternalError(f"refusing to hand slab {slab_id} of {slab.domain} to {session.domain}")
        pool_name = self.backend.pool_of(slab.handle)
        with_pool = pool_name is not None and pool_name not in session.known_pools
        export = self.backend.export_slab(slab.handle, with_pool=with_pool, writable=writable)
        session.mapped[slab_id] = writable
        if pool_name is not None:
            session.known_pools.add(pool_name)
        slab.mappers.add(session.id)
        return {"slab": {"id": slab.id, "location": str(slab.location), **export.descriptor,
                         "fds": len(export.fds)}}, list(export.fds)

    def keep_notices(self, session: Session, reply: dict[str, Any]) -> None:
        """Put back the notices of a reply that will not be sent (a notify's), ahead of newer ones."""
        retired = reply.pop("retired", None)
        if retired:
            session.retired_notices[:0] = retired
        freed = reply.pop("freed", None)
        if freed:
            session.freed_notices[:0] = freed

    def _with_notices(self, session: Session, reply: dict[str, Any]) -> dict[str, Any]:
        if session.retired_notices:
            reply["retired"] = session.retired_notices
            session.retired_notices = []
        if session.freed_notices:
            reply["freed"] = session.freed_notices
            session.freed_notices = []
        return reply

    # --- housekeeping -------------------------------------------------------------------------

    def sweep(self) -> int:
        """Expire objects, size and cap the pools, shrink them; returns how many objects expired."""
        expired = self.lifetimes.expire(self._clock())
        self.refresh_memory()
        for (domain, location), pool in list(self.pools.items()):
            if self.policy.elastic:
                pool.collect(keep_bytes=self.targets.get((domain, location), 0), leased_idle_s=LEASED_IDLE_S)
            else:
                pool.collect()
        if self.policy.elastic:
            for location, budget in self.budgets.items():
                if budget.total > budget.limit_bytes:
                    self._reclaim(location)        # over the cap: every empty slab goes
        # Also slabs retired under memory pressure since the last sweep.
        self.announce_retired()
        self.sizing.forget_idle()
        self.evictor.kick()
        self._forget_empty_pools()
        return expired

    def refresh_memory(self) -> None:
        """Caps from the devices' free memory, targets from the traffic."""
        policy = self.policy
        plentiful: dict[Location, bool] = {}
        for location, budget in self.budgets.items():
            info = None
            if location.gpu is not None and self.device_memory is not None:
                info = self.device_memory.info(location.gpu)
                if info is not None:
                    self.device_info[location] = info
            plentiful[location] = elastic.plentiful(free_bytes=info.free_bytes if info else None,
                                                    total_bytes=info.total_bytes if info else None)
            if policy.elastic:
                budget.cap_bytes = elastic.cap_bytes(limit_bytes=budget.max_bytes, share=policy.cap_share,
                                                     free_bytes=info.free_bytes if info else None,
                                                     held_bytes=budget.total)
            else:
                budget.cap_bytes = budget.max_bytes
        if not policy.elastic:
            self.targets = {}
            return
        reserved = self.sizing.reserved_by(lambda key: (key[0], key[2]))
        # The floor is a location's: shared by the workflows that hold memory there.
        sharing = Counter(location for _, location in self.pools)
        self.targets = {(domain, location): elastic.target_bytes(
                            reserved_bytes=reserved.get((domain, location), 0),
                            floor_bytes=policy.floor_bytes // sharing[location], plentiful=plentiful[location])
                        for domain, location in self.pools}

    def _forget_empty_pools(self) -> None:
        for key, pool in list(self.pools.items()):
            if pool.empty():
                del self.pools[key]
        active = {domain for domain, _ in self.pools}
        active.update(identity.domain for identity in self._per_identity)    # sessions, counted per identity
        for domain in list(self._open_domains - active):
            self.backend.close_domain(domain)
        self._open_domains = active

    def refresh_snapshot(self) -> Snapshot:
        """Rebuild the figures other threads read (call on the event loop)."""
        self.snapshot = Snapshot(
            pools=tuple(self.pool_stats()),
            budgets=tuple(BudgetView(loc, b.max_bytes, b.quota_bytes, b.refusals, tuple(b.by_domain.items()))
                          for loc, b in self.budgets.items()),
            objects_by_location=tuple(self.objects_by_location().items()),
            draining=len(self.lifetimes.draining),
            memory=self.memory_view())
        return self.snapshot

    def memory_view(self) -> MemoryView:
        ev = self.evictor
        evicted: dict[Location, tuple[int, int]] = {}
        for record in ev.evicted.values():
            if record.home is not None:
                n, b = evicted.get(record.home, (0, 0))
                evicted[record.home] = (n + 1, b + record.nbytes)
        return MemoryView(
            policy=self.policy.name,
            caps=tuple((loc, b.limit_bytes) for loc, b in self.budgets.items()),
            device_free=tuple((loc, info.free_bytes) for loc, info in self.device_info.items()),
            targets=tuple((d, loc, t) for (d, loc), t in self.targets.items()),
            reservations=tuple((key[0], key[1], key[2], r.reserved_bytes) for key, r in self.sizing.reservations()),
            releases=tuple((loc, reason, n) for loc, counts in self._releases.items() for reason, n in counts.items()),
            evictions=tuple((a, b, order, n) for (a, b, order), n in ev.evictions.items()),
            evicted_bytes_total=tuple(ev.evicted_bytes_total.items()),
            restores=tuple((loc, trigger, n) for (loc, trigger), n in ev.restores.items()),
            evicted_now=tuple((loc, n, b) for loc, (n, b) in evicted.items()),
            aborted=ev.aborted, failed_room=ev.failed_room, borrowed=ev.borrowed)

    def pool_stats(self) -> list[PoolStats]:
        """One line per location: every domain's pools there together."""
        out = []
        for location in self.locations:
            stats = [pool.stats() for pool in self.pools_at(location)]
            out.append(PoolStats(location, sum(s.reserved_bytes for s in stats), sum(s.used_bytes for s in stats),
                                 sum(s.slabs for s in stats), sum(s.allocations for s in stats)))
        return out

    def objects_by_location(self) -> Counter[Location]:
        counts: Counter[Location] = Counter()
        for record in self.lifetimes:
            counts.update(record.replicas.keys())
        return counts

    def close(self) -> None:
        self.evictor.close()
        if self.device_memory is not None:
            self.device_memory.close()
        for session in list(self.sessions.values()):
            self.close_session(session)
        self.lifetimes.release_all("the sidecar shut down")
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        for domain in self._open_domains:
            self.backend.close_domain(domain)
        self._open_domains = set()


def _stats_dict(stats: PoolStats) -> dict[str, Any]:
    return {"location": str(stats.location), "reserved_bytes": stats.reserved_bytes, "used_bytes": stats.used_bytes,
            "slabs": stats.slabs, "allocations": stats.allocations}

