"""The owner's side: lend spans of this node's objects to peers' readers, one read each.

A lend is a lease like a local reader's (the object can't be freed or moved under it)
plus a NIXL registration of exactly the object's bytes, so a peer can read nothing
else. It ends when the reader's sidecar closes it, or when its time runs out (the
reader's node died mid-read): either way the registration goes and the lease ends.
Tenancy is checked here, by the owner, against the reader the peer names.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from faastube import errors
from faastube.locations import HOST

from faastube_sidecar.dataplane import DataPlane, Session
from faastube_sidecar.identity import Identity
from faastube_sidecar.network.messages import CloseRead, Lent, OpenRead
from faastube_sidecar.network.metrics import NetworkMetrics
from faastube_sidecar.network.nixl import Agent, ProgressPump, Span

logger = logging.getLogger(__name__)
# A lend is closed by its reader; these only bound how long a lend outlives a reader's
# node that died mid-read (the reader itself gives up on a read that stalls: reader.py).
MIN_LEND_S = 60.0
LEND_BYTES_PER_S = 10e6


@dataclass
class _Lend:
    session: Session
    ref: str
    registration: Any
    peer: str
    expires_s: float


class Lender:
    def __init__(self, dataplane: DataPlane, agent: Agent, *, lend_from_host: bool = False,
                 max_lends: int = 4096, clock: Callable[[], float] = time.monotonic,
                 metrics: NetworkMetrics | None = None) -> None:
        self._dp = dataplane
        self._agent = agent
        self._pump = ProgressPump(agent)
        self._from_host = lend_from_host
        self._max = max_lends
        self._clock = clock
        self._lends: dict[str, _Lend] = {}
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_lends(lambda: self.open_lends)
        self._introduced: dict[str, str] = {}    # peer -> its NIXL agent that has our connection metadata

    @property
    def open_lends(self) -> int:
        return len(self._lends)

    async def open(self, request: OpenRead, *, peer: str) -> Lent:
        if len(self._lends) >= self._max:
            raise errors.Unavailable(f"open {request.ref}: {self._max} reads already lent to peers; retry")
        session = self._dp.open_session()
        reader = request.reader
        session.identity = Identity(reader.namespace, reader.workflow, f"{reader.function}@{peer}")
        try:
            record, span = await self._dp.lend(session, request.ref, HOST if self._from_host else None)
        except BaseException:
            self._dp.close_session(session)
            raise
        address, device, mem = self._dp.backend.memory_of(span)
        try:
            # An empty object lends no bytes: nothing to register, only its dtype and shape.
            registration = None if span.nbytes == 0 else self._agent.register(Span(address, span.nbytes, device, mem))  # type: ignore[arg-type]
            metadata = (b"" if registration is None else
                        self._agent.metadata_for(registration,
                                                 with_connection=self._introduced.get(peer) != request.agent))
        except Exception as e:
            self._dp.close_session(session)         # ends its lease, uncounted
            raise errors.InternalError(f"open {request.ref}: NIXL registration failed: {e}") from e
        if registration is not None:
            self._introduced[peer] = request.agent
        lease = secrets.token_hex(16)
        lasts_s = max(MIN_LEND_S, span.nbytes / LEND_BYTES_PER_S)
        self._lends[lease] = _Lend(session, request.ref, registration, peer, self._clock() + lasts_s)
        self._pump.hold()
        return Lent(lease, span.nbytes, record.dtype, record.shape, self._agent.name,
                    base64.b64encode(metadata).decode(), address, device, mem,  # type: ignore[arg-type]
                    max(0.0, record.expiry_s - self._dp.now()))

    def close(self, request: CloseRead, *, peer: str) -> None:
        lend = self._lends.get(request.lease)
        if lend is None or lend.peer != peer:
            raise errors.RefNotFound(request.lease, "no such lend (closed already, timed out, or another peer's)")
        del self._lends[request.lease]
        self._end(lend, reads=request.reads)
        if self._metrics is not None:
            self._metrics.lends.labels("closed").inc()

    def expire(self) -> int:
        now = self._clock()
        late = [lease for lease, lend in self._lends.items() if lend.expires_s <= now]
        for lease in late:
            lend = self._lends.pop(lease)
            logger.warning("read of %s lent to %s timed out: its lease ends uncounted", lend.ref, lend.peer)
            self._end(lend, reads=0)
            if self._metrics is not None:
                self._metrics.lends.labels("timed_out").inc()
        return len(late)

    def close_all(self) -> None:
        for lease in list(self._lends):
            self._end(self._lends.pop(lease), reads=0)
        self._pump.close()

    def _end(self, lend: _Lend, *, reads: int) -> None:
        self._pump.release()
        try:
            if lend.registration is not None:
                self._agent.deregister(lend.registration)
        except Exception as e:  # noqa: BLE001 - the lease must end whatever NIXL says
            logger.warning("deregistering the lent span of %s: %s", lend.ref, e)
        self._dp.lifetimes.end_lease(lend.session.id, lend.ref, counted=reads > 0, reads=reads)
        self._dp.close_session(lend.session)


async def expire_forever(lender: Lender, *, every_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        lender.expire()
