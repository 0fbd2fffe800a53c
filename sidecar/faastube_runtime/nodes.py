"""Several "nodes" on one machine for ``faastube run --nodes N``: which node each function runs on.

Each node is a sidecar of its own that serves cross-node reads (``--peer-port``): its
clients' refs name it, and a worker on another node fetches them over NIXL. This module
is pure: it splits the machine's GPUs between the nodes, builds the cluster placement
sees (N nodes, all serving cross-node reads, as the operator sees N GpuNodes that
publish ``status.network``) and decides where each function runs.

Two rules (``NodePlacement``):

- ``cost``: the placement code's answer (``faastube_placement.where_each_runs``), as the
  operator would place the workflow on N such GpuNodes. The cost model prices crossing
  nodes, so a workflow that fits one node usually stays on one node.
- ``spread`` (the default): the same answer when it uses every node; otherwise the
  functions go round-robin over the nodes in the workflow's order (entry first), so
  consecutive functions sit on different nodes and their data crosses between them:
  what running on N nodes is meant to show. GPU functions then take their node's GPUs
  round-robin.

On the host backend there are no GPUs to weigh: placement sees every function as a CPU
function (which it is there), and the nodes' hosts joined by the network.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from faastube_spec import topology
from faastube_spec.topology import ClusterTopology, NodeTopology
from faastube_spec.workflow import Workflow

from faastube_runtime import errors

logger = logging.getLogger(__name__)

NodePlacement = Literal["spread", "cost"]
NODE_PLACEMENTS: tuple[str, ...] = ("spread", "cost")


def node_name(index: int) -> str:
    """The name of the ``index``-th local node (refs carry it: ``ft-<hex>@node-1``)."""
    return f"node-{index}"


@dataclasses.dataclass(frozen=True, slots=True)
class LocalNode:
    """One local node: its name and the CUDA ordinals (of this process) its sidecar and workers see."""

    name: str
    cuda_ordinals: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Placed:
    """Where one function runs: its node, and the CUDA ordinal on that node (None: CPU)."""

    node: str
    device: int | None = None


def split_gpus(nodes: int, gpus: int) -> tuple[LocalNode, ...]:
    """``nodes`` local nodes sharing ``gpus`` CUDA devices: contiguous, as even as can be.

    With GPUs every node needs one: a node without a GPU could not hold GPU functions,
    and two sidecars managing one GPU's memory is not what a cluster looks like.
    """
    if nodes < 1:
        raise errors.BadInput(f"--nodes: must be at least 1, got {nodes}")
    if 0 < gpus < nodes:
        raise errors.BadInput(f"--nodes {nodes}: each node needs a GPU of its own and {gpus} "
                              f"{'is' if gpus == 1 else 'are'} visible; use --nodes {gpus} or fewer, "
                              "or --backend host")
    if gpus == 0:
        return tuple(LocalNode(node_name(i)) for i in range(nodes))
    return tuple(LocalNode(node_name(i), tuple(range(i * gpus // nodes, (i + 1) * gpus // nodes)))
                 for i in range(nodes))


def cuda_visible_devices(node: LocalNode, inherited: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the node's processes: its ordinals, through ours if we have one."""
    if inherited is None or not inherited.strip():
        return ",".join(str(o) for o in node.cuda_ordinals)
    ours = [d.strip() for d in inherited.split(",") if d.strip()]
    return ",".join(ours[o] for o in node.cuda_ordinals)


def cluster_of(nodes: Sequence[LocalNode], *, machine: NodeTopology | None = None,
               cuda_of: Mapping[int, int] | None = None) -> ClusterTopology:
    """The cluster placement sees: each local node with its share of ``machine``'s GPUs
    (NVML indices, mapped to CUDA ordinals by ``cuda_of``) and the links among them;
    without ``machine`` (the host backend, or no topology), nodes without GPUs."""
    out = []
    for node in nodes:
        if machine is None:
            out.append(NodeTopology(name=node.name, gpus=()))
            continue
        mine = {g.index for g in machine.gpus if (cuda_of or {}).get(g.index, g.index) in node.cuda_ordinals}
        out.append(NodeTopology(
            name=node.name, gpus=tuple(g for g in machine.gpus if g.index in mine),
            links=tuple(link for link in machine.links if link.a in mine and link.b in mine),
            host_memory_bytes=machine.host_memory_bytes))
    return ClusterTopology(nodes=tuple(out),
                           default_network_bandwidth_bytes_per_s=topology.DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S)


def as_cpu_functions(workflow: Workflow) -> Workflow:
    """The workflow as the host backend runs it: every function on the CPU."""
    return dataclasses.replace(workflow, functions=tuple(
        dataclasses.replace(fn, gpu=False, gpu_memory_bytes=0) for fn in workflow.functions))


def place_on_local_nodes(workflow: Workflow, nodes: Sequence[LocalNode], *, mode: NodePlacement = "spread",
                         machine: NodeTopology | None = None,
                         cuda_of: Mapping[int, int] | None = None) -> dict[str, Placed]:
    """Each function's node and CUDA ordinal on it (see the module's docstring for the rules).

    ``machine`` and ``cuda_of``: this machine's topology and NVML index -> CUDA ordinal
    map, when GPUs are used; the nodes' ``cuda_ordinals`` say which GPUs each has.
    Raises ``BadInput`` when the placement code finds no placement (the reason is its own).
    """
    from faastube_placement import PlacementError, where_each_runs

    use_gpus = any(node.cuda_ordinals for node in nodes)
    placed_workflow = workflow if use_gpus else as_cpu_functions(workflow)
    cluster = cluster_of(nodes, machine=machine if use_gpus else None, cuda_of=cuda_of)
    try:
        where, _ = where_each_runs(placed_workflow, cluster, cross_node=[n.name for n in nodes])
    except PlacementError as e:
        raise errors.BadInput(f"placing {workflow.name!r} on {len(nodes)} local nodes: {e}") from e
    by_name = {n.name: n for n in nodes}

    def ordinal(node: str, gpu: int | None) -> int | None:
        """The CUDA ordinal, as the node's own processes number it (they see only its GPUs)."""
        if gpu is None:
            return None
        machine_ordinal = (cuda_of or {}).get(gpu, gpu)
        return by_name[node].cuda_ordinals.index(machine_ordinal)

    used = {w.node for w in where.values()}
    if mode == "cost" or len(used) >= len(nodes):
        placed = {}
        for fn in workflow.functions:
            w = where[fn.name]
            node = w.node if w.node is not None else nodes[0].name
            placed[fn.name] = Placed(node, ordinal(node, w.gpu) if fn.gpu and use_gpus else None)
        return placed
    logger.info("placement keeps %s on %d of %d nodes; spreading its functions round-robin",
                workflow.name, len(used), len(nodes))
    return round_robin(workflow, nodes, use_gpus=use_gpus)


def round_robin(workflow: Workflow, nodes: Sequence[LocalNode], *, use_gpus: bool) -> dict[str, Placed]:
    """Function k of the workflow on node k mod N; GPU functions take their node's GPUs in turn."""
    placed = {}
    next_gpu = {n.name: 0 for n in nodes}
    for k, fn in enumerate(workflow.functions):
        node = nodes[k % len(nodes)]
        device = None
        if fn.gpu and use_gpus:
            device = next_gpu[node.name] % len(node.cuda_ordinals)
            next_gpu[node.name] += 1
        placed[fn.name] = Placed(node.name, device)
    return placed


def describe(workflow: Workflow, placed: Mapping[str, Placed]) -> str:
    """One line per function: where it runs (``faastube run`` prints it)."""
    width = max(len(fn.name) for fn in workflow.functions)
    lines = []
    for fn in workflow.functions:
        p = placed[fn.name]
        lines.append(f"  {fn.name:<{width}}  {p.node}" + ("" if p.device is None else f" gpu {p.device}"))
    return "\n".join(lines)
