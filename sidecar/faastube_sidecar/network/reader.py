"""The consumer's side: a get of a ref another node holds, read into this node's pool.

The owner lends the object's span (``Open``), the network engine reads it straight into
room reserved in the reader's pool (NIXL: VRAM to VRAM where the transport allows), and
the bytes become this node's copy of the ref, for the reads that asked for it; then the
lend is closed, counting those reads on the owner. A peer that dies or stalls mid-read
gives ``Unavailable`` (retry the invocation); the reserved room goes back, the lend is
closed uncounted (or times out on the owner), nothing stays registered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass

from faastube import errors, protocol
from faastube.locations import Location

from faastube_sidecar.dataplane import DataPlane, Session
from faastube_sidecar.identity import Domain, Identity
from faastube_sidecar.network.auth import PeerAuth
from faastube_sidecar.network.engine import NetRead, NetworkEngine
from faastube_sidecar.network.messages import CloseRead, Lent, OpenRead, Reader
from faastube_sidecar.network.metrics import NetworkMetrics, read_result
from faastube_sidecar.network.nixl import ReadFailed, Span
from faastube_sidecar.network.peers import PeerDirectory
from faastube_sidecar.network.rpc import PeerClient
from faastube_sidecar.pool import Allocation
from faastube_sidecar.transfers.scheduler import FunctionIdentity, TransferResult

logger = logging.getLogger(__name__)
# A read is given up when no chunk of it has landed for this long (a dead or stuck peer);
# a slow one that keeps landing chunks goes on (the owner's lend outlasts it: service.py).
STALL_S = 10.0


@dataclass
class _InFlight:
    done: asyncio.Future[None]
    readers: int = 1               # gets of this ref at this node waiting on the one read


class RemoteReader:
    """Implements the data plane's ``RemoteGets``."""

    def __init__(self, dataplane: DataPlane, engine: NetworkEngine, directory: PeerDirectory, auth: PeerAuth,
                 *, metrics: NetworkMetrics | None = None, observer_path: str = "network") -> None:
        self._dp = dataplane
        self._engine = engine
        self._directory = directory
        self._auth = auth
        self._clients: dict[str, PeerClient] = {}
        # One network read per ref and workflow at a time; other gets of it here share that read
        # (another workflow's get of the ref is refused by the owner on its own).
        self._in_flight: dict[tuple[str, Domain], _InFlight] = {}
        self._path = observer_path
        self._metrics = metrics

    async def fetch(self, session: Session, ref: str, location: Location) -> None:
        key = (ref, session.domain)
        waiting = self._in_flight.get(key)
        if waiting is not None:                      # another get here reads it already: share that read
            waiting.readers += 1
            await asyncio.shield(waiting.done)
            return
        flight = self._in_flight[key] = _InFlight(asyncio.get_running_loop().create_future())
        try:
            await self._read(session, ref, location, flight)
            flight.done.set_result(None)
            self._count(None)
        except BaseException as e:
            self._count(e)
            flight.done.set_exception(e if isinstance(e, Exception) else errors.Unavailable(f"get {ref}: cancelled"))
            flight.done.exception()                  # marked retrieved: joiners re-raise it, or nobody does
            raise
        finally:
            del self._in_flight[key]

    def _count(self, exc: BaseException | None) -> None:
        if self._metrics is not None:
            self._metrics.reads.labels(read_result(exc)).inc()

    async def _client(self, node: str) -> PeerClient:
        client = self._clients.get(node)
        if client is None:
            directory = self._directory
            peer = directory.lookup(node) if directory.cached(node) else await asyncio.to_thread(directory.lookup, node)
            client = self._clients[node] = PeerClient(node, peer.address, self._auth)
        return client

    async def _forget(self, node: str) -> None:
        client = self._clients.pop(node, None)
        self._directory.stale(node)
        if client is not None:
            await client.aclose()

    async def _read(self, session: Session, ref: str, location: Location, flight: _InFlight) -> None:
        node = protocol.ref_node(ref)
        assert node is not None and session.identity is not None
        who = session.identity
        client = await self._client(node)
        try:
            lent = await client.open(OpenRead(ref, Reader(who.namespace, who.workflow, who.function),
                                              self._engine.agent.name))
        except errors.Unavailable:
            await self._forget(node)
            raise
        reads = 0
        try:
            alloc, span = self._dp.reserve(session, location, lent.nbytes)
            if lent.nbytes:                          # an empty object: its dtype and shape say it all
                await self._read_into(alloc, span, lent, who, node, ref)
            reads = flight.readers
            try:
                self._dp.adopt(session, ref, alloc, dtype=lent.dtype, shape=lent.shape, reads=reads,
                               expires_in_s=lent.expires_in_s)
            except BaseException:
                reads = 0
                self._dp.unreserve(alloc)
                raise
        finally:
            asyncio.get_running_loop().create_task(self._close(client, lent, reads), name=f"close-lend-{ref}")

    async def _read_into(self, alloc: Allocation, span: object, lent: Lent, who: Identity, node: str,
                         ref: str) -> None:
        """NIXL-read the lent bytes into the reserved room; on failure the room goes back, once
        NIXL can no longer write into it."""
        address, device, mem = self._dp.backend.memory_of(span)  # type: ignore[arg-type]
        local = Span(address, lent.nbytes, device, mem)  # type: ignore[arg-type]
        agent = self._engine.agent
        registration = agent.register(local)
        landed: concurrent.futures.Future[TransferResult] | None = None
        try:
            landed = self._engine.submit(NetRead(FunctionIdentity(who.workflow, who.function), local,
                                                 Span(lent.address, lent.nbytes, lent.device, lent.mem),
                                                 agent.learn(lent.agent_metadata)))
            await self._landed(landed, lent.nbytes, node, ref)
        except BaseException:
            if landed is not None and not landed.done():
                self._engine.abandon(landed)
                loop = asyncio.get_running_loop()
                landed.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._give_back, alloc, registration))
            else:
                self._give_back(alloc, registration)
            raise
        agent.deregister(registration)

    def _give_back(self, alloc: Allocation, registration: object) -> None:
        self._engine.agent.deregister(registration)
        self._dp.unreserve(alloc)

    async def _landed(self, landed: concurrent.futures.Future[TransferResult], nbytes: int, node: str, ref: str) -> None:
        started = asyncio.get_running_loop().time()
        waiting = asyncio.wrap_future(landed)
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(waiting), min(1.0, STALL_S))
                    break
                except TimeoutError:
                    stalled_s = self._engine.stalled_for(landed)
                    if stalled_s > STALL_S:
                        raise errors.Unavailable(f"get {ref}: nothing came from node {node} for {stalled_s:.0f}s; "
                                                 f"retry") from None
        except ReadFailed as e:
            raise errors.Unavailable(f"get {ref}: reading from node {node} failed ({e}); retry") from None
        self._dp.observer.transfer(self._path, nbytes, asyncio.get_running_loop().time() - started, route="network")

    async def _close(self, client: PeerClient, lent: Lent, reads: int) -> None:
        try:
            await client.close(CloseRead(lent.lease, reads))
        except errors.FaastubeError as e:
            # The owner times the lend out on its own; the reads it should have counted are lost.
            logger.warning("closing the read lent by node %s: %s", client.node, e)

    async def aclose(self) -> None:
        for node in list(self._clients):
            await self._forget(node)
