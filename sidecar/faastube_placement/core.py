"""Topology-aware placement of a workflow's functions on the cluster's GPUs.

The operator asks one question per workflow: on which node and GPU should each
function run so that the data passed along the workflow's edges moves as fast as
possible? Communicating GPU functions should share a GPU (zero copy) or sit on an
NVLink pair; CPU functions go to the node of the GPU functions they exchange data
with. ``place`` answers it as a pure function of the workflow, the cluster topology
and the current usage, so the operator, the ``faastube place`` CLI and the tests all
get the same answer for the same input.

All replicas of a function share one assignment: they run on the same GPU and
together take ``reserved_replicas`` sharing slots and ``reserved_replicas *
gpu_memory_bytes`` there. The API (one ``Assignment`` per function) says the same, and
replicas of one function exchange no data with each other, so splitting them could
only add transfers. ``reserved_replicas`` is ``maxReplicas`` for an autoscaled
function: a scale-up then always fits where the function already runs, and never
needs the workflow placed again (docs/placement.md).

The cost model lives in ``costs`` and the search in ``search``;
the design is written up in ``docs/placement.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from faastube.errors import InvalidRequest
from faastube_spec.units import human_size

from faastube_placement import costs, search
from faastube_placement.costs import CostModel, Location, PathKind

if TYPE_CHECKING:
    from faastube_spec.topology import ClusterTopology
    from faastube_spec.workflow import FunctionSpec, Workflow

logger = logging.getLogger(__name__)

__all__ = [
    "Assignment",
    "EdgeCost",
    "GpuUsage",
    "Placement",
    "PlacementError",
    "brute_force",
    "capacity_violations",
    "edge_costs",
    "place",
    "placement_cost",
]

DEFAULT_EXACT_BUDGET = search.DEFAULT_EXACT_BUDGET

# Stand-in for "no network between these nodes" inside the search, which needs finite
# numbers (0 bytes * inf is nan); any placement that uses it is rejected afterwards.
_UNREACHABLE_SECONDS_PER_BYTE = 1e30
# Hosts hold any number of CPU functions: the search sees a capacity no demand reaches.
_UNBOUNDED = 1 << 62


class PlacementError(InvalidRequest):
    """No placement satisfies the workflow's constraints; the message says which and why."""


@dataclass(frozen=True)
class GpuUsage:
    """What a GPU already gives to others: memory in use and sharing slots taken."""

    memory_used_bytes: int = 0
    slots_used: int = 0


@dataclass(frozen=True)
class Assignment:
    """A function's place: a node, and the GPU index there (None for CPU functions)."""

    node: str
    gpu: int | None


@dataclass(frozen=True)
class Placement:
    """Where each function runs, and the expected data-passing seconds of that layout.

    ``lower_bound_s`` is a proven lower bound on the best possible cost; it equals
    ``cost_s`` when the search proved the placement optimal.
    """

    assignments: Mapping[str, Assignment]
    cost_s: float
    lower_bound_s: float | None

    @property
    def proven_optimal(self) -> bool:
        return self.lower_bound_s is not None and self.lower_bound_s >= self.cost_s


@dataclass(frozen=True)
class EdgeCost:
    """One edge of a placed workflow: the path its bytes take and the seconds that costs."""

    source: str
    target: str
    size_bytes: int
    path: PathKind
    seconds: float


def place(workflow: Workflow, cluster: ClusterTopology, *,
          usage: Mapping[tuple[str, int], GpuUsage] | None = None,
          exact_budget: int = DEFAULT_EXACT_BUDGET) -> Placement:
    """The cheapest placement found for ``workflow`` on ``cluster``.

    ``usage`` maps (node, GPU index) to what is already taken there. ``exact_budget``
    bounds the exact phase (candidate evaluations; deterministic); 0 keeps only the
    heuristic. Raises ``PlacementError`` when nothing fits, naming the reason.
    """
    model = costs.build_cost_model(cluster)
    problem = _problem(workflow, cluster, model, usage or {})
    _check_fits_alone(workflow, cluster, model, problem)
    solution = search.solve(problem, exact_budget=exact_budget)
    if solution is None:
        raise PlacementError(_no_fit_message(workflow, problem))
    placement = _placement(workflow, model, solution)
    if math.isinf(placement.cost_s):
        raise PlacementError(
            f"workflow {workflow.name!r}: every placement that fits sends data between nodes "
            f"with no network path; add network links to the topology or free GPUs on one node")
    logger.info("placed workflow %s: cost %.6f s (lower bound %s)", workflow.name,
                placement.cost_s, placement.lower_bound_s)
    return placement


def brute_force(workflow: Workflow, cluster: ClusterTopology, *,
                usage: Mapping[tuple[str, int], GpuUsage] | None = None,
                max_assignments: int = 2_000_000) -> Placement:
    """The optimum by exhaustive enumeration (no pruning): a reference for small inputs.

    Raises ``PlacementError`` if nothing fits, ``InvalidRequest`` if the instance has
    more than ``max_assignments`` candidate assignments.
    """
    model = costs.build_cost_model(cluster)
    problem = _problem(workflow, cluster, model, usage or {})
    try:
        solution = search.enumerate_all(problem, max_assignments=max_assignments)
    except ValueError as e:
        raise InvalidRequest(f"brute_force: instance too large to enumerate: {e}") from e
    if solution is None:
        raise PlacementError(_no_fit_message(workflow, problem))
    return _placement(workflow, model, solution)


def placement_cost(workflow: Workflow, cluster: ClusterTopology,
                   assignments: Mapping[str, Assignment]) -> float:
    """Expected data-passing seconds of a given layout (capacity is not checked)."""
    return math.fsum(e.seconds for e in edge_costs(workflow, cluster, assignments))


def edge_costs(workflow: Workflow, cluster: ClusterTopology,
               assignments: Mapping[str, Assignment]) -> tuple[EdgeCost, ...]:
    """Path and seconds of every edge, in the workflow's edge order."""
    model = costs.build_cost_model(cluster)
    where = _locations(workflow, model, assignments)
    out = []
    for edge in workflow.edges:
        s, t = where[edge.source], where[edge.target]
        out.append(EdgeCost(edge.source, edge.target, edge.size_bytes, model.paths[s][t],
                            model.edge_seconds(edge.size_bytes, s, t)))
    return tuple(out)


def capacity_violations(workflow: Workflow, cluster: ClusterTopology,
                        assignments: Mapping[str, Assignment], *,
                        usage: Mapping[tuple[str, int], GpuUsage] | None = None) -> list[str]:
    """Human-readable reasons a layout overfills GPU memory or sharing slots ([] if none)."""
    model = costs.build_cost_model(cluster)
    problem = _problem(workflow, cluster, model, usage or {})
    where = _locations(workflow, model, assignments)
    memory = [0] * problem.location_count
    slots = [0] * problem.location_count
    for i, fn in enumerate(workflow.functions):
        memory[where[fn.name]] += problem.demand_memory_bytes[i]
        slots[where[fn.name]] += problem.demand_slots[i]
    problems = []
    for loc, place_ in enumerate(model.locations):
        if memory[loc] > problem.capacity_memory_bytes[loc]:
            problems.append(f"{_where(place_)}: needs {human_size(memory[loc])}, "
                            f"{human_size(problem.capacity_memory_bytes[loc])} free")
        if slots[loc] > problem.capacity_slots[loc]:
            problems.append(f"{_where(place_)}: needs {slots[loc]} sharing slots, "
                            f"{problem.capacity_slots[loc]} free")
    return problems


# --- building the search problem ------------------------------------------------------


def _validated_usage(cluster: ClusterTopology, usage: Mapping[tuple[str, int], GpuUsage]
                     ) -> dict[tuple[str, int], GpuUsage]:
    names = {node.name: node for node in cluster.nodes}
    for key, value in usage.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise PlacementError(f"usage key {key!r}: expected (node name, GPU index)")
        node_name, gpu = key
        if node_name not in names:
            raise PlacementError(f"usage[{node_name!r}, {gpu!r}]: no node {node_name!r} in the topology")
        if not names[node_name].has_gpu(gpu):
            raise PlacementError(f"usage[{node_name!r}, {gpu!r}]: node {node_name!r} has no GPU {gpu!r}")
        if value.memory_used_bytes < 0 or value.slots_used < 0:
            raise PlacementError(f"usage[{node_name!r}, {gpu!r}]: memory and slots used must be >= 0")
    return dict(usage)


def _problem(workflow: Workflow, cluster: ClusterTopology, model: CostModel,
             usage: Mapping[tuple[str, int], GpuUsage]) -> search.Problem:
    if not cluster.nodes:
        raise PlacementError("the topology has no nodes")
    used = _validated_usage(cluster, usage)
    capacity_memory: list[int] = []
    capacity_slots: list[int] = []
    for loc in model.locations:
        if loc.gpu is None:
            capacity_memory.append(_UNBOUNDED)
            capacity_slots.append(_UNBOUNDED)
            continue
        gpu = cluster.node(loc.node).gpu(loc.gpu)
        taken = used.get((loc.node, loc.gpu), GpuUsage())
        # Over-reported usage (a stale status) means "no room", not an error.
        capacity_memory.append(max(0, gpu.memory_bytes - taken.memory_used_bytes))
        capacity_slots.append(max(0, gpu.sharing_slots - taken.slots_used))
    gpu_locations = tuple(i for i, loc in enumerate(model.locations) if loc.gpu is not None)
    host_locations = tuple(model.host_of_node)
    index = {fn.name: i for i, fn in enumerate(workflow.functions)}
    spb = tuple(tuple(v if math.isfinite(v) else _UNREACHABLE_SECONDS_PER_BYTE for v in row)
                for row in model.seconds_per_byte)
    return search.Problem(
        domains=tuple(gpu_locations if fn.gpu else host_locations for fn in workflow.functions),
        demand_memory_bytes=tuple(fn.reserved_replicas * fn.gpu_memory_bytes if fn.gpu else 0
                                  for fn in workflow.functions),
        demand_slots=tuple(fn.reserved_replicas if fn.gpu else 0 for fn in workflow.functions),
        capacity_memory_bytes=tuple(capacity_memory),
        capacity_slots=tuple(capacity_slots),
        edges=tuple((index[e.source], index[e.target], e.size_bytes) for e in workflow.edges),
        seconds_per_byte=spb,
        latency_s=model.latency_s,
        node_of=model.node_of,
        node_locations=tuple((host, *gpus) for host, gpus in zip(model.host_of_node, model.gpus_of_node)),
    )


def _placement(workflow: Workflow, model: CostModel,
               solution: search.Solution) -> Placement:
    assignments = {fn.name: Assignment(model.locations[loc].node, model.locations[loc].gpu)
                   for fn, loc in zip(workflow.functions, solution.assignment)}
    # Recomputed on the true model, where an unreachable pair costs inf.
    cost = math.fsum(model.edge_seconds(e.size_bytes, solution.assignment[i], solution.assignment[j])
                     for e, (i, j, _size) in zip(workflow.edges, _edge_index(workflow)))
    lower = cost if solution.proven_optimal else min(solution.lower_bound_s, cost)
    return Placement(assignments=assignments, cost_s=cost, lower_bound_s=lower)


def _edge_index(workflow: Workflow) -> list[tuple[int, int, int]]:
    index = {fn.name: i for i, fn in enumerate(workflow.functions)}
    return [(index[e.source], index[e.target], e.size_bytes) for e in workflow.edges]


def _locations(workflow: Workflow, model: CostModel,
               assignments: Mapping[str, Assignment]) -> dict[str, int]:
    where: dict[str, int] = {}
    for fn in workflow.functions:
        assignment = assignments.get(fn.name)
        if assignment is None:
            raise PlacementError(f"assignments[{fn.name!r}]: function has no assignment")
        if fn.gpu and assignment.gpu is None:
            raise PlacementError(f"assignments[{fn.name!r}].gpu: GPU function needs a GPU index")
        if not fn.gpu and assignment.gpu is not None:
            raise PlacementError(f"assignments[{fn.name!r}].gpu: CPU function must have no GPU, "
                                 f"got {assignment.gpu}")
        loc = model.index_of.get(Location(assignment.node, assignment.gpu))
        if loc is None:
            raise PlacementError(f"assignments[{fn.name!r}]: no {_where(Location(assignment.node, assignment.gpu))} "
                                 "in the topology")
        where[fn.name] = loc
    extra = sorted(set(assignments) - set(where))
    if extra:
        raise PlacementError(f"assignments: unknown function(s) {', '.join(map(repr, extra))}")
    return where


# --- explaining failures --------------------------------------------------------------


def _where(loc: Location) -> str:
    return f"node {loc.node!r}" if loc.gpu is None else f"node {loc.node!r} GPU {loc.gpu}"


def _check_fits_alone(workflow: Workflow, cluster: ClusterTopology, model: CostModel,
                      problem: search.Problem) -> None:
    """Reject, with a precise reason, functions that fit on no GPU even on their own."""
    gpu_functions = [(i, fn) for i, fn in enumerate(workflow.functions) if fn.gpu]
    if not gpu_functions:
        return
    gpus = [loc for loc, place_ in enumerate(model.locations) if place_.gpu is not None]
    if not gpus:
        raise PlacementError(
            f"workflow {workflow.name!r}: GPU function(s) {', '.join(fn.name for _, fn in gpu_functions)} "
            f"but no node of the topology has a GPU")
    for i, fn in gpu_functions:
        need_memory, need_slots = problem.demand_memory_bytes[i], problem.demand_slots[i]
        if any(problem.capacity_memory_bytes[loc] >= need_memory
               and problem.capacity_slots[loc] >= need_slots for loc in gpus):
            continue
        most_memory = max(gpus, key=lambda loc: (problem.capacity_memory_bytes[loc], -loc))
        most_slots = max(gpus, key=lambda loc: (problem.capacity_slots[loc], -loc))
        raise PlacementError(
            f"function {fn.name!r} fits on no GPU: it needs {human_size(need_memory)} "
            f"({_replicas_note(fn)} x {human_size(fn.gpu_memory_bytes)}) and {need_slots} sharing slot(s) "
            f"on one GPU; the most free memory is {human_size(problem.capacity_memory_bytes[most_memory])} "
            f"({_where(model.locations[most_memory])}) and the most free slots are "
            f"{problem.capacity_slots[most_slots]} ({_where(model.locations[most_slots])})")


def _replicas_note(fn: FunctionSpec) -> str:
    if fn.autoscaled:
        return f"maxReplicas {fn.reserved_replicas}, reserved for autoscaling"
    return f"{fn.replicas} replica(s)"


def _no_fit_message(workflow: Workflow, problem: search.Problem) -> str:
    gpu_idx = [i for i, d in enumerate(problem.domains) if d and problem.demand_slots[i] > 0]
    locs = {loc for i in gpu_idx for loc in problem.domains[i]}
    need_memory = sum(problem.demand_memory_bytes[i] for i in gpu_idx)
    need_slots = sum(problem.demand_slots[i] for i in gpu_idx)
    free_memory = sum(problem.capacity_memory_bytes[loc] for loc in locs)
    free_slots = sum(problem.capacity_slots[loc] for loc in locs)
    if need_slots > free_slots:
        why = f"they need {need_slots} sharing slots in all, the cluster has {free_slots} free"
    elif need_memory > free_memory:
        why = f"they need {human_size(need_memory)} of GPU memory in all, the cluster has {human_size(free_memory)} free"
    else:
        why = (f"they need {human_size(need_memory)} and {need_slots} slots in all "
               f"({human_size(free_memory)} and {free_slots} slots free) but do not pack onto the GPUs "
               f"(or the search budget ran out before finding a packing)")
    return f"workflow {workflow.name!r}: the GPU functions do not fit together: {why}"
