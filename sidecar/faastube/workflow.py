"""The Workflow document: a DAG of functions and the data passed along its edges.

One file describes a workflow for every consumer: ``faastube run`` executes it
locally, the operator reads the same document as a ``Workflow`` custom resource,
and placement and bandwidth sharing use its sizes and SLOs. So validation lives
here, once, and reports *every* problem with the field path that holds it
(``spec.edges[1].to: unknown function 'detect'``): a user fixing a YAML file
should not have to rerun it once per typo. Unknown fields are errors, because a
misspelt optional field (``replica: 4``) would otherwise be silently ignored.

The format is documented in ``docs/workflow.md``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from faastube.errors import InvalidRequest
from faastube.units import UnitError, format_duration, format_size, parse_duration, parse_size

logger = logging.getLogger(__name__)

__all__ = [
    "API_VERSION",
    "DEFAULT_GPU_MEMORY_BYTES",
    "KIND",
    "EdgeSpec",
    "FieldError",
    "FunctionSpec",
    "UnitError",
    "Workflow",
    "WorkflowInvalid",
    "dump_workflow",
    "load_workflow",
    "parse_duration",
    "parse_size",
    "parse_workflow",
]

API_VERSION = "faastube.io/v1alpha1"
KIND = "Workflow"
# `gpu: true` asks for this much pool-visible GPU memory.
DEFAULT_GPU_MEMORY_BYTES = 2**30

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL_MAX = 63
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_HANDLER = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}$")

_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
# Kubernetes ObjectMeta: a Workflow read back from the API server carries these.
_METADATA_FIELDS = (
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers",
    "ownerReferences", "managedFields", "generateName", "selfLink",
)
_SPEC_FIELDS = ("slo", "entry", "exit", "functions", "edges")
_FUNCTION_FIELDS = ("name", "handler", "image", "gpu", "replicas", "slo", "computeTime")
_GPU_FIELDS = ("memory", "enabled")
_EDGE_FIELDS = ("from", "to", "size")


@dataclass(frozen=True)
class FieldError:
    """One problem in a document, at a path like ``spec.functions[2].name``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class WorkflowInvalid(InvalidRequest):
    """The document is not a valid Workflow; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError], *, source: str | None = None) -> None:
        self.errors: list[FieldError] = list(errors)
        self.source = source
        head = f"invalid workflow{f' {source}' if source else ''}"
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{head} ({len(self.errors)} error{'s' if len(self.errors) != 1 else ''}):\n{lines}")


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    handler: str
    image: str | None = None
    gpu: bool = False
    gpu_memory_bytes: int = 0
    replicas: int = 1
    slo_s: float | None = None
    compute_time_s: float | None = None

    @property
    def handler_module(self) -> str:
        return self.handler.partition(":")[0]

    @property
    def handler_function(self) -> str:
        return self.handler.partition(":")[2]


@dataclass(frozen=True)
class EdgeSpec:
    source: str
    target: str
    size_bytes: int


@dataclass(frozen=True)
class Workflow:
    name: str
    slo_s: float
    entry: str
    exit: str
    functions: tuple[FunctionSpec, ...]
    edges: tuple[EdgeSpec, ...]
    namespace: str | None = None
    # Where the document was loaded from: handlers' modules resolve next to it first.
    source_path: Path | None = field(default=None, compare=False)

    def function(self, name: str) -> FunctionSpec:
        for spec in self.functions:
            if spec.name == name:
                return spec
        raise KeyError(f"workflow {self.name!r} has no function {name!r}")

    def successors(self, name: str) -> tuple[str, ...]:
        self.function(name)
        return tuple(e.target for e in self.edges if e.source == name)

    def predecessors(self, name: str) -> tuple[str, ...]:
        self.function(name)
        return tuple(e.source for e in self.edges if e.target == name)

    def out_edges(self, name: str) -> tuple[EdgeSpec, ...]:
        self.function(name)
        return tuple(e for e in self.edges if e.source == name)

    def in_edges(self, name: str) -> tuple[EdgeSpec, ...]:
        self.function(name)
        return tuple(e for e in self.edges if e.target == name)

    def edge(self, source: str, target: str) -> EdgeSpec:
        for e in self.edges:
            if e.source == source and e.target == target:
                return e
        raise KeyError(f"workflow {self.name!r} has no edge {source} -> {target}")

    def topological_order(self) -> tuple[str, ...]:
        """Functions with every predecessor before them; ties keep document order."""
        order = _topological_order([f.name for f in self.functions],
                                   [(e.source, e.target) for e in self.edges])
        if order is None:  # parse_workflow rejects cycles; only a hand-built Workflow gets here
            raise InvalidRequest(f"workflow {self.name!r} has a cycle")
        return order

    @property
    def base_dir(self) -> Path | None:
        return None if self.source_path is None else self.source_path.parent


# --------------------------------------------------------------------------- parsing


class _Collector:
    """Accumulates FieldErrors so that one pass reports every problem."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def mapping(self, value: Any, path: str, *, allowed: Sequence[str]) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.add(path, f"keys must be strings, got {_type_name(key)} {key!r}")
            elif key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else \
                    f" (allowed: {', '.join(allowed)})"
                self.add(_join(path, key), f"unknown field{suggestion}")
        return value

    def string(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"must be a string, got {_type_name(value)}")
            return None
        if not value.strip():
            self.add(path, "must not be empty")
            return None
        return value

    def dns_label(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        if len(text) > _DNS1123_LABEL_MAX:
            self.add(path, f"{text!r} is {len(text)} characters long; at most {_DNS1123_LABEL_MAX}")
            return None
        if not _DNS1123_LABEL.match(text):
            self.add(path, f"{text!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
                           "starting and ending with a letter or digit)")
            return None
        return text

    def positive_duration(self, value: Any, path: str) -> float | None:
        try:
            seconds = parse_duration(value)
        except UnitError as e:
            self.add(path, str(e))
            return None
        if seconds <= 0:
            self.add(path, f"must be greater than zero, got {value!r}")
            return None
        return seconds

    def positive_size(self, value: Any, path: str) -> int | None:
        try:
            size_bytes = parse_size(value)
        except UnitError as e:
            self.add(path, str(e))
            return None
        if size_bytes <= 0:
            self.add(path, f"must be greater than zero, got {value!r}")
            return None
        return size_bytes


def parse_workflow(doc: Mapping[str, Any], *, source_path: str | os.PathLike[str] | None = None) -> Workflow:
    """Validate a Workflow document (YAML/JSON already loaded) and build the model.

    Raises ``WorkflowInvalid`` listing every problem found.
    """
    c = _Collector()
    source = None if source_path is None else str(source_path)
    top = c.mapping(doc, "", allowed=_TOP_FIELDS)
    if top is None:
        raise WorkflowInvalid(c.errors, source=source)

    api_version = top.get("apiVersion")
    if api_version != API_VERSION:
        c.add("apiVersion", f"must be {API_VERSION!r}, got {api_version!r}")
    kind = top.get("kind")
    if kind != KIND:
        c.add("kind", f"must be {KIND!r}, got {kind!r}")

    name: str | None = None
    namespace: str | None = None
    if "metadata" not in top:
        c.add("metadata", "required (with at least metadata.name)")
    else:
        metadata = c.mapping(top["metadata"], "metadata", allowed=_METADATA_FIELDS)
        if metadata is not None:
            if "name" not in metadata:
                c.add("metadata.name", "required")
            else:
                name = c.dns_label(metadata["name"], "metadata.name")
            if "namespace" in metadata:
                namespace = c.dns_label(metadata["namespace"], "metadata.namespace")

    if "spec" not in top:
        c.add("spec", "required")
        raise WorkflowInvalid(c.errors, source=source)
    spec = c.mapping(top["spec"], "spec", allowed=_SPEC_FIELDS)
    if spec is None:
        raise WorkflowInvalid(c.errors, source=source)

    slo_s: float | None = None
    if "slo" not in spec:
        c.add("spec.slo", "required: the end-to-end latency SLO, e.g. '800ms'")
    else:
        slo_s = c.positive_duration(spec["slo"], "spec.slo")

    functions = _parse_functions(c, spec.get("functions"), workflow_slo_s=slo_s)
    known = {f.name for f in functions}
    edges = _parse_edges(c, spec.get("edges", []), known=known)
    entry, exit_ = _check_graph(c, spec, functions, edges)

    if c.errors:
        raise WorkflowInvalid(c.errors, source=source)
    # Every None above added an error, so these hold here; the checks keep mypy honest.
    if name is None or slo_s is None or entry is None or exit_ is None:
        raise WorkflowInvalid([FieldError("", "internal: incomplete workflow")], source=source)
    return Workflow(
        name=name,
        slo_s=slo_s,
        entry=entry,
        exit=exit_,
        functions=tuple(functions),
        edges=tuple(edges),
        namespace=namespace,
        source_path=None if source_path is None else Path(source_path),
    )


def _parse_functions(c: _Collector, raw: Any, *, workflow_slo_s: float | None) -> list[FunctionSpec]:
    if raw is None:
        c.add("spec.functions", "required: a list of at least one function")
        return []
    if not isinstance(raw, list):
        c.add("spec.functions", f"must be a list, got {_type_name(raw)}")
        return []
    if not raw:
        c.add("spec.functions", "must list at least one function")
        return []
    functions: list[FunctionSpec] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"spec.functions[{i}]"
        spec = _parse_function(c, item, path, workflow_slo_s=workflow_slo_s)
        if spec is None:
            continue
        if spec.name in first_index:
            c.add(f"{path}.name", f"duplicate function name {spec.name!r} "
                                  f"(first at spec.functions[{first_index[spec.name]}])")
            continue
        first_index[spec.name] = i
        functions.append(spec)
    return functions


def _parse_function(c: _Collector, item: Any, path: str, *,
                    workflow_slo_s: float | None) -> FunctionSpec | None:
    fn = c.mapping(item, path, allowed=_FUNCTION_FIELDS)
    if fn is None:
        return None
    before = len(c.errors)

    name = None
    if "name" not in fn:
        c.add(f"{path}.name", "required")
    else:
        name = c.dns_label(fn["name"], f"{path}.name")

    handler = None
    if "handler" not in fn:
        c.add(f"{path}.handler", "required: 'module:function', e.g. 'functions:decode'")
    else:
        handler = c.string(fn["handler"], f"{path}.handler")
        if handler is not None and not _HANDLER.match(handler):
            c.add(f"{path}.handler", f"{handler!r} is not 'module:function' "
                                     "(e.g. 'functions:decode' or 'pkg.mod:fn')")

    image = None
    if "image" in fn:
        image = c.string(fn["image"], f"{path}.image")
        if image is not None and any(ch.isspace() for ch in image):
            c.add(f"{path}.image", f"{image!r} contains whitespace")

    gpu, gpu_memory_bytes = _parse_gpu(c, fn.get("gpu", False), f"{path}.gpu")

    replicas = 1
    if "replicas" in fn:
        raw_replicas = fn["replicas"]
        if isinstance(raw_replicas, bool) or not isinstance(raw_replicas, int):
            c.add(f"{path}.replicas", f"must be an integer, got {_type_name(raw_replicas)}")
        elif raw_replicas < 1:
            c.add(f"{path}.replicas", f"must be at least 1, got {raw_replicas}")
        else:
            replicas = raw_replicas

    slo_s = c.positive_duration(fn["slo"], f"{path}.slo") if "slo" in fn else None
    compute_time_s = (c.positive_duration(fn["computeTime"], f"{path}.computeTime")
                      if "computeTime" in fn else None)
    # Bandwidth sharing gives each function data_size / (slo - compute time): it must be positive.
    if compute_time_s is not None:
        if slo_s is not None and compute_time_s >= slo_s:
            c.add(f"{path}.computeTime", f"{format_duration(compute_time_s)} leaves no time for data "
                                         f"passing within the function's slo {format_duration(slo_s)}")
        elif workflow_slo_s is not None and compute_time_s >= workflow_slo_s:
            c.add(f"{path}.computeTime", f"{format_duration(compute_time_s)} is not below the "
                                         f"workflow's spec.slo {format_duration(workflow_slo_s)}")
    if slo_s is not None and workflow_slo_s is not None and slo_s > workflow_slo_s:
        c.add(f"{path}.slo", f"{format_duration(slo_s)} exceeds the workflow's spec.slo "
                             f"{format_duration(workflow_slo_s)}")

    if len(c.errors) != before or name is None or handler is None:
        # Keep a named function in the graph checks so that edges to it are not reported as unknown.
        if name is not None:
            return FunctionSpec(name=name, handler=handler or "invalid:invalid")
        return None
    return FunctionSpec(name=name, handler=handler, image=image, gpu=gpu,
                        gpu_memory_bytes=gpu_memory_bytes, replicas=replicas,
                        slo_s=slo_s, compute_time_s=compute_time_s)


def _parse_gpu(c: _Collector, raw: Any, path: str) -> tuple[bool, int]:
    if isinstance(raw, bool):
        return raw, (DEFAULT_GPU_MEMORY_BYTES if raw else 0)
    gpu = c.mapping(raw, path, allowed=_GPU_FIELDS) if isinstance(raw, Mapping) else None
    if gpu is None:
        if not isinstance(raw, Mapping):
            c.add(path, f"must be true, false or a mapping like {{memory: 8Gi}}, got {_type_name(raw)}")
        return False, 0
    enabled = gpu.get("enabled", True)
    if not isinstance(enabled, bool):
        c.add(f"{path}.enabled", f"must be true or false, got {_type_name(enabled)}")
        return False, 0
    if not enabled:
        if "memory" in gpu:
            c.add(f"{path}.memory", "GPU memory on a CPU function (gpu.enabled is false): "
                                    "remove memory or enable the GPU")
        return False, 0
    if "memory" not in gpu:
        return True, DEFAULT_GPU_MEMORY_BYTES
    memory_bytes = c.positive_size(gpu["memory"], f"{path}.memory")
    return True, memory_bytes or 0


def _parse_edges(c: _Collector, raw: Any, *, known: set[str]) -> list[EdgeSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        c.add("spec.edges", f"must be a list, got {_type_name(raw)}")
        return []
    edges: list[EdgeSpec] = []
    first_index: dict[tuple[str, str], int] = {}
    for i, item in enumerate(raw):
        path = f"spec.edges[{i}]"
        edge = c.mapping(item, path, allowed=_EDGE_FIELDS)
        if edge is None:
            continue
        ends: list[str | None] = []
        for key in ("from", "to"):
            if key not in edge:
                c.add(f"{path}.{key}", "required")
                ends.append(None)
                continue
            end = c.string(edge[key], f"{path}.{key}")
            if end is not None and end not in known:
                hint = difflib.get_close_matches(end, sorted(known), n=1)
                c.add(f"{path}.{key}", f"unknown function {end!r}"
                                       + (f" (did you mean {hint[0]!r}?)" if hint else ""))
                end = None
            ends.append(end)
        size_bytes = None
        if "size" not in edge:
            c.add(f"{path}.size", "required: the bytes passed on this edge, e.g. '130MB'")
        else:
            size_bytes = c.positive_size(edge["size"], f"{path}.size")
        source, target = ends
        if source is None or target is None:
            continue
        if source == target:
            c.add(path, f"self-edge {source} -> {target}")
            continue
        if (source, target) in first_index:
            c.add(path, f"duplicate edge {source} -> {target} "
                        f"(first at spec.edges[{first_index[source, target]}])")
            continue
        first_index[source, target] = i
        # A bad size is reported above; keep the edge so the graph checks still see it.
        edges.append(EdgeSpec(source, target, size_bytes or 0))
    return edges


def _check_graph(c: _Collector, spec: Mapping[str, Any], functions: list[FunctionSpec],
                 edges: list[EdgeSpec]) -> tuple[str | None, str | None]:
    """Cycles, entry and exit, reachability. Returns (entry, exit), None where invalid."""
    names = [f.name for f in functions]
    known = set(names)
    pairs = [(e.source, e.target) for e in edges]
    explicit: dict[str, str | None] = {}
    for key in ("entry", "exit"):
        if key in spec:
            value = c.string(spec[key], f"spec.{key}")
            if value is not None and value not in known:
                c.add(f"spec.{key}", f"unknown function {value!r}")
                value = None
            explicit[key] = value
    if not names:
        return None, None

    cycles = _find_cycles(names, pairs)
    for cycle in cycles:
        c.add("spec.edges", "cycle " + " -> ".join(cycle + [cycle[0]]))
    if cycles:
        # Entry, exit and reachability are ill-defined on a cyclic graph; the cycle is the error.
        return None, None

    sources = [n for n in names if not any(t == n for _, t in pairs)]
    sinks = [n for n in names if not any(s == n for s, _ in pairs)]
    entry = _pick_end(c, "entry", explicit, ends=sources, pairs=pairs, incoming=True)
    exit_ = _pick_end(c, "exit", explicit, ends=sinks, pairs=pairs, incoming=False)

    if entry is not None:
        reached = _reachable(entry, pairs)
        for n in names:
            if n not in reached:
                c.add(f"spec.functions[{_index_of(functions, n)}]",
                      f"function {n!r} is not reachable from the entry {entry!r}")
    if exit_ is not None:
        reaching = _reachable(exit_, [(t, s) for s, t in pairs])
        for n in names:
            if n not in reaching:
                c.add(f"spec.functions[{_index_of(functions, n)}]",
                      f"function {n!r} does not lead to the exit {exit_!r}")
    return entry, exit_


def _pick_end(c: _Collector, key: str, explicit: Mapping[str, str | None], *, ends: list[str],
              pairs: list[tuple[str, str]], incoming: bool) -> str | None:
    direction = "incoming" if incoming else "outgoing"
    if key in explicit:
        chosen = explicit[key]
        if chosen is None:
            return None
        if chosen not in ends:
            others = sorted({s for s, t in pairs if t == chosen} if incoming
                            else {t for s, t in pairs if s == chosen})
            c.add(f"spec.{key}", f"{chosen!r} has {direction} edges "
                                 f"({'from' if incoming else 'to'} {', '.join(others)}); "
                                 f"the {key} must have none")
            return None
        return chosen
    if len(ends) == 1:
        return ends[0]
    if not ends:
        c.add(f"spec.{key}", f"no function without {direction} edges")
    else:
        c.add(f"spec.{key}", f"ambiguous: several functions have no {direction} edges "
                             f"({', '.join(ends)}); set spec.{key} or connect them")
    return None


def _index_of(functions: list[FunctionSpec], name: str) -> int:
    return next(i for i, f in enumerate(functions) if f.name == name)


def _reachable(start: str, pairs: list[tuple[str, str]]) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        for s, t in pairs:
            if s == node and t not in seen:
                seen.add(t)
                stack.append(t)
    return seen


def _find_cycles(names: list[str], pairs: list[tuple[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, in document order."""
    succ: dict[str, list[str]] = {n: [] for n in names}
    for s, t in pairs:
        succ[s].append(t)
    cycles: list[list[str]] = []
    in_cycle: set[str] = set()
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    for root in names:
        if root in state:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        state[root] = 1
        while stack:
            node, i = stack[-1]
            if i < len(succ[node]):
                stack[-1] = (node, i + 1)
                nxt = succ[node][i]
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt):]
                    if not in_cycle.intersection(cycle):
                        cycles.append(cycle)
                        in_cycle.update(cycle)
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return cycles


def _topological_order(names: list[str], pairs: list[tuple[str, str]]) -> tuple[str, ...] | None:
    indegree = {n: 0 for n in names}
    for _, t in pairs:
        indegree[t] += 1
    order: list[str] = []
    ready = [n for n in names if indegree[n] == 0]
    while ready:
        node = ready.pop(0)
        order.append(node)
        for s, t in pairs:
            if s == node:
                indegree[t] -= 1
                if indegree[t] == 0:
                    ready.append(t)
        ready.sort(key=names.index)
    return tuple(order) if len(order) == len(names) else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


# --------------------------------------------------------------------------- files


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently overwrite."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            first = seen[key].start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first.line + 1})", key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_workflow(path: str | os.PathLike[str]) -> Workflow:
    """Read and validate a Workflow YAML (or JSON) file."""
    file_path = Path(path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkflowInvalid([FieldError("", f"cannot read {file_path}: {e.strerror or e}")],
                              source=str(file_path)) from e
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        raise WorkflowInvalid([FieldError("", f"not valid YAML: {e}")], source=str(file_path)) from e
    if len(docs) != 1:
        raise WorkflowInvalid([FieldError("", f"expected one YAML document, found {len(docs)}")],
                              source=str(file_path))
    workflow = parse_workflow(docs[0], source_path=file_path)
    logger.debug("loaded workflow %s from %s", workflow.name, file_path)
    return workflow


def dump_workflow(workflow: Workflow) -> dict[str, Any]:
    """The document form of a Workflow: ``parse_workflow(dump_workflow(w)) == w``."""
    metadata: dict[str, Any] = {"name": workflow.name}
    if workflow.namespace is not None:
        metadata["namespace"] = workflow.namespace
    functions: list[dict[str, Any]] = []
    for f in workflow.functions:
        item: dict[str, Any] = {"name": f.name, "handler": f.handler}
        if f.image is not None:
            item["image"] = f.image
        item["gpu"] = {"memory": format_size(f.gpu_memory_bytes)} if f.gpu else False
        item["replicas"] = f.replicas
        if f.slo_s is not None:
            item["slo"] = format_duration(f.slo_s)
        if f.compute_time_s is not None:
            item["computeTime"] = format_duration(f.compute_time_s)
        functions.append(item)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "slo": format_duration(workflow.slo_s),
            "entry": workflow.entry,
            "exit": workflow.exit,
            "functions": functions,
            "edges": [{"from": e.source, "to": e.target, "size": format_size(e.size_bytes)}
                      for e in workflow.edges],
        },
    }

