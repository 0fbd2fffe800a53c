"""place() against exhaustive enumeration on many small seeded instances."""

from __future__ import annotations

import random

import pytest
from faastube_placement import instances as pi
from faastube_placement.core import (
    GpuUsage,
    PlacementError,
    brute_force,
    capacity_violations,
    place,
    placement_cost,
)
from faastube_spec import topology
from faastube_spec.topology import ClusterTopology, NetworkLink

GIB = 2**30

# Small clusters: few enough GPUs to enumerate, shaped like the simulated machines.
def _small_clusters() -> dict[str, ClusterTopology]:
    v100 = topology.builtin_node("dgx1-v100")
    l40s = topology.builtin_node("8x-l40s")
    a10 = topology.builtin_node("4x-a10")
    h100 = topology.builtin_node("dgx-h100")
    return {
        "v100-mixed-links": ClusterTopology(nodes=(pi.subset_node(v100, [0, 1, 3, 5], name="v"),)),
        "l40s-pairs": ClusterTopology(nodes=(pi.subset_node(l40s, [0, 1, 2, 3], name="l"),)),
        "a10-pcie": ClusterTopology(nodes=(pi.subset_node(a10, [0, 1, 2], name="a"),)),
        "two-nodes": ClusterTopology(
            nodes=(pi.subset_node(v100, [0, 4], name="v"), pi.subset_node(h100, [0, 1], name="h")),
            network_links=(NetworkLink("v", "h", 12.5e9, 2e-5),)),
        "three-nodes": ClusterTopology(
            nodes=(pi.subset_node(a10, [0, 1], name="a"), pi.subset_node(l40s, [0, 1], name="l"),
                   pi.subset_node(a10, [2], name="b"))),
    }


CLUSTERS = _small_clusters()
SEEDS = range(25)


def _instance(name: str, seed: int):
    rng = random.Random(f"{name}/{seed}")
    functions = rng.randint(3, 5)
    workflow = pi.random_workflow(rng, functions=functions, max_replicas=2, max_memory_bytes=16 * GIB,
                                  edge_probability=0.4)
    cluster = CLUSTERS[name]
    # Some GPUs partly taken, so capacity binds differently across instances.
    usage = {}
    for node in cluster.nodes:
        for gpu in node.gpus:
            if rng.random() < 0.4:
                usage[(node.name, gpu.index)] = GpuUsage(rng.randint(0, 8) * GIB, rng.randint(0, 2))
    return workflow, cluster, usage


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_place_is_within_five_percent_of_brute_force_on_every_small_instance(name: str) -> None:
    compared = 0
    for seed in SEEDS:
        workflow, cluster, usage = _instance(name, seed)
        try:
            best = brute_force(workflow, cluster, usage=usage)
        except PlacementError:  # an infeasible instance must be infeasible for place() too
            with pytest.raises(PlacementError):
                place(workflow, cluster, usage=usage)
            continue
        found = place(workflow, cluster, usage=usage)
        assert found.cost_s <= best.cost_s * 1.05 + 1e-12, (name, seed, found, best)
        assert capacity_violations(workflow, cluster, found.assignments, usage=usage) == []
        assert placement_cost(workflow, cluster, found.assignments) == pytest.approx(found.cost_s)
        assert found.lower_bound_s is not None and found.lower_bound_s <= best.cost_s + 1e-12
        compared += 1
    assert compared >= len(SEEDS) // 2, "too few feasible instances to mean anything"


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_small_instances_are_proven_optimal(name: str) -> None:
    for seed in SEEDS[:4]:
        workflow, cluster, usage = _instance(name, seed)
        try:
            best = brute_force(workflow, cluster, usage=usage)
        except PlacementError:
            continue
        found = place(workflow, cluster, usage=usage)
        assert found.proven_optimal
        assert found.cost_s == pytest.approx(best.cost_s, rel=1e-9, abs=1e-15)


def test_heuristic_alone_stays_close_to_the_optimum() -> None:
    """Without the exact phase, greedy plus local search is still near-optimal here."""
    ratios = []
    for name in sorted(CLUSTERS):
        for seed in SEEDS:
            workflow, cluster, usage = _instance(name, seed)
            try:
                best = brute_force(workflow, cluster, usage=usage)
                found = place(workflow, cluster, usage=usage, exact_budget=0)
            except PlacementError:
                continue
            ratios.append(found.cost_s / best.cost_s if best.cost_s > 0 else
                          (1.0 if found.cost_s == 0 else float("inf")))
    assert ratios and max(ratios) <= 1.10, max(ratios)
    assert sum(ratios) / len(ratios) <= 1.01
