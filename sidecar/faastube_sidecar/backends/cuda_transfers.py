"""Host<->GPU and GPU<->GPU copies of the CUDA backend, planned over the node's topology.

The planner's cost model decides, per copy, whether splitting pays (``planner.fit_plan``).
A copy whose plan is the single direct link runs as one ``cudaMemcpyAsync`` issued by the
caller's thread (``DirectCopier``): the same cost as a user's own pinned copy, no engine
thread hop, no chunks. Larger ones run on the transfer engine over as many paths as pay
off: host<->GPU over several GPUs' PCIe links forwarded over NVLink, and, on asymmetric
boxes (DGX-1: 42% of pairs without NVLink), GPU-to-GPU over relay GPUs. The engine keeps
few chunks in flight per link, so that a small transfer never waits behind a large one,
and shares bandwidth by SLO. A single-link plan larger than what the engine itself lets
wait on a link (``EngineSettings.direct_max_bytes``) goes through the engine too, in
chunks, for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

from faastube_spec.topology import NodeTopology

from faastube_sidecar.transfers import planner
from faastube_sidecar.transfers.cuda_executor import (
    CudaTransferEngine,
    DirectCopier,
    StagingSettings,
)
from faastube_sidecar.transfers.scheduler import (
    FunctionIdentity,
    LinkId,
    LinkSpec,
    Route,
    SchedulerSettings,
    TransferRequest,
    TransferResult,
    describe_route,
    sized_route,
)

logger = logging.getLogger(__name__)

Endpoint = int | Literal["host"]

_ids = itertools.count(1)
_ROUTE_CACHE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How the engine cuts and paces transfers, and the costs it plans with.

    Why these numbers (Gen5 PCIe ~55 GB/s per link, as on the lent 4x H100 / H200 boxes;
    the CPU costs are estimates from runs without CUDA, to be confirmed by the benchmark's
    calibration on a GPU box):
    - 16 MiB chunks: issuing a chunk and handling its completion from Python costs some
      15-30 us; at 4 MiB (76 us of PCIe) four links would keep the engine's one thread
      busy just issuing, at 16 MiB (~300 us) about a quarter of the time.
    - 2 chunks in flight per link: the copy engine always has the next chunk queued while
      the engine thread reacts to the previous one, and a newcomer waits at most 32 MiB
      (~0.6 ms) on a busy link, against 17 ms measured behind a 1 GiB FIFO copy.
    - 3 lanes (staging slots with their own stream) per relay and direction, of one
      chunk each: two chunks in flight plus one starting while the oldest still forwards.
    - ``cost``: ``planner.CostModel``; its ``relay_edge_bytes`` also cuts the first and
      last piece of every relayed path.
    """

    cost: planner.CostModel = planner.DEFAULT_COST
    chunk_bytes: int = 16 << 20
    max_inflight_chunks_per_link: int = 2
    slots_per_relay: int = 3
    best_effort_min_share: float = 0.1
    relay_lanes: bool = True  # False: the event-chained relays of before (for comparison)

    @property
    def scheduler(self) -> SchedulerSettings:
        return SchedulerSettings(chunk_bytes=self.chunk_bytes,
                                 max_inflight_chunks_per_link=self.max_inflight_chunks_per_link,
                                 best_effort_min_share=self.best_effort_min_share,
                                 relay_edge_bytes=self.cost.relay_edge_bytes)

    @property
    def staging(self) -> StagingSettings:
        return StagingSettings(slots_per_relay=self.slots_per_relay, slot_bytes=self.chunk_bytes,
                               relay_lanes=self.relay_lanes)

    @property
    def direct_max_bytes(self) -> int:
        """The largest single-link copy that bypasses the engine.

        A bypassing copy holds its link's copy engine for its whole length (engines are
        FIFO), so it may be no longer than the chunks the engine itself keeps in flight.
        """
        return self.chunk_bytes * self.max_inflight_chunks_per_link


def is_single_direct(plan: planner.Plan) -> bool:
    """True when a plan is one path over one link: a plain copy does the same, faster."""
    return plan.direct


def _relays_are_gpus(plan: planner.Plan) -> bool:
    return all(h != planner.HOST for p in plan.paths for h in p.hops[1:-1])


class Transfer:
    """A started copy: ``wait()`` returns once its bytes have landed.

    A direct copy is waited for like a user's own copy, by synchronizing its stream (so
    ``wait()`` also covers copies other threads put on the same link after it, and costs
    no event); an engine transfer through its future.
    """

    __slots__ = ("_future", "_nbytes", "_plan", "_stream", "label")

    def __init__(self, label: str, plan: planner.Plan | planner.PathShare, nbytes: int, *,
                 stream: Any = None, future: concurrent.futures.Future[TransferResult] | None = None
                 ) -> None:
        self.label = label  # e.g. h2d-direct, h2d-multipath[0,1,2,3]
        self._plan = plan   # a direct copy keeps just its path: the plan is built if asked for
        self._nbytes = nbytes
        self._stream = stream
        self._future = future

    @property
    def plan(self) -> planner.Plan:
        """The paths and bytes (topology GPU indices)."""
        if isinstance(self._plan, planner.PathShare):
            path = self._plan
            self._plan = planner.Plan(paths=(path,), total_bandwidth_bytes_per_s=path.bandwidth_bytes_per_s,
                                      sizes_bytes=(self._nbytes,))
        return self._plan

    @property
    def direct(self) -> bool:
        """Issued as one plain copy on the caller's thread (no engine)."""
        return self._future is None

    @property
    def future(self) -> concurrent.futures.Future[TransferResult] | None:
        """The engine's future (None for a direct copy)."""
        return self._future

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return bool(self._stream.done)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the copy is done; raises what the engine reported, or TimeoutError."""
        if self._future is not None:
            self._future.result(timeout_s)
            return
        if timeout_s is None:
            self._stream.synchronize()
            return
        deadline = time.perf_counter() + timeout_s
        while not self._stream.done:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"copy {self.label} not done after {timeout_s}s")
            time.sleep(0)


class ScheduledTransfers:
    """Plans and runs copies; endpoints are CUDA ordinals or "host"."""

    def __init__(self, topology: NodeTopology, cuda_of_topology: dict[int, int], *,
                 settings: EngineSettings | None = None) -> None:
        self._topology = topology
        self._settings = settings or EngineSettings()
        self._cuda = cuda_of_topology                    # topology GPU index -> CUDA ordinal
        self._topo = {v: k for k, v in cuda_of_topology.items()}
        self._catalog = planner.PathCatalog(topology)
        self._links = self._link_specs()
        self._kinds = {spec.link: spec.kind for spec in self._links}
        self._plans: dict[tuple[Endpoint, Endpoint], planner.Plan] = {}
        self._thresholds: dict[tuple[Endpoint, Endpoint], int | None] = {}
        # (src, dst, size) -> the engine's (label, plan, route): sizes repeat (the same tensors
        # pass every request), and fitting + building a route costs ~50 us of Python
        self._routes: dict[tuple[Endpoint, Endpoint, int], tuple[str, planner.Plan, Route]] = {}
        # endpoint pair -> (largest copy that bypasses the engine, its label, its path, its link)
        self._bypass: dict[tuple[Endpoint, Endpoint], tuple[float, str, planner.PathShare, Any]] = {}
        gpus = sorted(cuda_of_topology.values())
        self._direct = DirectCopier(gpus)
        self._engine = CudaTransferEngine(gpus, self._links, settings=self._settings.scheduler,
                                          staging=self._settings.staging)
        if len(gpus) > 1 and self._settings.relay_lanes:
            # before any transfer runs: the first relayed copy must not allocate
            self._engine.executor.preallocate_staging(gpus)
        for g in gpus:  # the crossover is a bisection (~3 ms): not on a host copy's first use
            self._bypass_entry(("host", g))
            self._bypass_entry((g, "host"))

    @classmethod
    def for_local_node(cls, gpus: Sequence[int] | None = None, *,
                       settings: EngineSettings | None = None) -> ScheduledTransfers:
        """This machine's topology (NVML), limited to the CUDA ordinals ``gpus``."""
        import cupy

        from faastube_sidecar.backends.cuda import normalize_bus_id
        from faastube_sidecar.discovery import discover_local_node

        node = discover_local_node()
        rt = cupy.cuda.runtime
        wanted = list(range(rt.getDeviceCount())) if gpus is None else list(gpus)
        by_bus = {normalize_bus_id(rt.deviceGetPCIBusId(i)): i for i in wanted}
        cuda_of = {g.index: by_bus[normalize_bus_id(g.pcie_bus_id)] for g in node.gpus
                   if normalize_bus_id(g.pcie_bus_id) in by_bus}
        if len(cuda_of) != len(wanted):
            raise ValueError(f"NVML and CUDA disagree on the GPUs: CUDA {wanted}, NVML matched "
                             f"{sorted(cuda_of.values())}")
        return cls(subtopology(node, cuda_of), cuda_of, settings=settings)

    def with_settings(self, settings: EngineSettings) -> ScheduledTransfers:
        """Another instance over the same GPUs with other settings (e.g. to compare them)."""
        return ScheduledTransfers(self._topology, dict(self._cuda), settings=settings)

    @property
    def topology(self) -> NodeTopology:
        return self._topology

    @property
    def settings(self) -> EngineSettings:
        return self._settings

    @property
    def engine(self) -> CudaTransferEngine:
        return self._engine

    def _link_specs(self) -> list[LinkSpec]:
        specs: list[LinkSpec] = []
        for gpu in self._topology.gpus:
            g = self._cuda[gpu.index]
            specs.append(LinkSpec(LinkId(f"h2d:{g}"), gpu.pcie_bandwidth_bytes_per_s, "pcie"))
            specs.append(LinkSpec(LinkId(f"d2h:{g}"), gpu.pcie_bandwidth_bytes_per_s, "pcie"))
            for other in self._topology.gpus:
                if other.index != gpu.index:
                    link = self._topology.link(gpu.index, other.index)
                    kind: Literal["nvlink", "pcie"] = "nvlink" if link is not None and link.kind == "nvlink" else "pcie"
                    bw = self._topology.gpu_bandwidth_bytes_per_s(gpu.index, other.index)
                    specs.append(LinkSpec(LinkId(f"p2p:{g}->{self._cuda[other.index]}"), bw, kind))
        return specs

    # -- decisions (pure functions of the topology, cached per endpoint pair) -------------

    def _base_plan(self, key: tuple[Endpoint, Endpoint]) -> planner.Plan:
        plan = self._plans.get(key)
        if plan is None:
            plan = planner.plan_paths(self._topology, self._to_topo(key[0]), self._to_topo(key[1]),
                                      catalog=self._catalog)
            self._plans[key] = plan
        return plan

    def plan(self, src: Endpoint, dst: Endpoint, nbytes: int) -> planner.Plan:
        """The paths and bytes a copy of ``nbytes`` would use (topology GPU indices)."""
        return planner.fit_plan(self._base_plan((src, dst)), nbytes, catalog=self._catalog,
                                cost=self._settings.cost)

    def split_threshold_bytes(self, src: Endpoint, dst: Endpoint) -> int | None:
        """The smallest copy ``src -> dst`` that is split over several paths (None: never)."""
        key = (src, dst)
        if key not in self._thresholds:
            self._thresholds[key] = planner.split_threshold_bytes(
                self._base_plan(key), catalog=self._catalog, cost=self._settings.cost)
        return self._thresholds[key]

    def _bypass_entry(self, key: tuple[Endpoint, Endpoint]) -> tuple[float, str, planner.PathShare, Any]:
        entry = self._bypass.get(key)
        if entry is None:
            plan = self._base_plan(key)
            limit: float
            if not _relays_are_gpus(plan):
                limit = math.inf  # staged through host memory: the driver does that in one peer copy
            elif len(plan.paths[0].hops) != 2:
                limit = 0  # no direct link: always the engine
            else:
                threshold = self.split_threshold_bytes(*key)
                limit = self._settings.direct_max_bytes
                if threshold is not None:
                    limit = min(limit, threshold - 1)
            label = describe_route(sized_route([(key, 1)]), self._kinds)
            entry = self._bypass[key] = (limit, label, plan.paths[0], self._direct.link(*key))
        return entry

    def _goes_direct(self, key: tuple[Endpoint, Endpoint], nbytes: int) -> bool:
        return nbytes <= self._bypass_entry(key)[0]

    def wants_engine(self, src: Endpoint, dst: Endpoint, nbytes: int) -> bool:
        """Whether a copy of ``nbytes`` goes through the engine (else: one plain copy)."""
        return not self._goes_direct((src, dst), nbytes)

    def needs_engine(self, src: int, dst: int) -> bool:
        """Whether a large GPU-to-GPU copy should go through relays rather than its direct link."""
        plan = self._base_plan((src, dst))
        return not plan.direct and _relays_are_gpus(plan)

    # -- copies ---------------------------------------------------------------------------

    def start(self, *, src: Endpoint, dst: Endpoint, src_address: int, dst_address: int,
              nbytes: int, workflow: str = "", function: str = "sidecar") -> Transfer:
        """Start a copy; small ones are issued before this returns, on this thread."""
        key = (src, dst)
        limit, label, path, link = self._bypass.get(key) or self._bypass_entry(key)
        if nbytes <= limit:
            stream = self._direct.issue(link, src_address=src_address, dst_address=dst_address,
                                        nbytes=nbytes)
            return Transfer(label, path, nbytes, stream=stream)
        label, plan, future = self._submit_to_engine(src, dst, src_address, dst_address, nbytes,
                                                     workflow, function)
        return Transfer(label, plan, nbytes, future=future)

    def _route(self, src: Endpoint, dst: Endpoint, nbytes: int) -> tuple[str, planner.Plan, Route]:
        key = (src, dst, nbytes)
        hit = self._routes.get(key)
        if hit is None:
            plan = self.plan(src, dst, nbytes)
            route = sized_route([(tuple(self._to_cuda(h) for h in p.hops), n)
                                 for p, n in zip(plan.paths, plan.sizes_bytes)])
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.pop(next(iter(self._routes)))
            hit = self._routes[key] = (describe_route(route, self._kinds), plan, route)
        return hit

    def _submit_to_engine(self, src: Endpoint, dst: Endpoint, src_address: int, dst_address: int,
                          nbytes: int, workflow: str, function: str
                          ) -> tuple[str, planner.Plan, concurrent.futures.Future[TransferResult]]:
        label, plan, route = self._route(src, dst, nbytes)
        request = TransferRequest(f"t{next(_ids)}", FunctionIdentity(workflow or "-", function or "-"),
                                  route, src_address=src_address, dst_address=dst_address)
        logger.debug("transfer %s: %d bytes %s -> %s over %s", request.transfer_id, nbytes, src, dst,
                     label)
        return label, plan, self._engine.submit(request)

    def submit(self, *, src: Endpoint, dst: Endpoint, src_address: int, dst_address: int, nbytes: int,
               workflow: str, function: str
               ) -> tuple[str, concurrent.futures.Future[TransferResult] | concurrent.futures.Future[None]]:
        """Start a copy; returns the route's label (e.g. h2d-multipath[0,1,2,3]) and a future.

        For a direct copy the future is completed by the engine's thread when the copy's
        event fires (the copy itself was issued by this thread).
        """
        key = (src, dst)
        if self._goes_direct(key, nbytes):
            event = self._direct.copy(src=src, dst=dst, src_address=src_address, dst_address=dst_address,
                                      nbytes=nbytes)
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._engine.watch(event, future)
            return self._bypass_entry(key)[1], future
        label, _plan, engine_future = self._submit_to_engine(src, dst, src_address, dst_address, nbytes,
                                                             workflow, function)
        return label, engine_future

    def _to_topo(self, endpoint: Endpoint) -> Endpoint:
        return "host" if endpoint == "host" else self._topo[int(endpoint)]

    def _to_cuda(self, endpoint: Endpoint) -> Endpoint:
        return "host" if endpoint == "host" else self._cuda[int(endpoint)]

    def close(self) -> None:
        self._engine.close()
        try:
            self._direct.synchronize()
        except Exception:  # cleanup must not raise; the context may already be gone
            logger.exception("direct copies: synchronize at close failed")


def subtopology(node: NodeTopology, keep: dict[int, int] | Sequence[int]) -> NodeTopology:
    """``node`` with only the GPUs whose topology indices are in ``keep``."""
    indices = set(keep)
    if indices == set(node.gpu_indices):
        return node
    return NodeTopology(name=node.name, gpus=tuple(g for g in node.gpus if g.index in indices),
                        links=tuple(lk for lk in node.links if lk.a in indices and lk.b in indices),
                        host_memory_bytes=node.host_memory_bytes)
