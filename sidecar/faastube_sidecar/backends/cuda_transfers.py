"""Large copies of the CUDA backend that deserve more than one link, through the transfer engine.

Small copies go straight to one `cudaMemcpyAsync` (the engine's thread hop costs
more than it saves), and so do GPU-to-GPU copies whose best route is the direct
link (every pair of an NVSwitch or fully NVLinked box). The rest are planned over
the node's topology and run by the scheduler, which keeps few chunks in flight per
link so that a small transfer never waits behind a large one, and shares bandwidth
by SLO: host<->GPU over several GPUs' PCIe links forwarded over NVLink, and, on
asymmetric boxes (DGX-1: 42% of pairs without NVLink), GPU-to-GPU over relay GPUs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from collections.abc import Sequence
from typing import Literal

from faastube.topology import NodeTopology

from faastube_sidecar.transfers import planner
from faastube_sidecar.transfers.cuda_executor import CudaTransferEngine
from faastube_sidecar.transfers.scheduler import (
    FunctionIdentity,
    LinkId,
    LinkSpec,
    TransferRequest,
    TransferResult,
    describe_route,
    make_route,
)

logger = logging.getLogger(__name__)

Endpoint = int | Literal["host"]

MULTIPATH_MIN_BYTES = 32 << 20
_ids = itertools.count(1)


def is_single_direct(plan: planner.Plan) -> bool:
    """True when a plan is one path over one link: a plain copy does the same, faster."""
    return len(plan.paths) == 1 and len(plan.paths[0].hops) == 2


class ScheduledTransfers:
    """Plans and runs copies on the engine; endpoints are CUDA ordinals or "host"."""

    def __init__(self, topology: NodeTopology, cuda_of_topology: dict[int, int]) -> None:
        self._topology = topology
        self._cuda = cuda_of_topology                    # topology GPU index -> CUDA ordinal
        self._topo = {v: k for k, v in cuda_of_topology.items()}
        self._catalog = planner.PathCatalog(topology)
        self._links = self._link_specs()
        self._kinds = {spec.link: spec.kind for spec in self._links}
        self._engine = CudaTransferEngine(sorted(cuda_of_topology.values()), self._links)

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

    def needs_engine(self, src: int, dst: int) -> bool:
        """Whether a GPU-to-GPU copy should go through relays rather than its direct link."""
        plan = planner.plan_paths(self._topology, self._topo[src], self._topo[dst], catalog=self._catalog)
        return not is_single_direct(plan)

    def submit(self, *, src: Endpoint, dst: Endpoint, src_address: int, dst_address: int, nbytes: int,
               workflow: str, function: str) -> tuple[str, concurrent.futures.Future[TransferResult]]:
        """Start a copy; returns the route's label (e.g. h2d-multipath[0,1,2,3]) and its future."""
        plan = planner.plan_paths(self._topology, self._to_topo(src), self._to_topo(dst), catalog=self._catalog)
        paths: Sequence[tuple[Sequence[Endpoint], float]] = [
            (tuple(self._to_cuda(h) for h in p.hops), p.bandwidth_bytes_per_s) for p in plan.paths]
        route = make_route(paths, nbytes)
        label = describe_route(route, self._kinds)
        request = TransferRequest(f"t{next(_ids)}", FunctionIdentity(workflow, function), route,
                                  src_address=src_address, dst_address=dst_address)
        logger.debug("transfer %s: %d bytes %s -> %s over %s", request.transfer_id, nbytes, src, dst, label)
        return label, self._engine.submit(request)

    def _to_topo(self, endpoint: Endpoint) -> Endpoint:
        return "host" if endpoint == "host" else self._topo[int(endpoint)]

    def _to_cuda(self, endpoint: Endpoint) -> Endpoint:
        return "host" if endpoint == "host" else self._cuda[int(endpoint)]

    def close(self) -> None:
        self._engine.close()
