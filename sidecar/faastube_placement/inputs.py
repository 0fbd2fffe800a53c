"""Reading placement inputs from files: the nodes (topology) and the current GPU usage.

``faastube place`` takes the same documents a cluster has: a ``kind: Topology`` file,
or what ``kubectl get gpunodes -o yaml`` prints (a ``List`` of ``GpuNode`` objects,
whose ``spec.topology`` holds one node each), or ``builtin:NAME`` for a simulated
topology. Usage is a small document of its own (documented in ``docs/placement.md``).
Every error names the file and the field path, so a user can fix the file at once.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from faastube.errors import InvalidRequest
from faastube_spec import documents, topology
from faastube_spec.topology import ClusterTopology, NodeTopology, TopologyError
from faastube_spec.units import UnitError, parse_size

from faastube_placement.core import GpuUsage

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_USAGE_FIELDS = {"node", "gpu", "memoryUsed", "slotsUsed"}


class InputError(InvalidRequest):
    """An input file is unreadable or invalid; the message names the file and field."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source, self.path, self.detail = source, path, message
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(str(path), "", f"cannot read: {e.strerror or e}") from e
    try:
        return documents.load_yaml(text)
    except (yaml.YAMLError, documents.DocumentInvalid) as e:
        raise InputError(str(path), "", f"not valid YAML/JSON: {e}") from e


def load_nodes(source: str) -> ClusterTopology:
    """A cluster from ``builtin:NAME``, a Topology file, or a GpuNode (list) file."""
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        try:
            return topology.builtin(name)
        except TopologyError as e:
            raise InputError(source, "", e.detail) from e
    path = Path(source)
    if not path.exists():
        hint = difflib.get_close_matches(path.stem, topology.builtin_names(), n=1)
        if hint:
            raise InputError(source, "", f"no such file; did you mean builtin:{hint[0]}? "
                                         f"(builtins: {', '.join(topology.builtin_names())})")
    doc = _load_yaml(path)
    try:
        return parse_nodes(doc)
    except TopologyError as e:
        raise InputError(str(path), e.path, e.detail) from e


def parse_nodes(doc: Any) -> ClusterTopology:
    """A cluster from a Topology document, one GpuNode, or a list of GpuNodes."""
    if not isinstance(doc, Mapping):
        raise TopologyError("", f"expected a mapping (kind Topology, GpuNode or List), "
                                f"got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind == "GpuNode":
        return ClusterTopology(nodes=(_gpunode(doc, ""),))
    if kind in ("List", "GpuNodeList"):
        items = doc.get("items")
        if not isinstance(items, list) or not items:
            raise TopologyError("items", "must be a non-empty list of GpuNode objects")
        nodes: list[NodeTopology] = []
        for i, item in enumerate(items):
            node = _gpunode(item, f"items[{i}]")
            if any(n.name == node.name for n in nodes):
                raise TopologyError(f"items[{i}].metadata.name", f"duplicate node {node.name!r}")
            nodes.append(node)
        return ClusterTopology(nodes=tuple(nodes))
    return topology.parse_topology(doc)


def _gpunode(doc: Any, path: str) -> NodeTopology:
    prefix = f"{path}." if path else ""
    if not isinstance(doc, Mapping) or doc.get("kind") != "GpuNode":
        raise TopologyError(path or "kind", "expected a GpuNode object")
    spec = doc.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("topology"), Mapping):
        raise TopologyError(f"{prefix}spec.topology", "required: the node's topology")
    node = topology.parse_node(spec["topology"], f"{prefix}spec.topology")
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if name is not None and name != node.name:
        raise TopologyError(f"{prefix}metadata.name",
                            f"{name!r} differs from spec.topology.name {node.name!r}")
    return node


def load_usage(path: str, cluster: ClusterTopology) -> dict[tuple[str, int], GpuUsage]:
    """Usage from a file: ``{usage: [{node, gpu, memoryUsed, slotsUsed}, ...]}``."""
    doc = _load_yaml(Path(path))
    try:
        return parse_usage(doc, cluster)
    except _UsageFieldError as e:
        raise InputError(path, e.path, e.message) from e


class _UsageFieldError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def parse_usage(doc: Any, cluster: ClusterTopology) -> dict[tuple[str, int], GpuUsage]:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or set(doc) - {"usage"}:
        raise _UsageFieldError("", "expected a mapping with one key, 'usage' (a list)")
    entries = doc.get("usage") or []
    if not isinstance(entries, list):
        raise _UsageFieldError("usage", f"must be a list, got {type(entries).__name__}")
    out: dict[tuple[str, int], GpuUsage] = {}
    for i, entry in enumerate(entries):
        path = f"usage[{i}]"
        if not isinstance(entry, Mapping):
            raise _UsageFieldError(path, "must be a mapping {node, gpu, memoryUsed, slotsUsed}")
        unknown = sorted(set(entry) - _USAGE_FIELDS)
        if unknown:
            raise _UsageFieldError(f"{path}.{unknown[0]}",
                                   f"unknown field; allowed: {', '.join(sorted(_USAGE_FIELDS))}")
        node_name = entry.get("node")
        if not isinstance(node_name, str):
            raise _UsageFieldError(f"{path}.node", "required: a node name")
        try:
            node = cluster.node(node_name)
        except KeyError:
            raise _UsageFieldError(f"{path}.node", f"no node {node_name!r} in the topology") from None
        gpu = entry.get("gpu")
        if isinstance(gpu, bool) or not isinstance(gpu, int):
            raise _UsageFieldError(f"{path}.gpu", f"required: a GPU index, got {gpu!r}")
        if not node.has_gpu(gpu):
            raise _UsageFieldError(f"{path}.gpu", f"node {node_name!r} has no GPU {gpu}")
        try:
            memory = parse_size(entry.get("memoryUsed", 0))
        except UnitError as e:
            raise _UsageFieldError(f"{path}.memoryUsed", str(e)) from e
        slots = entry.get("slotsUsed", 0)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise _UsageFieldError(f"{path}.slotsUsed", f"must be an integer >= 0, got {slots!r}")
        if (node_name, gpu) in out:
            raise _UsageFieldError(path, f"duplicate entry for node {node_name!r} GPU {gpu}")
        out[(node_name, gpu)] = GpuUsage(memory_used_bytes=memory, slots_used=slots)
    return out
