"""``faastube topology``: print this node's GPU topology document (or a simulated one)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import yaml
from faastube_spec import topology

from faastube_sidecar import discovery

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml",
                        help="output format (default: yaml)")
    parser.add_argument("--node-name", default=None,
                        help="node name to put in the document (default: $NODE_NAME or hostname)")
    parser.add_argument("--simulated", metavar="NAME", default=None,
                        help="print a built-in simulated topology instead of discovering this node")
    parser.add_argument("--list-simulated", action="store_true",
                        help="list the built-in simulated topologies and exit")


def _document(args: argparse.Namespace) -> dict[str, object]:
    if args.simulated is not None:
        cluster = topology.builtin(args.simulated)
        if args.node_name is not None:
            if len(cluster.nodes) != 1:
                raise topology.TopologyError(
                    "--node-name", f"{args.simulated!r} has {len(cluster.nodes)} nodes; "
                    "renaming applies to single-node topologies only")
            cluster = dataclasses.replace(
                cluster, nodes=(dataclasses.replace(cluster.nodes[0], name=args.node_name),))
        return topology.dump_topology(cluster)
    return topology.node_document(discovery.discover_local_node(node_name=args.node_name))


def run(args: argparse.Namespace) -> int:
    if args.list_simulated:
        for name in topology.builtin_names():
            print(name)
        return 0
    if args.node_name is not None and not args.node_name.strip():
        print("faastube topology: --node-name: must not be empty", file=sys.stderr)
        return 2
    try:
        doc = _document(args)
    except discovery.NoGpuVisible as e:
        print(f"faastube topology: no GPU is visible on this machine ({e}); "
              "use --simulated NAME to print a simulated topology "
              "(--list-simulated lists them)", file=sys.stderr)
        return 1
    except topology.TopologyError as e:
        print(f"faastube topology: {e}", file=sys.stderr)
        return 2
    except discovery.DiscoveryError as e:
        print(f"faastube topology: discovery failed: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        yaml.safe_dump(doc, sys.stdout, sort_keys=False, default_flow_style=None, width=110)
    return 0
