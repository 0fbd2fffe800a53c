"""``faastube place``: place a workflow's functions on nodes' GPUs and print the cost as JSON.

Runs the operator's placement offline, on files, so a user can see where a workflow
would land and why (each edge's path and seconds) before deploying it. Exit codes:
0 placed, 1 nothing fits (the message says why), 2 an input file is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, TextIO

from faastube.errors import InvalidRequest
from faastube_placement import core as placement
from faastube_placement import inputs as placement_inputs
from faastube_spec.topology import ClusterTopology
from faastube_spec.units import human_size
from faastube_spec.workflow import Workflow, load_workflow

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO_FIT = 1
EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflow", required=True, metavar="W.yaml",
                        help="the Workflow document to place")
    parser.add_argument("--nodes", required=True, metavar="NODES.yaml",
                        help="a Topology document, a GpuNode list (kubectl get gpunodes -o yaml), "
                             "or builtin:NAME for a simulated topology")
    parser.add_argument("--usage", metavar="USAGE.yaml",
                        help="memory and sharing slots already taken per GPU "
                             "({usage: [{node, gpu, memoryUsed, slotsUsed}]})")
    parser.add_argument("--exact-budget", type=int, default=None, metavar="N",
                        help="work budget of the exact search (candidate evaluations; 0: heuristic only)")


def report(workflow: Workflow, cluster: ClusterTopology, result: placement.Placement) -> dict[str, Any]:
    """The JSON document ``faastube place`` prints."""
    edges = placement.edge_costs(workflow, cluster, result.assignments)
    return {
        "assignments": {name: {"node": a.node, "gpu": a.gpu} for name, a in result.assignments.items()},
        "costSeconds": result.cost_s,
        "lowerBoundSeconds": result.lower_bound_s,
        "optimal": result.proven_optimal,
        "edges": [{"from": e.source, "to": e.target, "bytes": e.size_bytes, "size": human_size(e.size_bytes), "path": e.path,
                   "seconds": e.seconds} for e in edges],
    }


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        workflow = load_workflow(args.workflow)
        cluster = placement_inputs.load_nodes(args.nodes)
        usage = placement_inputs.load_usage(args.usage, cluster) if args.usage else {}
    except InvalidRequest as e:
        print(f"faastube place: {e}", file=err)
        return EXIT_BAD_INPUT
    if args.exact_budget is not None and args.exact_budget < 0:
        print(f"faastube place: --exact-budget: must be >= 0, got {args.exact_budget}", file=err)
        return EXIT_BAD_INPUT
    budget = placement.DEFAULT_EXACT_BUDGET if args.exact_budget is None else args.exact_budget
    try:
        result = placement.place(workflow, cluster, usage=usage, exact_budget=budget)
    except placement.PlacementError as e:
        print(f"faastube place: cannot place workflow {workflow.name!r}: {e}", file=err)
        return EXIT_NO_FIT
    json.dump(report(workflow, cluster, result), out, indent=2)
    out.write("\n")
    return EXIT_OK
