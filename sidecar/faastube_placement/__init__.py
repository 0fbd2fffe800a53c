"""Where a workflow's functions run: topology-aware placement, shared by the operator
(placing on a cluster's GpuNodes) and ``faastube run`` (placing on this machine).

Pure: a function of the workflow, the topology and the current usage. ``core`` is the
API (``place``), ``costs`` the cost model, ``search`` the solver over integers,
``node_local`` the rule about which nodes a workflow may span (only nodes whose
sidecars serve cross-node reads) and CPU functions going where their edges cost least,
``inputs`` the YAML inputs of ``faastube place``, ``instances`` generated problems for
tests and benchmarks. Design: docs/placement.md.
"""

from faastube_placement.core import (
    Assignment,
    GpuUsage,
    Placement,
    PlacementError,
    place,
)
from faastube_placement.node_local import (
    Where,
    follow_consumers,
    nodes_of,
    place_on_nodes,
    place_on_one_node,
    where_each_runs,
)

__all__ = [
    "Assignment",
    "GpuUsage",
    "Placement",
    "PlacementError",
    "Where",
    "follow_consumers",
    "nodes_of",
    "place",
    "place_on_nodes",
    "place_on_one_node",
    "where_each_runs",
]
