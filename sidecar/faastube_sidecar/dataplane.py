"""The data-plane service: pools, objects and sessions, one method per request.

Everything here runs on the sidecar's event loop thread; only device copies leave
it (the backend awaits them). Methods take validated request bodies (the dispatch
layer checked their shape) and return reply bodies plus the fds to pass with them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from faastube import errors, protocol

from faastube_sidecar.backends import Backend, CopyTicket, Span
from faastube_sidecar.identity import Identity
from faastube_sidecar.objects import ObjectRecord, ObjectTable, State, new_ref
from faastube_sidecar.pool import Allocation, Pool, PoolLimits, PoolStats

logger = logging.getLogger(__name__)

# Only plain numeric dtypes travel: an object dtype would be a pointer into another process.
_DTYPE_KINDS = set("biufc")


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    default_ttl_s: float = 600.0        # objects nobody frees die after this
    max_ttl_s: float = 86400.0
    max_consumers: int = 1 << 16
    host_limits: PoolLimits = PoolLimits(slab_bytes=64 << 20, max_bytes=8 << 30)
    gpu_limits: PoolLimits = PoolLimits(slab_bytes=512 << 20, max_bytes=16 << 30)


@dataclass(eq=False)
class Session:
    """One client connection's state: who it is and what it holds."""

    id: int
    identity: Identity | None = None
    device_map: dict[int, int] = field(default_factory=dict)     # client ordinal -> our GPU index
    mapped_slabs: set[int] = field(default_factory=set)
    known_pools: set[str] = field(default_factory=set)
    known_events: set[int] = field(default_factory=set)          # GPUs whose copy event the client holds
    leases: Counter[str] = field(default_factory=Counter)
    writing: set[str] = field(default_factory=set)
    retired_notices: list[int] = field(default_factory=list)


class TransferObserver:
    """Where the data plane reports what it did (metrics); a no-op by default."""

    def transfer(self, path: str, nbytes: int, seconds: float, *, route: str = "",
                 requester: Identity | None = None) -> None:
        pass


Reply = tuple[dict[str, Any], list[int]]


class DataPlane:
    def __init__(self, backend: Backend, config: DataPlaneConfig = DataPlaneConfig(), *,
                 observer: TransferObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.config = config
        self.observer = observer or TransferObserver()
        self._clock = clock
        self.pools: dict[str, Pool[Any]] = {}
        for location in backend.locations():
            limits = config.host_limits if location == protocol.HOST else config.gpu_limits
            self.pools[location] = Pool(location, backend, limits, clock=clock)
        self.table = ObjectTable()
        self.sessions: dict[int, Session] = {}
        self._next_session = 1

    # --- sessions -----------------------------------------------------------------------------

    def open_session(self) -> Session:
        session = Session(self._next_session)
        self._next_session += 1
        self.sessions[session.id] = session
        return session

    def hello(self, session: Session, identity: Identity, body: Mapping[str, Any]) -> Reply:
        if session.identity is not None:
            raise errors.InvalidRequest("hello: this connection already said hello")
        session.identity = identity
        for device in body.get("devices") or ():
            gpu = self.backend.gpu_for_bus_id(device["pci_bus_id"])
            if gpu is not None:
                session.device_map[device["ordinal"]] = gpu
        return {"session": session.id, "backend": self.backend.name,
                "locations": list(self.pools), "device_map": {str(k): v for k, v in session.device_map.items()},
                "identity": {"namespace": identity.namespace, "workflow": identity.workflow,
                             "function": identity.function}}, []

    def close_session(self, session: Session) -> None:
        """The client went away (cleanly or not): give back everything it held."""
        self.sessions.pop(session.id, None)
        for ref in list(session.writing):
            record = self.table.find_leased(ref)
            if record is not None and record.state is State.WRITING:
                self._drop(record)
        session.writing.clear()
        for ref in session.leases:
            record = self.table.find_leased(ref)
            if record is None:
                continue
            record.leases.pop(session.id, None)
            self._free_if_drained(record)
        session.leases.clear()
        for pool in self.pools.values():
            pool.unmapped_by(session.id)
            pool.collect()

    # --- requests -----------------------------------------------------------------------------

    def _identity(self, session: Session) -> Identity:
        if session.identity is None:
            raise errors.InvalidRequest("say hello first: every connection starts with a hello request")
        return session.identity

    def _location(self, session: Session, text: str) -> str:
        protocol.parse_location(text)  # a malformed location gets its own message
        if text not in self.pools:
            known = ", ".join(self.pools)
            raise errors.InvalidRequest(f"location {text!r} has no pool on this node (known: {known})")
        return text

    def _check_access(self, session: Session, record: ObjectRecord, action: str) -> None:
        who = self._identity(session)
        owner = record.owner
        if (who.namespace, who.workflow) != (owner.namespace, owner.workflow):
            raise errors.PermissionDenied(
                f"{action} {record.ref}: function {who.function!r} of workflow {who.namespace}/{who.workflow} "
                f"may not touch data of workflow {owner.namespace}/{owner.workflow}")

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.config.default_ttl_s
        if ttl_s <= 0 or ttl_s > self.config.max_ttl_s:
            raise errors.InvalidRequest(f"ttl_s must be in (0, {self.config.max_ttl_s}], got {ttl_s}")
        return float(ttl_s)

    def alloc(self, session: Session, body: Mapping[str, Any]) -> Reply:
        identity = self._identity(session)
        location = self._location(session, body["location"])
        nbytes, shape = body["nbytes"], tuple(body["shape"])
        try:
            dtype = np.dtype(body["dtype"])
        except TypeError as e:
            raise errors.InvalidRequest(f"alloc: bad dtype {body['dtype']!r:.40}: {e}") from None
        if dtype.kind not in _DTYPE_KINDS or dtype.hasobject:
            raise errors.InvalidRequest(f"alloc: dtype {dtype.str} is not a plain numeric type")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise errors.InvalidRequest(
                f"alloc: nbytes {nbytes} != product of shape {list(shape)} x itemsize {dtype.itemsize}")
        alloc = self.pools[location].allocate(nbytes)
        now = self._clock()
        record = ObjectRecord(new_ref(), identity, nbytes, dtype.str, shape, State.WRITING,
                              {location: alloc}, session.id, now, now + self.config.default_ttl_s)
        self.table.add(record)
        session.writing.add(record.ref)
        reply, fds = self._describe(session, alloc)
        reply["ref"] = record.ref
        return reply, fds

    def seal(self, session: Session, body: Mapping[str, Any]) -> Reply:
        record = self.table.lookup(body["ref"])
        if record.writer_session != session.id or record.state is not State.WRITING:
            raise errors.InvalidRequest(f"seal {record.ref}: only its writer can seal it, once")
        consumers = body.get("consumers")
        if consumers is not None and not 1 <= consumers <= self.config.max_consumers:
            raise errors.InvalidRequest(f"seal: consumers must be in [1, {self.config.max_consumers}], got {consumers}")
        copied = body.get("copied")
        if copied is not None:
            if copied not in ("local", "host"):
                raise errors.InvalidRequest(f"seal: copied must be 'local' or 'host', got {copied!r:.20}")
            self.observer.transfer(copied, record.nbytes, 0.0)
        record.state = State.SEALED
        record.consumers_left = consumers
        session.writing.discard(record.ref)
        self.table.set_expiry(record, self._clock() + self._ttl(body.get("ttl_s")))
        return self._with_notices(session, {}), []

    def get_local(self, session: Session, body: Mapping[str, Any]) -> Reply | None:
        """Serve a get without awaiting anything, if a replica is already where it is wanted."""
        record, location = self._readable(session, body)
        alloc = record.replicas.get(location)
        if alloc is None:
            return None
        self._start_lease(session, record)
        return self._get_reply(session, record, alloc, "local")

    async def get(self, session: Session, body: Mapping[str, Any]) -> Reply:
        record, location = self._readable(session, body)
        alloc = record.replicas.get(location)
        if alloc is not None:
            self._start_lease(session, record)
            return self._get_reply(session, record, alloc, "local")
        # The lease starts now, so a free() during the copy can't recycle the source under it.
        self._start_lease(session, record)
        try:
            alloc, ticket = self._replicate(session, record, location)
            if ticket.wait_gpu is None:
                # The consumer can't order itself after the copy (a CPU reader): wait for it here.
                # Our lease keeps the bytes even if the object is freed meanwhile.
                await asyncio.shield(ticket.done)
        except BaseException:
            self._end_lease(session, record)
            raise
        return self._get_reply(session, record, alloc, ticket.path)

    def _readable(self, session: Session, body: Mapping[str, Any]) -> tuple[ObjectRecord, str]:
        record = self.table.lookup(body["ref"])
        self._check_access(session, record, "get")
        if record.state is State.WRITING:
            raise errors.ObjectNotReady(f"get {record.ref}: not sealed yet")
        return record, self._location(session, body["location"])

    def _start_lease(self, session: Session, record: ObjectRecord) -> None:
        record.leases[session.id] = record.leases.get(session.id, 0) + 1
        session.leases[record.ref] += 1

    def _get_reply(self, session: Session, record: ObjectRecord, alloc: Allocation, path: str) -> Reply:
        reply, fds = self._describe(session, alloc)
        reply.update(ref=record.ref, dtype=record.dtype, shape=list(record.shape), path=path)
        wait_gpu = record.pending.get(alloc.location)
        if wait_gpu is not None:
            wait: dict[str, Any] = {"gpu": wait_gpu}
            if wait_gpu not in session.known_events:
                handle = self.backend.copy_event(wait_gpu)
                if handle is not None:
                    wait["event"] = base64.b64encode(handle).decode()
                    session.known_events.add(wait_gpu)
            reply["wait"] = wait
        return reply, fds

    def _replicate(self, session: Session, record: ObjectRecord, location: str) -> tuple[Allocation, CopyTicket]:
        source_location = self._best_source(record, location)
        src = record.replicas[source_location]
        dst = self.pools[location].allocate(record.nbytes)
        start = self._clock()
        try:
            who = self._identity(session)
            ticket = self.backend.submit_copy(self._span(dst), self._span(src),
                                              requester=(f"{who.namespace}/{who.workflow}", who.function))
        except BaseException:
            self.pools[location].free(dst)
            raise
        record.replicas[location] = dst
        record.pending[location] = ticket.wait_gpu
        record.copies_in_flight += 1
        logger.debug("replicating %s to %s over %s %s (%d bytes)", record.ref, location, ticket.path, ticket.route,
                     record.nbytes)

        def finished(done: asyncio.Future[None]) -> None:
            record.copies_in_flight -= 1
            record.pending.pop(location, None)
            if done.exception() is not None:
                logger.error("copy of %s to %s failed: %s", record.ref, location, done.exception())
                if record.replicas.get(location) is dst:
                    del record.replicas[location]
                    self.pools[location].free(dst)
            else:
                self.observer.transfer(ticket.path, record.nbytes, self._clock() - start,
                                       route=ticket.route or ticket.path, requester=who)
            self._free_if_drained(record)

        ticket.done.add_done_callback(finished)
        return dst, ticket

    @staticmethod
    def _best_source(record: ObjectRecord, location: str) -> str:
        # A GPU source beats the host for a GPU destination (NVLink beats PCIe); else the origin.
        if location != protocol.HOST:
            for loc in record.replicas:
                if loc != protocol.HOST:
                    return loc
        return record.origin

    def _span(self, alloc: Allocation) -> Span:
        slab = self.pools[alloc.location].slab(alloc.slab_id)
        return Span(alloc.location, slab.handle, alloc.offset, alloc.nbytes)

    def release(self, session: Session, body: Mapping[str, Any]) -> Reply:
        self._identity(session)
        consumed = body.get("consumed", True)
        for ref in body["refs"]:
            if session.leases.get(ref, 0) <= 0:
                continue  # nothing held: a late or duplicate release is harmless
            record = self.table.find_leased(ref)
            if record is None:
                session.leases.pop(ref, None)
                continue
            self._end_lease(session, record)
            if consumed and not record.released and record.consumers_left is not None:
                record.consumers_left -= 1
                if record.consumers_left <= 0:
                    self._drop(record)
        return self._with_notices(session, {}), []

    def _end_lease(self, session: Session, record: ObjectRecord) -> None:
        left = session.leases[record.ref] - 1
        if left <= 0:
            session.leases.pop(record.ref, None)
        else:
            session.leases[record.ref] = left
        held = record.leases.get(session.id, 0) - 1
        if held <= 0:
            record.leases.pop(session.id, None)
        else:
            record.leases[session.id] = held
        self._free_if_drained(record)

    def free(self, session: Session, body: Mapping[str, Any]) -> Reply:
        record = self.table.lookup(body["ref"])
        self._check_access(session, record, "free")
        self._drop(record)
        return self._with_notices(session, {}), []

    def _drop(self, record: ObjectRecord) -> None:
        if self.table.remove(record):
            self._free_memory(record)

    def _free_if_drained(self, record: ObjectRecord) -> None:
        """A released object's memory goes back once its last reader and copy are done."""
        if record.released and not record.busy():
            self.table.draining.pop(record.ref, None)
            self._free_memory(record)

    def _free_memory(self, record: ObjectRecord) -> None:
        for location, alloc in record.replicas.items():
            self.pools[location].free(alloc)
        record.replicas = {}

    def stat(self, session: Session, body: Mapping[str, Any]) -> Reply:
        record = self.table.lookup(body["ref"])
        self._check_access(session, record, "stat")
        return self._with_notices(session, {
            "ref": record.ref, "nbytes": record.nbytes, "dtype": record.dtype, "shape": list(record.shape),
            "state": record.state.value, "locations": list(record.replicas),
            "consumers_left": record.consumers_left, "readers": record.lease_count(),
            "expires_in_s": max(0.0, record.expiry_s - self._clock()),
            "owner": {"namespace": record.owner.namespace, "workflow": record.owner.workflow,
                      "function": record.owner.function},
        }), []

    def unmap(self, session: Session, body: Mapping[str, Any]) -> Reply:
        self._identity(session)
        slab_ids = set(body["slabs"])
        session.mapped_slabs -= slab_ids
        for pool in self.pools.values():
            pool.unmapped_by(session.id, slab_ids)
            pool.collect()
        return {}, []

    def ping(self, session: Session, body: Mapping[str, Any]) -> Reply:
        return self._with_notices(session, {}), []

    def stats_body(self, session: Session, body: Mapping[str, Any]) -> Reply:
        return {"pools": [_stats_dict(s) for s in self.pool_stats()],
                "objects": len(self.table), "draining": len(self.table.draining),
                "sessions": len(self.sessions)}, []

    # --- replies ------------------------------------------------------------------------------

    def _describe(self, session: Session, alloc: Allocation) -> Reply:
        """The allocation as a client sees it, introducing its slab on first sight."""
        reply: dict[str, Any] = {"alloc": {"slab": alloc.slab_id, "location": alloc.location,
                                           "offset": alloc.offset, "nbytes": alloc.nbytes}}
        fds: list[int] = []
        if alloc.slab_id not in session.mapped_slabs:
            slab = self.pools[alloc.location].slab(alloc.slab_id)
            with_pool = alloc.location not in session.known_pools
            export = self.backend.export_slab(slab.handle, with_pool=with_pool)
            reply["slab"] = {"id": slab.id, "location": slab.location, **export.descriptor,
                             "fds": len(export.fds)}
            fds.extend(export.fds)
            session.mapped_slabs.add(slab.id)
            slab.mappers.add(session.id)
            if export.fds or alloc.location == protocol.HOST:
                session.known_pools.add(alloc.location)
            elif with_pool:  # pragma: no cover - a backend that exports pools must send a fd
                raise errors.InternalError("backend exported no pool handle")
        return self._with_notices(session, reply), fds

    def _with_notices(self, session: Session, reply: dict[str, Any]) -> dict[str, Any]:
        if session.retired_notices:
            reply["retired"] = session.retired_notices
            session.retired_notices = []
        return reply

    # --- housekeeping -------------------------------------------------------------------------

    def sweep(self) -> int:
        """Expire objects and shrink pools; returns how many objects expired."""
        expired = self.table.expired(self._clock())
        for record in expired:
            logger.debug("object %s expired", record.ref)
            self._drop(record)
        for pool in self.pools.values():
            pool.collect()
            # Also slabs retired under memory pressure since the last sweep.
            for slab_id in pool.take_retired():
                for session in self.sessions.values():
                    if slab_id in session.mapped_slabs:
                        session.retired_notices.append(slab_id)
        return len(expired)

    def pool_stats(self) -> list[PoolStats]:
        return [pool.stats() for pool in self.pools.values()]

    def objects_by_location(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for record in self.table:
            counts.update(record.replicas.keys())
        return counts

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session)
        for pool in self.pools.values():
            pool.close()


def _stats_dict(stats: PoolStats) -> dict[str, Any]:
    return {"location": stats.location, "reserved_bytes": stats.reserved_bytes, "used_bytes": stats.used_bytes,
            "slabs": stats.slabs, "allocations": stats.allocations}
