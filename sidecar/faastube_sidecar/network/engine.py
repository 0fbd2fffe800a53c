"""NIXL reads scheduled like every other transfer: per link, SLO-shared, chunked.

The node's network link (``net:in``) is one more link of a ``TransferScheduler``: a
remote get is a transfer with its reader's SLO, cut into chunks, and the scheduler
chooses whose chunk goes next, so a 1 GiB read does not hold a 1 MiB one behind it
for its whole length. Each chunk is one NIXL read; this module's thread posts them
and polls them. A read that fails fails its transfer: chunks not yet posted are
skipped and the caller's future gets ``ReadFailed`` (the peer went away: retryable).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any

from faastube_sidecar.network.nixl import Agent, ReadFailed, Span
from faastube_sidecar.transfers.scheduler import (
    HOST,
    NET,
    Chunk,
    ChunkDone,
    Endpoint,
    FunctionIdentity,
    LinkId,
    LinkSpec,
    SchedulerSettings,
    TransferRequest,
    TransferResult,
    TransferScheduler,
    make_route,
)

logger = logging.getLogger(__name__)
_ids = itertools.count(1)
NET_IN = LinkId("net:in")
# 16 MiB chunks, 4 in flight: each read is a few ms at 10-400 Gb/s, so per-read costs
# (~20 us to post and poll) stay small while a newcomer waits at most 4 chunks.
DEFAULT_SETTINGS = SchedulerSettings(chunk_bytes=16 << 20, max_inflight_chunks_per_link=4)


class _Clock:
    def now_s(self) -> float:
        return time.perf_counter()


@dataclasses.dataclass(frozen=True)
class NetRead:
    """Read `remote` (lent by `agent`) into `local`, for `identity`, within `slo_s` if given."""

    identity: FunctionIdentity
    local: Span
    remote: Span
    agent: str
    slo_s: float | None = None


@dataclasses.dataclass
class _Flight:
    """One read in the engine, from submit until its future is settled."""

    read: NetRead
    future: concurrent.futures.Future[TransferResult]
    progress_s: float                 # when it was submitted, then when a chunk of it last ended
    failed: str | None = None         # why it failed: no more chunks go out, the future gets ReadFailed


@dataclasses.dataclass
class _Posted:
    chunk: Chunk
    handle: Any
    on_done: ChunkDone


class _NixlExecutor:
    """Posts one NIXL read per chunk; ``poll`` completes those that ended."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.flights: dict[str, _Flight] = {}     # transfer id -> its flight
        self._posted: list[_Posted] = []

    def issue(self, chunk: Chunk, on_done: ChunkDone) -> None:
        flight = self.flights[chunk.transfer_id]
        if flight.failed is not None:
            on_done(chunk)        # the transfer already failed: nothing more goes out for it
            return
        read, at, n = flight.read, chunk.offset_bytes, chunk.size_bytes
        try:
            handle = self.agent.read(dataclasses.replace(read.local, address=read.local.address + at, nbytes=n),
                                     dataclasses.replace(read.remote, address=read.remote.address + at, nbytes=n),
                                     read.agent)
        except ReadFailed as e:
            flight.failed = flight.failed or str(e)
            on_done(chunk)
            return
        self._posted.append(_Posted(chunk, handle, on_done))

    def poll(self) -> int:
        still: list[tuple[_Posted, str]] = []
        ended: list[tuple[_Posted, str]] = []
        for posted in self._posted:
            state = self.agent.state(posted.handle)
            (still if state == "PROC" else ended).append((posted, state))
        self._posted = [p for p, _ in still]
        now = time.monotonic()
        for posted, state in ended:
            flight = self.flights[posted.chunk.transfer_id]
            flight.progress_s = now
            if state != "DONE":
                flight.failed = flight.failed or f"a NIXL read from {flight.read.agent} ended in {state}"
            posted.on_done(posted.chunk)
        return len(ended)

    @property
    def in_flight(self) -> int:
        return len(self._posted)


class NetworkEngine:
    """Scheduler + NIXL executor on one thread; ``submit`` from any thread."""

    def __init__(self, agent: Agent, *, bandwidth_bytes_per_s: float,
                 settings: SchedulerSettings = DEFAULT_SETTINGS) -> None:
        self._executor = _NixlExecutor(agent)
        self._scheduler = TransferScheduler([LinkSpec(NET_IN, bandwidth_bytes_per_s, kind="network")],
                                            executor=self._executor, clock=_Clock(), settings=settings)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._finished: list[tuple[str, TransferResult]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="faastube-network", daemon=True)
        self._thread.start()

    @property
    def agent(self) -> Agent:
        return self._executor.agent

    def submit(self, read: NetRead) -> concurrent.futures.Future[TransferResult]:
        if read.local.nbytes != read.remote.nbytes or read.local.nbytes <= 0:
            raise ValueError(f"a network read needs equal, non-zero sizes (got {read.local.nbytes} "
                             f"and {read.remote.nbytes})")
        future: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        transfer_id = f"net{next(_ids)}"
        future.transfer_id = transfer_id  # type: ignore[attr-defined]  # what stalled_for and abandon look up
        request = TransferRequest(transfer_id, read.identity, make_route([([NET, _endpoint(read.local)], 1.0)],
                                                                         read.local.nbytes),
                                  slo_s=read.slo_s, src_address=read.remote.address, dst_address=read.local.address)
        with self._lock:
            if self._stopping:
                raise ReadFailed("the network engine is closed")
            self._executor.flights[transfer_id] = _Flight(read, future, time.monotonic())
            self._scheduler.submit(request, lambda result: self._finished.append((transfer_id, result)))
        self._wake.set()
        return future

    def _flight(self, future: concurrent.futures.Future[TransferResult]) -> _Flight | None:
        return self._executor.flights.get(getattr(future, "transfer_id", ""))

    def stalled_for(self, future: concurrent.futures.Future[TransferResult]) -> float:
        """Seconds since a chunk of this transfer last landed (or since it was submitted)."""
        with self._lock:
            flight = self._flight(future)
            return 0.0 if flight is None else time.monotonic() - flight.progress_s

    def abandon(self, future: concurrent.futures.Future[TransferResult]) -> None:
        """Post no more chunks of this transfer (its caller gave up); it fails once those posted end."""
        with self._lock:
            flight = self._flight(future)
            if flight is not None:
                flight.failed = flight.failed or "abandoned by its reader (too slow)"

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                # A read refused when posted finishes inside submit: settle it too.
                busy = self._scheduler.busy or bool(self._finished)
                if not busy and self._stopping:
                    return
            if not busy:
                self._wake.wait(1.0)
                continue
            with self._lock:
                progressed = self._executor.poll()
                finished, self._finished = self._finished, []
                settled = []
                for transfer_id, result in finished:
                    settled.append((self._executor.flights.pop(transfer_id), result))
            for flight, result in settled:
                if flight.failed is None:
                    flight.future.set_result(result)
                else:
                    flight.future.set_exception(ReadFailed(flight.failed))
            if not progressed:
                time.sleep(20e-6 if self._executor.in_flight else 0)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)


def _endpoint(span: Span) -> Endpoint:
    return span.device if span.mem == "VRAM" else HOST
