"""Contention-aware path selection: which parallel paths one transfer uses, at what rate.

Why: one link is rarely the fastest way. On a DGX-1 V100, 12 of 28 GPU pairs have no
NVLink and their PCIe path gives ~8 GB/s, while relaying through a common NVLink
neighbour gives 24-48 GB/s per path; from the host, each extra GPU's PCIe link adds a
whole link's bandwidth if the data is then forwarded over NVLink (FaaSTube mechanisms
2 and 3). Planning is pure and runs once per transfer, so it must be cheap: every
candidate path of a topology is enumerated once into a :class:`PathCatalog` (cached on
the topology object) and a plan is a single pass over a short list.

The resource model. A plan charges bandwidth to *directed* resources (``LinkKey``):

- ``(a, b)``: the NVLink (or PCIe peer-to-peer) link from GPU ``a`` to GPU ``b``;
- ``("host", g)`` / ``(g, "host")``: GPU ``g``'s own PCIe link, host-to-device / device-to-host
  (also used by PCIe peer-to-peer copies, which cross the same lanes);
- ``("host", "pcie:<switch>")`` / ``("pcie:<switch>", "host")``: a PCIe switch's uplink, shared
  by the GPUs behind it (capacity: the widest of their links);
- ``(g, "nvlink")`` / ``("nvlink", g)``: GPU ``g``'s whole NVLink port, only where the topology
  sets ``nvlink_bandwidth_bytes_per_s`` (NVSwitch systems, where every pair link reports the
  full port bandwidth but all peers share it).

The algorithm (the paper's, plus what a pure function can do about incumbents):

1. Idle paths. Walk the candidate paths in order (fewest hops, then highest static
   bottleneck bandwidth). Take a path only if none of its resources is used by other
   transfers (``usage``); give it the narrowest residual capacity on it and subtract that
   from each of its resources. Stop when the source's egress or the destination's ingress
   is used up, or after ``max_paths`` paths.
2. Busy paths. If bandwidth remains, walk the paths again and take those that share links
   with incumbents, at the capacity the incumbents leave (incumbents keep their rates).
3. Contended fallback. If nothing at all is left, the transfer still needs a path: take the
   first candidate at an equal share of each link, ``capacity / (flows + 1)``, and mark the
   plan ``contended`` (incumbents must then yield some rate: the scheduler's job).
4. Rebalancing (``plan_with_rebalance``, which knows the incumbents' plans). Before settling
   for a contended plan, each incumbent that occupies the new transfer's shortest path is
   re-planned with that path reserved for the newcomer; if the incumbent still gets an
   uncontended plan elsewhere it is moved (the paper: "the incumbent is moved if it has
   another path"), and the newcomer is planned again. An incumbent without an alternative
   keeps its paths.

Costs (``CostModel``, ``fit_plan``). Bandwidth alone would split every transfer, yet a
split one pays fixed costs a single copy does not: the scheduler's bookkeeping and the
waiter's wake-up once, each further path's first issue, and on a relayed path one more
copy's latency plus the hop that cannot overlap (the last piece's forward hop into the
target, or the first piece's hop out of the source). ``fit_plan`` keeps the prefix of a
plan's paths that finishes soonest under those costs and gives each path the bytes that
make all paths finish together; small transfers so get the single direct link, which the
executor runs as one plain ``cudaMemcpyAsync``.

GPU-to-GPU candidates are the direct link and relay paths over NVLink (up to
``MAX_HOPS`` hops); PCIe is used only for pairs with no NVLink route at all (peer-to-peer
when the link allows it, else staged through host memory). Host-to-GPU candidates are the
target's own PCIe link plus ``host -> relay -> target`` for each NVLink neighbour of the
target that is *not* behind the target's PCIe switch (such a relay shares the switch
uplink and adds nothing); GPU-to-host is the mirror image.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import ItemsView, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from faastube.errors import InvalidRequest
from faastube_spec.topology import NodeTopology

logger = logging.getLogger(__name__)

HOST: Final = "host"
NVLINK_PORT: Final = "nvlink"
MAX_HOPS: Final = 3  # a GPU-to-GPU path uses at most two relay GPUs
DEFAULT_MAX_PATHS: Final = 8
_EPS_BYTES_PER_S: Final = 1.0  # below one byte per second a residual counts as used up

Endpoint = int | Literal["host"]
Vertex = int | str  # a GPU index, "host", "nvlink" or "pcie:<switch>"
LinkKey = tuple[Vertex, Vertex]
_CATALOG_ATTR: Final = "_faastube_path_catalog"


class PlanError(InvalidRequest):
    """A planning request names endpoints the topology does not have, or is malformed."""


@dataclass(frozen=True)
class PathShare:
    """One path of a plan and the bandwidth it was given."""

    hops: tuple[Endpoint, ...]  # e.g. ("host", 1, 0): host -> GPU 1 (PCIe) -> GPU 0 (NVLink)
    bandwidth_bytes_per_s: float
    bottleneck: LinkKey  # the resource that limited this path's share
    links: tuple[LinkKey, ...]  # every resource the path charges (what LinkUsage adds up)


@dataclass(frozen=True)
class Plan:
    paths: tuple[PathShare, ...]
    total_bandwidth_bytes_per_s: float
    contended: bool = False  # True: phase 3 took an equal share from incumbents
    # Set by fit_plan: each path's bytes (they sum to the transfer's size) and the
    # cost model's estimate of the whole transfer, seconds from submit to done.
    sizes_bytes: tuple[int, ...] = ()
    expected_s: float | None = None

    @property
    def direct(self) -> bool:
        """One path over one link: a single plain copy does it."""
        return len(self.paths) == 1 and len(self.paths[0].hops) == 2


class LinkUsage(Mapping[LinkKey, float]):
    """Immutable map of directed resource -> bytes/s in use by admitted plans.

    It also counts the plans (flows) on each resource, for the equal-share fallback.
    """

    __slots__ = ("_flows", "_rate")

    def __init__(self, rates: Mapping[LinkKey, float] | None = None,
                 flows: Mapping[LinkKey, int] | None = None) -> None:
        self._rate: dict[LinkKey, float] = {}
        for key, value in (rates or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise PlanError(f"usage[{key!r}]: must be a finite rate >= 0 bytes/s, "
                                f"got {value!r}")
            if value > 0:
                self._rate[key] = float(value)
        self._flows: dict[LinkKey, int] = {k: v for k, v in (flows or {}).items() if v > 0}

    def __getitem__(self, key: LinkKey) -> float:
        return self._rate[key]

    def __iter__(self) -> Iterator[LinkKey]:
        return iter(self._rate)

    def __len__(self) -> int:
        return len(self._rate)

    # Mapping's defaults go through __getitem__ and KeyError: far slower on the planning path.
    def __contains__(self, key: object) -> bool:
        return key in self._rate

    def get(self, key: LinkKey, default: float = 0.0) -> float:  # type: ignore[override]
        return self._rate.get(key, default)

    def items(self) -> ItemsView[LinkKey, float]:
        return self._rate.items()

    def __repr__(self) -> str:
        return f"LinkUsage({self._rate!r})"

    def flows(self, key: LinkKey) -> int:
        """How many admitted plans use ``key`` (1 for a rate set directly)."""
        return self._flows.get(key, 1 if key in self._rate else 0)

    def with_plan(self, plan: Plan) -> LinkUsage:
        return self._combined(plan, +1)

    def without_plan(self, plan: Plan) -> LinkUsage:
        """The usage after ``plan`` finished (rates never go below zero)."""
        return self._combined(plan, -1)

    def _combined(self, plan: Plan, sign: int) -> LinkUsage:
        rates = dict(self._rate)
        flows = dict(self._flows)
        touched: set[LinkKey] = set()
        for path in plan.paths:
            for key in path.links:
                rates[key] = max(0.0, rates.get(key, 0.0) + sign * path.bandwidth_bytes_per_s)
                touched.add(key)
        for key in touched:
            flows[key] = max(0, flows.get(key, 1 if key in self._rate else 0) + sign)
        return LinkUsage(rates, flows)


EMPTY_USAGE: Final = LinkUsage()


@dataclass(frozen=True)
class CandidatePath:
    hops: tuple[Endpoint, ...]
    keys: tuple[LinkKey, ...]  # resources, in hop order
    ids: tuple[int, ...]  # the same resources as indices into the catalog's capacities
    first_ids: tuple[int, ...]  # resources of the first hop (the source's egress)
    last_ids: tuple[int, ...]  # resources of the last hop (the destination's ingress)
    static_bottleneck_bytes_per_s: float


@dataclass(frozen=True)
class _Route:
    candidates: tuple[CandidatePath, ...]
    egress_groups: tuple[tuple[int, ...], ...]
    ingress_groups: tuple[tuple[int, ...], ...]
    skipped_relays: tuple[int, ...]


class PathCatalog:
    """Every candidate path between every pair of endpoints of one node, built once."""

    def __init__(self, topology: NodeTopology, *, max_hops: int = MAX_HOPS) -> None:
        if max_hops < 1:
            raise PlanError(f"max_hops: must be >= 1, got {max_hops}")
        self.topology = topology
        self._index: dict[LinkKey, int] = {}
        self._capacities: list[float] = []
        self._hop_keys: dict[tuple[Endpoint, Endpoint], tuple[LinkKey, ...]] = {}
        self._add_resources(topology)
        self._routes: dict[tuple[Endpoint, Endpoint], _Route] = {}
        gpus = topology.gpu_indices
        for s in gpus:
            self._routes[(HOST, s)] = self._host_route(s, to_gpu=True)
            self._routes[(s, HOST)] = self._host_route(s, to_gpu=False)
            for d in gpus:
                if s != d:
                    self._routes[(s, d)] = self._gpu_route(s, d, max_hops)

    @classmethod
    def for_topology(cls, topology: NodeTopology) -> PathCatalog:
        """The catalog cached on ``topology`` (built on first use)."""
        cached = topology.__dict__.get(_CATALOG_ATTR)
        if isinstance(cached, PathCatalog):
            return cached
        catalog = cls(topology)
        # The topology is a frozen value; the catalog is derived data, never compared.
        object.__setattr__(topology, _CATALOG_ATTR, catalog)
        return catalog

    # -- resources ------------------------------------------------------------------

    def capacity_bytes_per_s(self, key: LinkKey) -> float:
        return self._capacities[self._index[key]]

    @property
    def capacities(self) -> Mapping[LinkKey, float]:
        return {k: self._capacities[i] for k, i in self._index.items()}

    def _resource(self, key: LinkKey, capacity_bytes_per_s: float) -> None:
        if key not in self._index:
            self._index[key] = len(self._capacities)
            self._capacities.append(capacity_bytes_per_s)

    def _add_resources(self, t: NodeTopology) -> None:
        switches: dict[str, float] = {}
        members: dict[str, int] = {}
        for g in t.gpus:
            self._resource((HOST, g.index), g.pcie_bandwidth_bytes_per_s)
            self._resource((g.index, HOST), g.pcie_bandwidth_bytes_per_s)
            if g.pcie_switch is not None:
                switches[g.pcie_switch] = max(switches.get(g.pcie_switch, 0.0),
                                              g.pcie_bandwidth_bytes_per_s)
                members[g.pcie_switch] = members.get(g.pcie_switch, 0) + 1
            if g.nvlink_bandwidth_bytes_per_s is not None:
                self._resource((g.index, NVLINK_PORT), g.nvlink_bandwidth_bytes_per_s)
                self._resource((NVLINK_PORT, g.index), g.nvlink_bandwidth_bytes_per_s)
        for name, capacity in switches.items():
            if members[name] > 1:  # a switch with one GPU adds no shared constraint
                self._resource((HOST, f"pcie:{name}"), capacity)
                self._resource((f"pcie:{name}", HOST), capacity)
        for link in t.links:  # also PCIe pairs without P2P: their entry caps the staged copy
            self._resource((link.a, link.b), link.bandwidth_bytes_per_s)
            self._resource((link.b, link.a), link.bandwidth_bytes_per_s)

    def _uplink(self, gpu: int, *, down: bool) -> tuple[LinkKey, ...]:
        switch = self.topology.gpu(gpu).pcie_switch
        if switch is None:
            return ()
        key: LinkKey = (HOST, f"pcie:{switch}") if down else (f"pcie:{switch}", HOST)
        return (key,) if key in self._index else ()

    def hop_keys(self, u: Endpoint, v: Endpoint) -> tuple[LinkKey, ...]:
        """The resources one hop ``u -> v`` charges."""
        cached = self._hop_keys.get((u, v))
        if cached is not None:
            return cached
        t = self.topology
        keys: tuple[LinkKey, ...]
        if u == HOST and isinstance(v, int):
            keys = ((HOST, v),) + self._uplink(v, down=True)
        elif v == HOST and isinstance(u, int):
            keys = ((u, HOST),) + self._uplink(u, down=False)
        elif isinstance(u, int) and isinstance(v, int):
            link = t.link(u, v)
            if link is None or not (link.kind == "nvlink" or link.p2p):
                raise PlanError(f"hop {u} -> {v}: no NVLink or peer-to-peer link")
            keys = ((u, v),)
            if link.kind == "nvlink":
                keys += tuple(k for k in ((u, NVLINK_PORT), (NVLINK_PORT, v)) if k in self._index)
            else:  # PCIe peer-to-peer crosses both GPUs' lanes, and the uplinks unless switch-local
                keys += ((u, HOST), (HOST, v))
                if link.pcie_relation != "same-switch":
                    keys += self._uplink(u, down=False) + self._uplink(v, down=True)
        else:
            raise PlanError(f"hop {u!r} -> {v!r}: not a device transfer")
        self._hop_keys[(u, v)] = keys
        return keys

    # -- candidate paths --------------------------------------------------------------

    def _candidate(self, hops: tuple[Endpoint, ...]) -> CandidatePath:
        per_hop = [self.hop_keys(u, v) for u, v in itertools.pairwise(hops)]
        src, dst = hops[0], hops[-1]
        if len(hops) == 3 and hops[1] == HOST and isinstance(src, int) and isinstance(dst, int) \
                and (src, dst) in self._index:
            # Staged through host memory: the pair's measured bandwidth (e.g. cross-socket)
            # caps it, on top of both GPUs' own PCIe links.
            per_hop[-1] = per_hop[-1] + ((src, dst),)
        keys = tuple(k for hk in per_hop for k in hk)
        ids = tuple(self._index[k] for k in keys)
        return CandidatePath(
            hops=hops, keys=keys, ids=ids,
            first_ids=tuple(self._index[k] for k in per_hop[0]),
            last_ids=tuple(self._index[k] for k in per_hop[-1]),
            static_bottleneck_bytes_per_s=min(self._capacities[i] for i in ids))

    def _route(self, candidates: list[CandidatePath], skipped: tuple[int, ...] = ()) -> _Route:
        candidates.sort(key=lambda c: (len(c.hops), -c.static_bottleneck_bytes_per_s,
                                       tuple(str(h) for h in c.hops)))
        return _Route(
            candidates=tuple(candidates),
            egress_groups=tuple(dict.fromkeys(c.first_ids for c in candidates)),
            ingress_groups=tuple(dict.fromkeys(c.last_ids for c in candidates)),
            skipped_relays=skipped)

    def _gpu_route(self, src: int, dst: int, max_hops: int) -> _Route:
        t = self.topology
        found: list[tuple[Endpoint, ...]] = []

        def walk(path: tuple[int, ...]) -> None:
            for peer in t.nvlink_peers(path[-1]):
                if peer == dst:
                    found.append(path + (peer,))
                elif peer not in path and len(path) < max_hops:
                    walk(path + (peer,))

        walk((src,))
        if not found:  # no NVLink route at all: PCIe, peer-to-peer if allowed
            link = t.link(src, dst)
            found.append((src, dst) if link is not None and link.p2p else (src, HOST, dst))
        return self._route([self._candidate(h) for h in found])

    def _host_route(self, gpu: int, *, to_gpu: bool) -> _Route:
        t = self.topology
        switch = t.gpu(gpu).pcie_switch
        hops_list: list[tuple[Endpoint, ...]] = [(HOST, gpu) if to_gpu else (gpu, HOST)]
        skipped: list[int] = []
        for relay in t.nvlink_peers(gpu):
            if switch is not None and t.gpu(relay).pcie_switch == switch:
                skipped.append(relay)  # shares the target's switch uplink: no extra bandwidth
                continue
            hops_list.append((HOST, relay, gpu) if to_gpu else (gpu, relay, HOST))
        return self._route([self._candidate(h) for h in hops_list], tuple(skipped))

    def _lookup(self, src: Endpoint, dst: Endpoint) -> _Route:
        for name, ep in (("src", src), ("dst", dst)):
            if ep == HOST:
                continue
            if isinstance(ep, bool) or not isinstance(ep, int):
                raise PlanError(f"{name}: expected a GPU index or 'host', got {ep!r}")
            if not self.topology.has_gpu(ep):
                raise PlanError(f"{name}: node {self.topology.name!r} has no GPU {ep} "
                                f"(GPUs: {list(self.topology.gpu_indices)})")
        if src == dst:
            raise PlanError(f"dst: same endpoint as src ({src!r}); nothing to transfer")
        return self._routes[(src, dst)]

    def candidates(self, src: Endpoint, dst: Endpoint) -> tuple[CandidatePath, ...]:
        """Candidate paths from ``src`` to ``dst`` in planning order."""
        return self._lookup(src, dst).candidates

    def skipped_relays(self, src: Endpoint, dst: Endpoint) -> tuple[int, ...]:
        """NVLink neighbours left out of a host transfer because they share its PCIe switch."""
        return self._lookup(src, dst).skipped_relays


def _exhausted(groups: tuple[tuple[int, ...], ...], residual: list[float]) -> bool:
    """True when every group (one hop's resources) has some resource used up."""
    for ids in groups:
        for i in ids:
            if residual[i] <= _EPS_BYTES_PER_S:
                break
        else:
            return False
    return True


def plan_paths(topology: NodeTopology, src: Endpoint, dst: Endpoint, *,
               usage: LinkUsage = EMPTY_USAGE, max_paths: int = DEFAULT_MAX_PATHS,
               catalog: PathCatalog | None = None) -> Plan:
    """Choose parallel paths for one transfer ``src -> dst`` given the links in use."""
    if isinstance(max_paths, bool) or not isinstance(max_paths, int) or max_paths < 1:
        raise PlanError(f"max_paths: must be an integer >= 1, got {max_paths!r}")
    cat = catalog if catalog is not None else PathCatalog.for_topology(topology)
    route = cat._lookup(src, dst)
    residual = list(cat._capacities)
    busy: set[int] = set()
    for key, used in usage.items():
        i = cat._index.get(key)
        if i is not None:
            residual[i] -= used
            busy.add(i)

    chosen: dict[int, PathShare] = {}  # candidate position -> its share
    done = False
    for phase_busy in (False, True):
        for pos, cand in enumerate(route.candidates):
            if pos in chosen:
                continue
            if not phase_busy and busy and not busy.isdisjoint(cand.ids):
                continue
            left = [residual[i] for i in cand.ids]
            share = min(left)
            if share <= _EPS_BYTES_PER_S:
                continue
            for i in cand.ids:
                residual[i] -= share
            chosen[pos] = PathShare(hops=cand.hops, bandwidth_bytes_per_s=share,
                                    bottleneck=cand.keys[left.index(share)], links=cand.keys)
            if len(chosen) >= max_paths or _exhausted(route.egress_groups, residual) \
                    or _exhausted(route.ingress_groups, residual):
                done = True
                break
        if done or not busy:
            break

    if not chosen:
        return _contended_plan(cat, route.candidates[0], usage)
    paths = tuple(chosen[pos] for pos in sorted(chosen))
    return Plan(paths=paths, total_bandwidth_bytes_per_s=sum(p.bandwidth_bytes_per_s for p in paths))


def _contended_plan(cat: PathCatalog, cand: CandidatePath, usage: LinkUsage) -> Plan:
    fair = [cat._capacities[i] / (usage.flows(k) + 1) for k, i in zip(cand.keys, cand.ids)]
    narrowest = min(range(len(fair)), key=fair.__getitem__)
    share = fair[narrowest]
    logger.debug("every path %s is saturated; taking an equal share %.3g B/s", cand.hops, share)
    path = PathShare(hops=cand.hops, bandwidth_bytes_per_s=share,
                     bottleneck=cand.keys[narrowest], links=cand.keys)
    return Plan(paths=(path,), total_bandwidth_bytes_per_s=share, contended=True)


def split_bytes(plan: Plan, nbytes: int, *, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """Cut ``nbytes`` into ``(path index, offset, length)`` chunks in bandwidth proportion.

    Each round gives every path one chunk, sized ``chunk_bytes * bw / max_bw``, so the
    fastest path carries full chunks and all paths finish together; offsets are
    consecutive, so the chunks tile ``[0, nbytes)`` exactly.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise PlanError(f"nbytes: must be an integer >= 0, got {nbytes!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise PlanError(f"chunk_bytes: must be an integer >= 1, got {chunk_bytes!r}")
    usable = [(i, p.bandwidth_bytes_per_s) for i, p in enumerate(plan.paths)
              if p.bandwidth_bytes_per_s > 0 and math.isfinite(p.bandwidth_bytes_per_s)]
    if not usable:
        raise PlanError("plan: has no path with a positive finite bandwidth")
    fastest = max(bw for _i, bw in usable)
    sizes = [(i, max(1, round(chunk_bytes * bw / fastest))) for i, bw in usable]
    round_bytes = sum(size for _i, size in sizes)
    chunks: list[tuple[int, int, int]] = []
    offset = 0
    for _round in range(nbytes // round_bytes):
        for i, size in sizes:
            chunks.append((i, offset, size))
            offset += size
    # The last, partial round keeps the same proportions; the last path takes the remainder.
    tail = nbytes - offset
    for n, (i, size) in enumerate(sizes):
        length = tail * size // round_bytes if n < len(sizes) - 1 else nbytes - offset
        if length > 0:
            chunks.append((i, offset, length))
            offset += length
    return chunks


@dataclass(frozen=True)
class CostModel:
    """What a copy costs beyond its bytes, so that a transfer is split only where that pays.

    A transfer over one direct link runs as one ``cudaMemcpyAsync`` issued by the caller:
    ``copy_latency_s + n / b``. A split one goes through the scheduler, which costs
    ``engine_overhead_s`` once, and path ``i`` (0-based, in plan order) starts delivering at
    its rate ``L_i`` after the submit:

        L_i = copy_latency_s + i * path_issue_s
              + per hop other than the path's narrowest: hop_latency_s + relay_edge_bytes / hop_bw

    (the relay's edge piece: the first piece's hop before the narrow link starts, or the last
    piece's hop after it ends). With every path finishing at the same time ``T``, path ``i``
    carries ``b_i * (T - L_i)`` bytes, so ``T = (n + sum b_i L_i) / sum b_i``.

    The defaults are for the CUDA engine driven from Python on an H100/H200-class box
    (pinned PCIe Gen5 ~53-55 GB/s, NVLink ~380 GB/s per pair); each says where it comes
    from. ``faastube bench transfers`` measures them on the box (its calibration section).
    """

    # One pinned cudaMemcpyAsync beyond its bytes, submit to wait() returning: 1 MiB took
    # ~28 us at ~53 GB/s (20 us of bytes), 64 KiB ~14 us.
    copy_latency_s: float = 10e-6
    # A scheduled (split) transfer, once: the request and the scheduler's bookkeeping before
    # its first chunk goes out (~60 us of Python on a 2-core test VM), then completion found
    # by the engine thread's poll and handed to the waiting thread.
    engine_overhead_s: float = 100e-6
    # Issuing one more path's first piece from Python: the scheduler's pick, a device switch,
    # two copies and an event (10-13 us apart on the test VM without CUDA, plus the calls).
    path_issue_s: float = 20e-6
    # One more copy on a relayed path: both hops run on one lane stream, so the gap between
    # them is the second copy's launch on the GPU.
    hop_latency_s: float = 5e-6
    # The first and last piece of a relayed path (the scheduler's relay_edge_bytes): its
    # unoverlapped NVLink hop costs 2 MiB / 380 GB/s = 5.5 us.
    relay_edge_bytes: int = 2 << 20
    # Split only when the estimate beats the direct copy by this factor: the estimate
    # assumes every link at its nominal rate, and the host side of a box often caps the
    # sum (4x H200: 169.5 GB/s for four 55 GB/s links); being wrong near the crossover
    # must not make a transfer slower than one link.
    min_speedup: float = 1.25
    align_bytes: int = 4096

    def __post_init__(self) -> None:
        for name in ("copy_latency_s", "engine_overhead_s", "path_issue_s", "hop_latency_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(f"{name}: must be finite and >= 0, got {value!r}")
        if not (math.isfinite(self.min_speedup) and self.min_speedup >= 1.0):
            raise PlanError(f"min_speedup: must be finite and >= 1, got {self.min_speedup!r}")
        for name in ("relay_edge_bytes", "align_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name}: must be an integer >= 1, got {value!r}")


DEFAULT_COST: Final = CostModel()


def path_latencies_s(plan: Plan, *, catalog: PathCatalog,
                     cost: CostModel = DEFAULT_COST) -> tuple[float, ...]:
    """``L_i`` of every path of ``plan``: when it starts delivering at its rate (``CostModel``)."""
    out = []
    for position, path in enumerate(plan.paths):
        latency = cost.copy_latency_s + position * cost.path_issue_s
        caps = [min(catalog.capacity_bytes_per_s(k) for k in catalog.hop_keys(u, v))
                for u, v in itertools.pairwise(path.hops)]
        narrow = caps.index(min(caps))
        for j, cap in enumerate(caps):
            if j != narrow:
                latency += cost.hop_latency_s + cost.relay_edge_bytes / cap
        out.append(latency)
    return tuple(out)


def fit_plan(plan: Plan, nbytes: int, *, catalog: PathCatalog,
             cost: CostModel = DEFAULT_COST) -> Plan:
    """The prefix of ``plan``'s paths that moves ``nbytes`` soonest, and each path's bytes.

    Paths are taken in plan order (the direct link first, then relays), as long as each
    added path still carries bytes (``T > L_i``). A direct single-link plan costs no engine
    overhead; a split must beat it by ``cost.min_speedup``. Sizes are aligned to
    ``cost.align_bytes``; the first path takes the rounding remainder.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise PlanError(f"nbytes: must be an integer >= 1, got {nbytes!r}")
    if not plan.paths:
        raise PlanError("plan: has no path")
    latencies = path_latencies_s(plan, catalog=catalog, cost=cost)
    bws = [p.bandwidth_bytes_per_s for p in plan.paths]
    first_direct = len(plan.paths[0].hops) == 2
    best: tuple[float, int, float] | None = None  # (total time, paths, time of the paths alone)
    direct: tuple[float, int, float] | None = None
    total_bw = weighted = 0.0
    for k in range(1, len(plan.paths) + 1):
        total_bw += bws[k - 1]
        weighted += bws[k - 1] * latencies[k - 1]
        t_paths = (nbytes + weighted) / total_bw
        if t_paths <= latencies[k - 1]:
            break  # this path (and every later, later-starting one) would carry nothing
        if k == 1 and first_direct:
            direct = (t_paths, 1, t_paths)
            continue
        total = cost.engine_overhead_s + t_paths
        if best is None or total < best[0]:
            best = (total, k, t_paths)
    if direct is not None and (best is None or best[0] * cost.min_speedup > direct[0]):
        best = direct
    if best is None:  # not even the first path carries bytes: impossible with latencies >= 0
        best = (cost.engine_overhead_s + latencies[0] + nbytes / bws[0], 1, latencies[0] + nbytes / bws[0])
    total, k, t_paths = best
    sizes = _sizes(nbytes, bws[:k], latencies[:k], t_paths, cost.align_bytes)
    paths = tuple(p for p, n in zip(plan.paths[:k], sizes) if n > 0)
    return Plan(paths=paths, total_bandwidth_bytes_per_s=sum(p.bandwidth_bytes_per_s for p in paths),
                contended=plan.contended, sizes_bytes=tuple(n for n in sizes if n > 0),
                expected_s=total)


def _sizes(nbytes: int, bws: list[float], latencies: tuple[float, ...], t_paths: float,
           align: int) -> list[int]:
    ideal = [max(0.0, b * (t_paths - lat)) for b, lat in zip(bws, latencies)]
    scale = nbytes / sum(ideal) if sum(ideal) > 0 else 0.0
    sizes = [int(x * scale) // align * align for x in ideal]
    sizes[0] += nbytes - sum(sizes)
    return sizes


def plan_transfer(topology: NodeTopology, src: Endpoint, dst: Endpoint, nbytes: int, *,
                  usage: LinkUsage = EMPTY_USAGE, max_paths: int = DEFAULT_MAX_PATHS,
                  cost: CostModel = DEFAULT_COST, catalog: PathCatalog | None = None) -> Plan:
    """``plan_paths`` then ``fit_plan``: the paths and bytes for one transfer of ``nbytes``."""
    cat = catalog if catalog is not None else PathCatalog.for_topology(topology)
    plan = plan_paths(topology, src, dst, usage=usage, max_paths=max_paths, catalog=cat)
    return fit_plan(plan, nbytes, catalog=cat, cost=cost)


def split_threshold_bytes(plan: Plan, *, catalog: PathCatalog,
                          cost: CostModel = DEFAULT_COST) -> int | None:
    """The smallest size that ``fit_plan`` splits over more than ``plan``'s direct path.

    ``None`` when it never does (a single path, or a plan without a direct first path,
    which always goes through the engine). The choice is monotonic in size (a split
    has the larger fixed cost and the smaller cost per byte), so a bisection finds it.
    """
    if len(plan.paths) < 2 or len(plan.paths[0].hops) != 2:
        return None
    hi = 1 << 50
    if fit_plan(plan, hi, catalog=catalog, cost=cost).direct:
        return None
    lo = 1  # direct at lo, split at hi
    if not fit_plan(plan, lo, catalog=catalog, cost=cost).direct:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fit_plan(plan, mid, catalog=catalog, cost=cost).direct:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class Rebalanced:
    """A newcomer's plan and the incumbents that were moved to make room for it."""

    plan: Plan
    moved: Mapping[str, Plan]  # transfer id -> its new plan (others keep theirs)


def plan_with_rebalance(topology: NodeTopology, src: Endpoint, dst: Endpoint, *,
                        incumbents: Mapping[str, Plan],
                        max_paths: int = DEFAULT_MAX_PATHS) -> Rebalanced:
    """Plan ``src -> dst`` among ``incumbents``, moving incumbents off its shortest path if needed."""
    usage = EMPTY_USAGE
    for inc in incumbents.values():
        usage = usage.with_plan(inc)
    plan = plan_paths(topology, src, dst, usage=usage, max_paths=max_paths)
    if not plan.contended:
        return Rebalanced(plan=plan, moved={})
    cat = PathCatalog.for_topology(topology)
    wanted = cat.candidates(src, dst)[0]
    wanted_keys = set(wanted.keys)
    moved: dict[str, Plan] = {}
    for tid in sorted(incumbents):
        inc = incumbents[tid]
        if not inc.paths or not any(wanted_keys.intersection(p.links) for p in inc.paths):
            continue
        others = usage.without_plan(inc)
        left = [cat.capacity_bytes_per_s(k) - others.get(k, 0.0) for k in wanted.keys]
        reserve = min(left)
        if reserve <= _EPS_BYTES_PER_S:
            continue  # the path is full even without this incumbent
        reservation = Plan(paths=(PathShare(hops=wanted.hops, bandwidth_bytes_per_s=reserve,
                                            bottleneck=wanted.keys[left.index(reserve)],
                                            links=wanted.keys),),
                           total_bandwidth_bytes_per_s=reserve)
        isrc, idst = inc.paths[0].hops[0], inc.paths[0].hops[-1]
        alternative = plan_paths(topology, isrc, idst, usage=others.with_plan(reservation),
                                 max_paths=max_paths)
        if alternative.contended:
            continue  # no other path: the incumbent stays where it is
        logger.debug("moving transfer %s off %s: %.3g -> %.3g B/s", tid, wanted.hops,
                     inc.total_bandwidth_bytes_per_s, alternative.total_bandwidth_bytes_per_s)
        moved[tid] = alternative
        usage = others.with_plan(alternative)
        plan = plan_paths(topology, src, dst, usage=usage, max_paths=max_paths)
        if not plan.contended:
            break
    return Rebalanced(plan=plan, moved=moved)
