"""Seeded synthetic placement inputs: random workflows and clusters of simulated nodes.

The benchmark and the tests both need many placement instances that are reproducible
from a seed and shaped like the paper's workflows (chains and fan-outs of GPU stages
fed by CPU pre-processing, intermediates of megabytes to hundreds of megabytes). One
generator keeps the two honest: the benchmark times the same kind of input the tests
check for quality.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from faastube_spec import topology
from faastube_spec.topology import ClusterTopology, NetworkLink, NodeTopology
from faastube_spec.workflow import EdgeSpec, FunctionSpec, Workflow

GIB = 2**30
MB = 10**6


def random_workflow(rng: random.Random, *, functions: int, cpu_fraction: float = 0.2,
                    max_replicas: int = 1, max_memory_bytes: int = 24 * GIB,
                    edge_probability: float = 0.3, name: str = "random") -> Workflow:
    """A connected DAG: each function after the first gets one edge from an earlier one,
    plus extra forward edges with ``edge_probability``."""
    specs = []
    for i in range(functions):
        gpu = i > 0 and rng.random() >= cpu_fraction or functions == 1
        specs.append(FunctionSpec(
            name=f"f{i}", handler=f"functions:f{i}", gpu=gpu,
            gpu_memory_bytes=rng.randint(1, max(1, max_memory_bytes // GIB)) * GIB if gpu else 0,
            replicas=rng.randint(1, max_replicas)))
    edges: list[EdgeSpec] = []
    for j in range(1, functions):
        sources = {rng.randrange(j)}
        sources.update(i for i in range(j) if rng.random() < edge_probability)
        edges.extend(EdgeSpec(f"f{i}", f"f{j}", rng.randint(1, 500) * MB) for i in sorted(sources))
    return Workflow(name=name, slo_s=1.0, entry="f0", exit=f"f{functions - 1}",
                    functions=tuple(specs), edges=tuple(edges))


def renamed(node: NodeTopology, name: str) -> NodeTopology:
    return dataclasses.replace(node, name=name)


def cluster_of(builtins: Sequence[str], *, network_bandwidth_bytes_per_s: float | None = None,
               links: Sequence[tuple[int, int, float]] = ()) -> ClusterTopology:
    """Nodes copied from built-in topologies, named ``n0``, ``n1``, ... in order.

    ``links`` adds (node i, node j, bytes/s) network links over the default bandwidth.
    """
    nodes = tuple(renamed(topology.builtin_node(kind), f"n{i}") for i, kind in enumerate(builtins))
    network = tuple(NetworkLink(f"n{a}", f"n{b}", bandwidth) for a, b, bandwidth in links)
    if network_bandwidth_bytes_per_s is None:
        return ClusterTopology(nodes=nodes, network_links=network)
    return ClusterTopology(nodes=nodes, network_links=network,
                           default_network_bandwidth_bytes_per_s=network_bandwidth_bytes_per_s)


def subset_node(node: NodeTopology, gpus: Sequence[int], *, name: str) -> NodeTopology:
    """A node cut down to the given GPU indices, with the links among them."""
    keep = set(gpus)
    return dataclasses.replace(
        node, name=name,
        gpus=tuple(g for g in node.gpus if g.index in keep),
        links=tuple(link for link in node.links if link.a in keep and link.b in keep))
