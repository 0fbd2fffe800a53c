"""Per-link transfer scheduler: SLO-aware bandwidth sharing with isolation.

Why it exists: copy engines are FIFO and a chunk copy cannot be pre-empted, so a
1 MiB copy issued behind a 4 GiB copy waits for the whole 4 GiB (measured: 28 us
alone, 17 ms queued). The only lever is to keep few chunks of each link in flight
and choose, every time a slot frees, whose chunk goes next. That choice is made
here, as pure logic over a clock and an executor Protocol, so the same code runs
against the deterministic link model in tests (``linkmodel``) and against CUDA
streams in production (``cuda_executor``).

Policy (FaaSTube mechanism 4), per link:
- a transfer with a latency SLO is guaranteed
  ``rate_least = bytes_on_link / (slo - expected_compute)``;
- the spare bandwidth ``link_bw - sum(rate_least)`` goes to the SLO'd transfer
  with the earliest deadline;
- transfers without an SLO share what is left equally (start-time fair queuing by
  bytes); while SLO'd transfers are active they keep a floor of
  ``best_effort_min_share`` of the link so they never starve.
Shares are enforced with start-time fair queuing over chunks, using the rates as
weights: work-conserving, and a newcomer's first chunk goes out with the next
free slot, so it waits at most ``max_inflight_chunks_per_link`` chunks. Free
slots are filled one chunk per link per pass, so every path of a split transfer
starts within one pass rather than after the first link's whole window.

A transfer whose SLO cannot be met (``rate_least`` above the link bandwidth, or no
time left after compute) still runs, best-effort; its ``Admission`` says so.

Multi-hop paths (relay GPUs) queue on their narrowest link; the other hops are
much faster (NVLink vs PCIe) and the executor orders them. Only the first and
last piece of such a path pay their extra hop unoverlapped (before the narrow
link starts, after it ends), so with ``relay_edge_bytes`` set those two pieces
are cut small while the middle ones keep the full chunk size.

Not thread-safe: one driver (the link model's event loop, the CUDA engine's
thread) calls ``submit`` and the completion callbacks.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, NewType, Protocol, Union

from faastube.errors import InvalidRequest

logger = logging.getLogger(__name__)

LinkId = NewType("LinkId", str)
HOST: Final = "host"
# Another node, reached through this node's NICs (a NIXL read lands straight in the
# destination's memory: one hop, queued on the node's network link).
NET: Final = "net"
Endpoint = Union[int, Literal["host", "net"]]
LinkKind = Literal["pcie", "nvlink", "network"]


class TransferError(InvalidRequest):
    """A transfer request or link table is malformed; fix it before retrying."""


def link_id(src: Endpoint, dst: Endpoint) -> LinkId:
    """The directional link a copy from ``src`` to ``dst`` uses.

    Directional because H2D and D2H use different copy engines (and PCIe is full
    duplex): ``h2d:0``, ``d2h:0``, ``p2p:0->1``.
    """
    if src == NET or dst == NET:
        if src == dst:
            raise TransferError("hop: net -> net is not a link of this node")
        return LinkId("net:in" if src == NET else "net:out")
    if src == HOST and dst == HOST:
        raise TransferError("hop: host -> host is not a device transfer")
    if src == HOST:
        return LinkId(f"h2d:{dst}")
    if dst == HOST:
        return LinkId(f"d2h:{src}")
    if src == dst:
        raise TransferError(f"hop: GPU {src} -> itself is not a link")
    return LinkId(f"p2p:{src}->{dst}")


def _check_endpoint(value: object, path: str) -> Endpoint:
    if value == HOST or value == NET:
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TransferError(f"{path}: expected 'host', 'net' or a GPU index >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Hop:
    """One copy of a chunk from ``src`` to ``dst`` (GPU index or ``"host"``)."""

    src: Endpoint
    dst: Endpoint

    @property
    def link(self) -> LinkId:
        return link_id(self.src, self.dst)


@dataclasses.dataclass(frozen=True)
class RoutePath:
    """One path of a transfer: consecutive hops carrying ``size_bytes`` of it."""

    hops: tuple[Hop, ...]
    size_bytes: int

    @property
    def relays(self) -> tuple[int, ...]:
        return tuple(int(h.dst) for h in self.hops[:-1])


@dataclasses.dataclass(frozen=True)
class Route:
    """All paths of one transfer; path ``i`` carries the bytes after paths ``< i``."""

    paths: tuple[RoutePath, ...]

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in self.paths)

    @property
    def source(self) -> Endpoint:
        return self.paths[0].hops[0].src

    @property
    def destination(self) -> Endpoint:
        return self.paths[0].hops[-1].dst


def make_route(node_paths: Sequence[tuple[Sequence[Endpoint], float]], size_bytes: int, *,
               align_bytes: int = 4096) -> Route:
    """Build a route from node sequences and their bandwidth shares.

    ``node_paths`` is e.g. ``[(("host", 0), 55e9), (("host", 1, 0), 55e9)]``: bytes
    are split in proportion to the shares (aligned to ``align_bytes``; the last
    path takes the remainder). This is the adapter from a planner's output.
    """
    if not node_paths:
        raise TransferError("paths: at least one path is required")
    if size_bytes <= 0:
        raise TransferError(f"size_bytes: must be > 0, got {size_bytes}")
    shares = []
    for i, (_nodes, share) in enumerate(node_paths):
        if not (isinstance(share, (int, float)) and math.isfinite(share) and share > 0):
            raise TransferError(f"paths[{i}].bandwidth: must be a finite number > 0, got {share!r}")
        shares.append(float(share))
    total_share = sum(shares)
    sizes: list[int] = []
    remaining = size_bytes
    for share in shares[:-1]:
        part = int(size_bytes * share / total_share) // align_bytes * align_bytes
        part = min(part, remaining)
        sizes.append(part)
        remaining -= part
    sizes.append(remaining)
    return _build_route([nodes for nodes, _share in node_paths], sizes)


def sized_route(node_paths: Sequence[tuple[Sequence[Endpoint], int]]) -> Route:
    """A route whose paths carry the given byte counts, e.g. ``planner.fit_plan``'s sizes.

    Paths of 0 bytes are left out; at least one must carry bytes.
    """
    if not node_paths:
        raise TransferError("paths: at least one path is required")
    sizes = []
    for i, (_nodes, size) in enumerate(node_paths):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TransferError(f"paths[{i}].size_bytes: must be an integer >= 0, got {size!r}")
        sizes.append(size)
    if sum(sizes) <= 0:
        raise TransferError("size_bytes: must be > 0, got 0")
    return _build_route([nodes for nodes, _size in node_paths], sizes)


def _build_route(node_paths: Sequence[Sequence[Endpoint]], sizes: Sequence[int]) -> Route:
    paths = []
    for i, (nodes, part) in enumerate(zip(node_paths, sizes)):
        if part == 0:
            continue  # too small a share to be worth a chunk
        if len(nodes) < 2:
            raise TransferError(f"paths[{i}]: needs at least a source and a destination")
        checked = [_check_endpoint(n, f"paths[{i}][{j}]") for j, n in enumerate(nodes)]
        hops = tuple(Hop(a, b) for a, b in zip(checked, checked[1:]))
        for j, hop in enumerate(hops):
            try:
                _ = hop.link
            except TransferError as e:
                raise TransferError(f"paths[{i}].hops[{j}]: {e}") from e
        paths.append(RoutePath(hops=hops, size_bytes=part))
    route = Route(paths=tuple(paths))
    _validate_route(route)
    return route


class _PathShareLike(Protocol):
    @property
    def hops(self) -> Sequence[Endpoint]: ...

    @property
    def bandwidth_bytes_per_s(self) -> float: ...


class _PlanLike(Protocol):
    @property
    def paths(self) -> Sequence[_PathShareLike]: ...

    @property
    def sizes_bytes(self) -> Sequence[int]: ...


def route_from_plan(plan: _PlanLike, size_bytes: int, *, align_bytes: int = 4096) -> Route:
    """The route for ``size_bytes`` over a ``planner.Plan``.

    A fitted plan (``planner.fit_plan``) says each path's bytes; any other plan's bytes
    are split in proportion to its paths' bandwidth shares.
    """
    if plan.sizes_bytes and sum(plan.sizes_bytes) == size_bytes:
        return sized_route([(p.hops, n) for p, n in zip(plan.paths, plan.sizes_bytes)])
    return make_route([(p.hops, p.bandwidth_bytes_per_s) for p in plan.paths], size_bytes,
                      align_bytes=align_bytes)


def cut_path(size_bytes: int, chunk_bytes: int, *, edge_bytes: int | None = None) -> list[int]:
    """Piece sizes of one path: ``chunk_bytes`` each, the last one shorter.

    With ``edge_bytes`` (relayed paths) the first and the last piece are ``edge_bytes``
    long when the path is long enough, the middle ones ``chunk_bytes``.
    """
    if edge_bytes is None or edge_bytes >= chunk_bytes or size_bytes <= 2 * edge_bytes:
        return _plain_cut(size_bytes, chunk_bytes)
    return [edge_bytes, *_plain_cut(size_bytes - 2 * edge_bytes, chunk_bytes), edge_bytes]


def _plain_cut(size_bytes: int, chunk_bytes: int) -> list[int]:
    full, rest = divmod(size_bytes, chunk_bytes)
    return [chunk_bytes] * full + ([rest] if rest else [])


def _validate_route(route: Route) -> None:
    if not route.paths:
        raise TransferError("route.paths: at least one path is required")
    src, dst = route.source, route.destination
    for i, p in enumerate(route.paths):
        if not p.hops:
            raise TransferError(f"route.paths[{i}].hops: at least one hop is required")
        if p.size_bytes <= 0:
            raise TransferError(f"route.paths[{i}].size_bytes: must be > 0, got {p.size_bytes}")
        if p.hops[0].src != src or p.hops[-1].dst != dst:
            raise TransferError(f"route.paths[{i}]: goes {p.hops[0].src} -> {p.hops[-1].dst}, "
                                f"the route goes {src} -> {dst}")
        for j, (a, b) in enumerate(zip(p.hops, p.hops[1:])):
            if a.dst != b.src:
                raise TransferError(f"route.paths[{i}].hops[{j + 1}]: starts at {b.src}, "
                                    f"previous hop ends at {a.dst}")
        for j, h in enumerate(p.hops[:-1]):
            if h.dst in (HOST, NET):
                raise TransferError(f"route.paths[{i}].hops[{j}].dst: relays must be GPUs")


def describe_route(route: Route, link_kinds: Mapping[LinkId, LinkKind]) -> str:
    """A short, bounded label of the path kind, for logs and a metric label.

    ``h2d-direct``, ``h2d-multipath[0,1,2,3]`` (the GPUs whose PCIe links carry
    data), ``d2h-direct``, ``d2h-multipath[...]``, ``nvlink-direct``, ``pcie``
    (GPU to GPU over PCIe), ``nvlink-relay[2]``, ``nvlink-multipath[direct,2,3]``.
    """
    src, dst = route.source, route.destination
    if src == NET or dst == NET:
        return "network"
    if src == HOST or dst == HOST:
        prefix = "h2d" if src == HOST else "d2h"
        if len(route.paths) == 1 and len(route.paths[0].hops) == 1:
            return f"{prefix}-direct"
        pcie_gpus = [p.hops[0].dst if src == HOST else p.hops[-1].src for p in route.paths]
        return f"{prefix}-multipath[{','.join(str(g) for g in pcie_gpus)}]"
    kinds = {link_kinds.get(h.link, "pcie") for p in route.paths for h in p.hops}
    prefix = "nvlink" if kinds == {"nvlink"} else "pcie"
    if len(route.paths) == 1:
        relays = route.paths[0].relays
        if not relays:
            return "nvlink-direct" if prefix == "nvlink" else "pcie"
        return f"{prefix}-relay[{','.join(str(r) for r in relays)}]"
    parts = [",".join(str(r) for r in p.relays) or "direct" for p in route.paths]
    return f"{prefix}-multipath[{','.join(parts)}]"


@dataclasses.dataclass(frozen=True)
class FunctionIdentity:
    workflow: str
    function: str

    def __str__(self) -> str:
        return f"{self.workflow}/{self.function}"


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """A directional link: its bandwidth and, optionally, its own chunk size."""

    link: LinkId
    bandwidth_bytes_per_s: float
    kind: LinkKind = "pcie"
    chunk_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    # 4 MiB at ~55 GB/s is ~76 us of copy engine time: a newcomer waits at most
    # max_inflight such chunks, while per-chunk overheads (~2 us) stay < 5%.
    chunk_bytes: int = 4 << 20
    max_inflight_chunks_per_link: int = 4
    best_effort_min_share: float = 0.1
    # First and last piece of a relayed (multi-hop) path; None: cut like any other path.
    relay_edge_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0:
            raise TransferError(f"chunk_bytes: must be > 0, got {self.chunk_bytes}")
        if self.relay_edge_bytes is not None and self.relay_edge_bytes <= 0:
            raise TransferError(f"relay_edge_bytes: must be > 0, got {self.relay_edge_bytes}")
        if self.max_inflight_chunks_per_link < 1:
            raise TransferError("max_inflight_chunks_per_link: must be >= 1, "
                                f"got {self.max_inflight_chunks_per_link}")
        if not 0.0 <= self.best_effort_min_share < 1.0:
            raise TransferError("best_effort_min_share: must be in [0, 1), "
                                f"got {self.best_effort_min_share}")


@dataclasses.dataclass(frozen=True)
class TransferRequest:
    """One transfer: who asks, what route, the SLO, and the buffers' addresses.

    Addresses are raw pointers (host or device) of the whole source and
    destination buffers; the scheduler only passes them on to the executor.
    """

    transfer_id: str
    identity: FunctionIdentity
    route: Route
    slo_s: float | None = None
    expected_compute_s: float | None = None
    src_address: int = 0
    dst_address: int = 0

    @property
    def size_bytes(self) -> int:
        return self.route.size_bytes


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of one path of a transfer, at ``offset_bytes`` in both buffers."""

    transfer_id: str
    seq: int
    path_index: int
    offset_bytes: int
    size_bytes: int
    hops: tuple[Hop, ...]
    src_address: int
    dst_address: int


@dataclasses.dataclass(frozen=True)
class Admission:
    """What the scheduler promised a transfer."""

    transfer_id: str
    path_label: str
    slo_guaranteed: bool
    rate_least_bytes_per_s: float | None
    oversubscribed_links: tuple[LinkId, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    identity: FunctionIdentity
    path_label: str
    size_bytes: int
    submitted_s: float
    first_issue_s: float
    finished_s: float
    deadline_s: float | None
    admission: Admission

    @property
    def duration_s(self) -> float:
        return self.finished_s - self.submitted_s

    @property
    def queueing_delay_s(self) -> float:
        return self.first_issue_s - self.submitted_s

    @property
    def rate_bytes_per_s(self) -> float:
        return self.size_bytes / self.duration_s if self.duration_s > 0 else math.inf

    @property
    def met_deadline(self) -> bool | None:
        return None if self.deadline_s is None else self.finished_s <= self.deadline_s


@dataclasses.dataclass(frozen=True)
class FunctionStats:
    """Totals per function, for metrics (counters and a derived rate)."""

    identity: FunctionIdentity
    transfers_total: int = 0
    bytes_total: int = 0
    queueing_delay_s_total: float = 0.0
    transfer_s_total: float = 0.0
    deadline_misses_total: int = 0

    @property
    def achieved_rate_bytes_per_s(self) -> float:
        return self.bytes_total / self.transfer_s_total if self.transfer_s_total > 0 else 0.0


class Clock(Protocol):
    def now_s(self) -> float: ...


ChunkDone = Callable[[Chunk], None]


class ChunkExecutor(Protocol):
    """Runs chunk copies; calls ``on_done(chunk)`` later, from the driver thread."""

    def issue(self, chunk: Chunk, on_done: ChunkDone) -> None: ...


TransferDone = Callable[[TransferResult], None]


@dataclasses.dataclass(eq=False)
class _Transfer:
    request: TransferRequest
    admission: Admission
    submitted_s: float
    deadline_s: float | None
    window_s: float | None
    on_done: TransferDone | None
    chunks_pending: int = 0
    chunks_issued: int = 0
    first_issue_s: float | None = None
    next_seq: int = 0


@dataclasses.dataclass(eq=False)
class _Flow:
    """A transfer's pieces waiting on one link's queue."""

    transfer: _Transfer
    pieces: collections.deque[tuple[int, int, int]]  # (path_index, offset, size) still to issue
    bytes_on_link: int
    vstart: float = 0.0
    weight: float = 1.0


@dataclasses.dataclass(eq=False)
class _Link:
    spec: LinkSpec
    chunk_bytes: int
    inflight: int = 0
    vtime: float = 0.0
    flows: dict[str, _Flow] = dataclasses.field(default_factory=dict)
    bytes_total: int = 0


class TransferScheduler:
    def __init__(self, links: Sequence[LinkSpec], *, executor: ChunkExecutor, clock: Clock,
                 settings: SchedulerSettings | None = None) -> None:
        self._settings = settings or SchedulerSettings()
        self._executor = executor
        self._clock = clock
        self._links: dict[LinkId, _Link] = {}
        for i, spec in enumerate(links):
            if spec.link in self._links:
                raise TransferError(f"links[{i}].link: duplicate link {spec.link!r}")
            if not (math.isfinite(spec.bandwidth_bytes_per_s) and spec.bandwidth_bytes_per_s > 0):
                raise TransferError(f"links[{i}].bandwidth_bytes_per_s: must be finite and > 0, "
                                    f"got {spec.bandwidth_bytes_per_s}")
            if spec.chunk_bytes is not None and spec.chunk_bytes <= 0:
                raise TransferError(f"links[{i}].chunk_bytes: must be > 0, got {spec.chunk_bytes}")
            self._links[spec.link] = _Link(spec, spec.chunk_bytes or self._settings.chunk_bytes)
        self._kinds: dict[LinkId, LinkKind] = {k: v.spec.kind for k, v in self._links.items()}
        self._queue_links: dict[tuple[Hop, ...], LinkId] = {}  # a node has few distinct paths
        self._transfers: dict[str, _Transfer] = {}
        self._stats: dict[FunctionIdentity, FunctionStats] = {}
        self._pumping = False

    # -- public surface -------------------------------------------------------
    @property
    def settings(self) -> SchedulerSettings:
        return self._settings

    @property
    def busy(self) -> bool:
        return bool(self._transfers)

    def path_label(self, route: Route) -> str:
        return describe_route(route, self._kinds)

    def submit(self, request: TransferRequest, on_done: TransferDone | None = None) -> Admission:
        """Queue a transfer; its chunks go out as link slots free up."""
        self._validate(request)
        now = self._clock.now_s()
        pieces_by_link: dict[LinkId, list[tuple[int, int, int]]] = {}
        offset = 0
        for pi, path in enumerate(request.route.paths):
            qlink = self._queue_link(path)
            edge = self._settings.relay_edge_bytes if len(path.hops) > 1 else None
            off = offset
            for size in cut_path(path.size_bytes, self._links[qlink].chunk_bytes, edge_bytes=edge):
                pieces_by_link.setdefault(qlink, []).append((pi, off, size))
                off += size
            offset += path.size_bytes
        admission, window = self._admit(request, pieces_by_link)
        deadline = None if window is None else now + window
        transfer = _Transfer(request, admission, now, deadline, window, on_done,
                             chunks_pending=sum(len(v) for v in pieces_by_link.values()))
        self._transfers[request.transfer_id] = transfer
        logger.debug("transfer %s of %s: %d bytes path %s slo_guaranteed=%s",
                     request.transfer_id, request.identity, request.size_bytes,
                     admission.path_label, admission.slo_guaranteed)
        for lid, pieces in pieces_by_link.items():
            link = self._links[lid]
            flow = _Flow(transfer, collections.deque(pieces), sum(p[2] for p in pieces))
            flow.vstart = link.vtime
            link.flows[request.transfer_id] = flow
            self._reweight(link)
        self._pump()
        return admission

    def stats(self) -> dict[FunctionIdentity, FunctionStats]:
        return dict(self._stats)

    def link_bytes(self) -> dict[LinkId, int]:
        """Bytes issued per queue link (multi-hop paths count on their narrowest link)."""
        return {k: v.bytes_total for k, v in self._links.items()}

    def weights(self, link: LinkId) -> dict[str, float]:
        """Current share weights (bytes/s) per transfer on ``link``; for tests and debugging."""
        return {tid: f.weight for tid, f in self._links[link].flows.items()}

    # -- admission --------------------------------------------------------------
    def _validate(self, r: TransferRequest) -> None:
        if not r.transfer_id:
            raise TransferError("transfer_id: must not be empty")
        if r.transfer_id in self._transfers:
            raise TransferError(f"transfer_id: {r.transfer_id!r} is already in progress")
        if not r.identity.workflow or not r.identity.function:
            raise TransferError("identity: workflow and function must not be empty")
        _validate_route(r.route)
        for i, p in enumerate(r.route.paths):
            for j, h in enumerate(p.hops):
                if h.link not in self._links:
                    raise TransferError(f"route.paths[{i}].hops[{j}]: unknown link {h.link!r}")
        if r.slo_s is not None and not (math.isfinite(r.slo_s) and r.slo_s > 0):
            raise TransferError(f"slo_s: must be finite and > 0, got {r.slo_s}")
        if r.expected_compute_s is not None and not (
                math.isfinite(r.expected_compute_s) and r.expected_compute_s >= 0):
            raise TransferError(f"expected_compute_s: must be finite and >= 0, "
                                f"got {r.expected_compute_s}")

    def _queue_link(self, path: RoutePath) -> LinkId:
        # The narrowest hop paces the path; the first such hop wins ties.
        qlink = self._queue_links.get(path.hops)
        if qlink is None:
            qlink = self._queue_links[path.hops] = min(
                (h.link for h in path.hops), key=lambda lid: self._links[lid].spec.bandwidth_bytes_per_s)
        return qlink

    def _admit(self, r: TransferRequest, pieces_by_link: Mapping[LinkId, list[tuple[int, int, int]]]
               ) -> tuple[Admission, float | None]:
        label = self.path_label(r.route)
        if r.slo_s is None:
            return Admission(r.transfer_id, label, False, None, (), "no SLO: best effort"), None
        window = r.slo_s - (r.expected_compute_s or 0.0)
        if window <= 0:
            reason = (f"SLO impossible: slo {r.slo_s:.6g}s leaves no time after expected compute "
                      f"{r.expected_compute_s:.6g}s; running best effort")
            logger.warning("transfer %s of %s: %s", r.transfer_id, r.identity, reason)
            return Admission(r.transfer_id, label, False, None, (), reason), None
        rate_least = r.size_bytes / window
        over: list[LinkId] = []
        for lid, pieces in pieces_by_link.items():
            link = self._links[lid]
            need = sum(p[2] for p in pieces) / window
            bw = link.spec.bandwidth_bytes_per_s
            if need > bw:
                reason = (f"SLO impossible: needs {need / 1e9:.3g} GB/s on {lid}, "
                          f"link has {bw / 1e9:.3g} GB/s; running best effort")
                logger.warning("transfer %s of %s: %s", r.transfer_id, r.identity, reason)
                return Admission(r.transfer_id, label, False, rate_least, (), reason), None
            committed = sum(f.bytes_on_link / f.transfer.window_s for f in link.flows.values()
                            if f.transfer.admission.slo_guaranteed and f.transfer.window_s)
            if committed + need > bw:
                over.append(lid)
        reason = "SLO admitted"
        if over:
            reason = (f"SLO admitted but links {', '.join(over)} are oversubscribed: "
                      f"guarantees scale down proportionally")
            logger.warning("transfer %s of %s: %s", r.transfer_id, r.identity, reason)
        return Admission(r.transfer_id, label, True, rate_least, tuple(over), reason), window

    # -- sharing ----------------------------------------------------------------
    def _reweight(self, link: _Link) -> None:
        bw = link.spec.bandwidth_bytes_per_s
        slo = [f for f in link.flows.values()
               if f.transfer.admission.slo_guaranteed and f.transfer.window_s]
        best = [f for f in link.flows.values() if f not in slo]
        be_total = bw * self._settings.best_effort_min_share if slo and best else (bw if best else 0.0)
        least = {id(f): f.bytes_on_link / (f.transfer.window_s or math.inf) for f in slo}
        spare = bw - be_total - sum(least.values())
        tightest = min(slo, key=lambda f: (f.transfer.deadline_s, f.transfer.submitted_s),
                       default=None)
        for f in slo:
            f.weight = least[id(f)] + (spare if f is tightest and spare > 0 else 0.0)
        for f in best:
            f.weight = be_total / len(best)
        for f in link.flows.values():
            f.weight = max(f.weight, bw * 1e-9)  # keep tags finite

    def _pump(self) -> None:
        if self._pumping:
            return  # an executor completed a chunk synchronously; the outer loop continues
        self._pumping = True
        limit = self._settings.max_inflight_chunks_per_link
        try:
            # One chunk per link per pass: a split transfer's paths all start in the first pass.
            # The outer loop looks again at every link, in case an executor completed a chunk
            # (and a callback submitted more) while we issued.
            while ready := [link for link in self._links.values()
                            if link.flows and link.inflight < limit]:
                while ready:
                    for link in ready:
                        self._issue_next(link)
                    ready = [link for link in ready if link.flows and link.inflight < limit]
        finally:
            self._pumping = False

    def _issue_next(self, link: _Link) -> None:
        flow = min(link.flows.values(),
                   key=lambda f: f.vstart + f.pieces[0][2] / f.weight)
        pi, offset, size = flow.pieces.popleft()
        link.vtime = max(link.vtime, flow.vstart)
        flow.vstart += size / flow.weight
        t = flow.transfer
        if not flow.pieces:
            del link.flows[t.request.transfer_id]
            self._reweight(link)
        if t.first_issue_s is None:
            t.first_issue_s = self._clock.now_s()
        req = t.request
        chunk = Chunk(req.transfer_id, t.next_seq, pi, offset, size, req.route.paths[pi].hops,
                      req.src_address, req.dst_address)
        t.next_seq += 1
        link.inflight += 1
        link.bytes_total += size
        self._executor.issue(chunk, self._chunk_done)

    def _chunk_done(self, chunk: Chunk) -> None:
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            logger.error("completion for unknown transfer %s ignored", chunk.transfer_id)
            return
        path = t.request.route.paths[chunk.path_index]
        self._links[self._queue_link(path)].inflight -= 1
        t.chunks_pending -= 1
        if t.chunks_pending == 0:
            self._finish(t)
        self._pump()

    def _finish(self, t: _Transfer) -> None:
        now = self._clock.now_s()
        del self._transfers[t.request.transfer_id]
        result = TransferResult(t.request.transfer_id, t.request.identity, t.admission.path_label,
                                t.request.size_bytes, t.submitted_s,
                                t.first_issue_s if t.first_issue_s is not None else now, now,
                                t.deadline_s, t.admission)
        old = self._stats.get(result.identity, FunctionStats(result.identity))
        self._stats[result.identity] = dataclasses.replace(
            old, transfers_total=old.transfers_total + 1,
            bytes_total=old.bytes_total + result.size_bytes,
            queueing_delay_s_total=old.queueing_delay_s_total + result.queueing_delay_s,
            transfer_s_total=old.transfer_s_total + result.duration_s,
            deadline_misses_total=old.deadline_misses_total + (result.met_deadline is False))
        logger.debug("transfer %s done: %d bytes in %.6fs via %s", result.transfer_id,
                     result.size_bytes, result.duration_s, result.path_label)
        if t.on_done is not None:
            try:
                t.on_done(result)
            except Exception:  # a caller's callback must not break the scheduler
                logger.exception("on_done callback of transfer %s failed", result.transfer_id)
