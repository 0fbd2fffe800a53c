"""A deterministic discrete-event model of copy links, for testing the scheduler.

Each directional link is one FIFO copy engine: a chunk occupies it for
``chunk_latency_s + size / bandwidth`` and chunks are served strictly in arrival
order, like a GPU copy engine (streams do not reorder work on one engine). A
multi-hop chunk is store-and-forward: it joins the next hop's queue when the
previous hop finishes, as the CUDA executor orders relay hops with events.
``issue_delay_s`` models the host's reaction time between a completion and the
scheduler's next issue.

The model implements the scheduler's ``ChunkExecutor`` and ``Clock``; time only
moves inside ``run``, so results are exact and repeatable.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Mapping

from faastube_sidecar.transfers.scheduler import Chunk, ChunkDone, LinkId, TransferError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LinkParams:
    bandwidth_bytes_per_s: float
    chunk_latency_s: float = 2e-6

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_bytes_per_s) and self.bandwidth_bytes_per_s > 0):
            raise TransferError(f"bandwidth_bytes_per_s: must be finite and > 0, "
                                f"got {self.bandwidth_bytes_per_s}")
        if not (math.isfinite(self.chunk_latency_s) and self.chunk_latency_s >= 0):
            raise TransferError(f"chunk_latency_s: must be finite and >= 0, got {self.chunk_latency_s}")


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """When a chunk finished its last hop; tests integrate these into rates."""

    finished_s: float
    transfer_id: str
    size_bytes: int


class LinkModel:
    def __init__(self, links: Mapping[LinkId, LinkParams], *, issue_delay_s: float = 0.0) -> None:
        if issue_delay_s < 0:
            raise TransferError(f"issue_delay_s: must be >= 0, got {issue_delay_s}")
        self._links = dict(links)
        self._issue_delay_s = issue_delay_s
        self._now_s = 0.0
        self._busy_until_s: dict[LinkId, float] = {k: 0.0 for k in self._links}
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.records: list[ChunkRecord] = []
        self.busy_s: dict[LinkId, float] = {k: 0.0 for k in self._links}

    # Clock
    def now_s(self) -> float:
        return self._now_s

    def at(self, time_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at model time ``time_s`` (not before now)."""
        heapq.heappush(self._events, (max(time_s, self._now_s), next(self._seq), fn))

    # ChunkExecutor
    def issue(self, chunk: Chunk, on_done: ChunkDone) -> None:
        for h in chunk.hops:
            if h.link not in self._links:
                raise TransferError(f"chunk {chunk.transfer_id}#{chunk.seq}: link {h.link!r} "
                                    f"is not in the model")
        self.at(self._now_s + self._issue_delay_s, lambda: self._arrive(chunk, 0, on_done))

    def _arrive(self, chunk: Chunk, hop: int, on_done: ChunkDone) -> None:
        lid = chunk.hops[hop].link
        params = self._links[lid]
        start = max(self._now_s, self._busy_until_s[lid])
        service = params.chunk_latency_s + chunk.size_bytes / params.bandwidth_bytes_per_s
        end = start + service
        self._busy_until_s[lid] = end
        self.busy_s[lid] += service
        if hop + 1 < len(chunk.hops):
            self.at(end, lambda: self._arrive(chunk, hop + 1, on_done))
        else:
            self.at(end, lambda: self._complete(chunk, on_done))

    def _complete(self, chunk: Chunk, on_done: ChunkDone) -> None:
        self.records.append(ChunkRecord(self._now_s, chunk.transfer_id, chunk.size_bytes))
        on_done(chunk)

    def run(self, until_s: float = math.inf) -> None:
        """Process events in time order until none is left (or ``until_s``)."""
        while self._events and self._events[0][0] <= until_s:
            time_s, _, fn = heapq.heappop(self._events)
            self._now_s = time_s
            fn()
        if math.isfinite(until_s):
            self._now_s = max(self._now_s, until_s)

    def bytes_done(self, transfer_id: str, *, by_s: float) -> int:
        return sum(r.size_bytes for r in self.records
                   if r.transfer_id == transfer_id and r.finished_s <= by_s)
