"""The Workflow document: a DAG of functions and the data passed along its edges.

One file describes a workflow for every consumer: ``faastube run`` executes it
locally, the operator reads the same document as a ``Workflow`` custom resource,
and placement and bandwidth sharing use its sizes and SLOs. So validation lives
here, once, and reports *every* problem with the field path that holds it
(``spec.edges[1].to: unknown function 'detect'``): a user fixing a YAML file
should not have to rerun it once per typo. Unknown fields are errors, because a
misspelt optional field (``replica: 4``) would otherwise be silently ignored.

Documents are untrusted (anyone who can write a file or a custom resource), so
every way in goes through ``faastube_spec.documents``' limits first (size, nesting,
values after alias expansion, string length, 64-bit integers); the checks here
are linear in the document's size, messages quote values through ``preview``
(never a whole value), and at most ``MAX_ERRORS_LISTED`` problems are listed.

The format is documented in ``docs/workflow.md``.
"""

from __future__ import annotations

import difflib
import heapq
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from faastube.errors import InvalidRequest

from faastube_spec import api, documents
from faastube_spec.documents import preview
from faastube_spec.units import (
    MAX_SIZE_BYTES,
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

logger = logging.getLogger(__name__)

__all__ = [
    "API_VERSION",
    "DEFAULT_BATCH_DELAY_FRACTION",
    "DEFAULT_GPU_MEMORY_BYTES",
    "DEFAULT_TARGET_CONCURRENCY",
    "GATEWAY_FUNCTION",
    "KIND",
    "DTYPE_BYTES",
    "MAX_BATCH_SIZE",
    "MAX_DIMS",
    "MAX_ERRORS_LISTED",
    "MAX_REPLICAS",
    "RESERVED_FUNCTION_NAMES",
    "BatchSpec",
    "EdgeSpec",
    "FieldError",
    "FunctionSpec",
    "UnitError",
    "Workflow",
    "WorkflowInvalid",
    "dump_workflow",
    "load_workflow",
    "loads_workflow",
    "parse_duration",
    "parse_size",
    "parse_workflow",
]

API_VERSION = api.API_VERSION
KIND = api.WORKFLOW_KIND
# `gpu: true` asks for this much pool-visible GPU memory.
DEFAULT_GPU_MEMORY_BYTES = 2**30
# The function name the workflow's gateway takes: its identity at the node's sidecar and the
# suffix of its Deployment and Service (`<workflow>-gateway`, as a function's are `<workflow>-<name>`).
GATEWAY_FUNCTION = "gateway"
# Names no function may take. The runtime's other reader names (`sdk.REQUEST_INPUT`,
# `sdk.GATEWAY_READER`) start with '$', so no DNS-1123 label can collide with them.
RESERVED_FUNCTION_NAMES = frozenset({GATEWAY_FUNCTION})
# A Deployment's replicas are a 32-bit integer in Kubernetes.
MAX_REPLICAS = 2**31 - 1
# Calls in flight (running or waiting) per replica that the autoscaler aims at: one, since a
# worker runs one call at a time; a batched function's default is its batch.maxSize (its
# replicas hold that many calls at once). `targetConcurrency` overrides either.
DEFAULT_TARGET_CONCURRENCY = 1.0
# The most requests one batched handler call may gather: the gateway keeps this many calls in
# flight per replica, each an open HTTP exchange.
MAX_BATCH_SIZE = 1024
# With `batch.maxDelay: auto`, a batched function waits at most this fraction of the time its SLO
# leaves after its compute time: `(slo - computeTime) / 10` (docs/workflow.md, "Batching").
DEFAULT_BATCH_DELAY_FRACTION = 0.1
# The dimensions an edge's `shape` may have: NumPy's limit, and what the gateway accepts.
MAX_DIMS = 32
# The element types an edge's `dtype` may name (NumPy's spelling) and their sizes: the plain
# numeric types the data plane stores.
DTYPE_BYTES: Mapping[str, int] = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2,
    "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
    "complex64": 8, "complex128": 16,
}
# A document can hold thousands of mistakes; the message lists this many and counts the rest.
MAX_ERRORS_LISTED = 100
# "Did you mean" compares a name with every candidate (~3 us each): this many comparisons
# per document (200 unknown names among 250 functions, or 5 among 10,000), then no more.
_SUGGESTION_BUDGET = 50_000

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
_SPEC_FIELDS = ("slo", "entry", "exit", "functions", "edges", "input")
_INPUT_FIELDS = ("shape", "dtype")
_FUNCTION_FIELDS = ("name", "handler", "image", "gpu", "replicas", "minReplicas", "maxReplicas",
                    "targetConcurrency", "slo", "computeTime", "batch")
_GPU_FIELDS = ("memory", "enabled")
_BATCH_FIELDS = ("maxSize", "maxDelay")
_EDGE_FIELDS = ("from", "to", "size", "shape", "dtype")


@dataclass(frozen=True)
class FieldError:
    """One problem in a document, at a path like ``spec.functions[2].name``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class WorkflowInvalid(InvalidRequest):
    """The document is not a valid Workflow; ``errors`` lists the problems found.

    ``errors`` holds at most ``MAX_ERRORS_LISTED`` of them; ``omitted`` counts the rest.
    """

    def __init__(self, errors: Sequence[FieldError], *, source: str | None = None,
                 omitted: int = 0) -> None:
        self.errors: list[FieldError] = list(errors)
        self.source = source
        self.omitted = omitted
        listed = self.errors[:MAX_ERRORS_LISTED]
        more = omitted + len(self.errors) - len(listed)
        total = len(self.errors) + omitted
        head = f"invalid workflow{f' {source}' if source else ''}"
        lines = "\n".join(f"  {e}" for e in listed)
        if more:
            lines += f"\n  ... and {more:,} more"
        super().__init__(f"{head} ({total:,} error{'s' if total != 1 else ''}):\n{lines}")


@dataclass(frozen=True)
class BatchSpec:
    """A function's dynamic batching: gather up to ``max_size`` queued calls into one handler
    call, waiting at most ``max_delay_s`` after the first (resolved from the SLO if not given)."""

    max_size: int
    max_delay_s: float


@dataclass(frozen=True)
class FunctionSpec:
    """One function of a workflow.

    ``replicas`` is the number it starts with. An autoscaled function (``minReplicas`` or
    ``maxReplicas`` in the document) has both bounds set here, with ``replicas`` between
    them; a function with fixed replicas has neither (``None``), and ``replica_range`` is
    ``(replicas, replicas)``.
    """

    name: str
    handler: str
    image: str | None = None
    gpu: bool = False
    gpu_memory_bytes: int = 0
    replicas: int = 1
    slo_s: float | None = None
    compute_time_s: float | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_concurrency: float = DEFAULT_TARGET_CONCURRENCY

    def __post_init__(self) -> None:
        # parse_workflow never builds these; a FunctionSpec built in code must not either.
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError(f"function {self.name!r}: give both min_replicas and max_replicas, or neither")
        low, high = self.replica_range
        if not 0 <= low <= self.replicas <= high or high < 1:
            raise ValueError(f"function {self.name!r}: replicas {self.replicas} outside "
                             f"[{low}, {high}] (or no replica ever)")
        if not self.target_concurrency > 0:
            raise ValueError(f"function {self.name!r}: target_concurrency must be positive")

    @property
    def autoscaled(self) -> bool:
        """Whether the replica count follows load (between ``min_replicas`` and ``max_replicas``)."""
        return self.max_replicas is not None

    @property
    def replica_range(self) -> tuple[int, int]:
        """The fewest and the most replicas this function may run."""
        if self.min_replicas is None or self.max_replicas is None:
            return self.replicas, self.replicas
        return self.min_replicas, self.max_replicas

    @property
    def reserved_replicas(self) -> int:
        """The replicas placement reserves GPU sharing slots and memory for: the most it may run."""
        return self.replica_range[1]
    batch: BatchSpec | None = None

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
    # What one request passes on this edge, when the document says (warm-up inputs are built
    # from them): both or neither, and then ``size_bytes`` is their product.
    shape: tuple[int, ...] | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class Workflow:
    name: str
    slo_s: float
    entry: str
    exit: str
    functions: tuple[FunctionSpec, ...]
    edges: tuple[EdgeSpec, ...]
    namespace: str | None = None
    # What one request's input is (``spec.input``), when the document says: the entry's warm-up call.
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    # Where the document was loaded from: handlers' modules resolve next to it first.
    source_path: Path | None = field(default=None, compare=False)

    def function(self, name: str) -> FunctionSpec:
        spec = self._index.functions.get(name)
        if spec is None:
            raise KeyError(f"workflow {self.name!r} has no function {preview(name)}")
        return spec

    def successors(self, name: str) -> tuple[str, ...]:
        return tuple(e.target for e in self.out_edges(name))

    def predecessors(self, name: str) -> tuple[str, ...]:
        return tuple(e.source for e in self.in_edges(name))

    def out_edges(self, name: str) -> tuple[EdgeSpec, ...]:
        self.function(name)
        return self._index.out_edges.get(name, ())

    def in_edges(self, name: str) -> tuple[EdgeSpec, ...]:
        self.function(name)
        return self._index.in_edges.get(name, ())

    def edge(self, source: str, target: str) -> EdgeSpec:
        found = self._index.edges.get((source, target))
        if found is None:
            raise KeyError(f"workflow {self.name!r} has no edge {preview(source)} -> {preview(target)}")
        return found

    def topological_order(self) -> tuple[str, ...]:
        """Functions with every predecessor before them; ties keep document order."""
        order = _topological_order([f.name for f in self.functions],
                                   [(e.source, e.target) for e in self.edges])
        if order is None:  # parse_workflow rejects cycles; only a hand-built Workflow gets here
            raise InvalidRequest(f"workflow {self.name!r} has a cycle")
        return order

    @cached_property
    def _index(self) -> _Index:
        # Built on first use and kept: lookups by name stay O(1) on 10,000-function workflows.
        out_edges: dict[str, list[EdgeSpec]] = {}
        in_edges: dict[str, list[EdgeSpec]] = {}
        for e in self.edges:
            out_edges.setdefault(e.source, []).append(e)
            in_edges.setdefault(e.target, []).append(e)
        return _Index(functions={f.name: f for f in self.functions},
                      out_edges={name: tuple(es) for name, es in out_edges.items()},
                      in_edges={name: tuple(es) for name, es in in_edges.items()},
                      edges={(e.source, e.target): e for e in self.edges})

    @property
    def base_dir(self) -> Path | None:
        return None if self.source_path is None else self.source_path.parent


@dataclass(frozen=True)
class _Index:
    functions: Mapping[str, FunctionSpec]
    out_edges: Mapping[str, tuple[EdgeSpec, ...]]
    in_edges: Mapping[str, tuple[EdgeSpec, ...]]
    edges: Mapping[tuple[str, str], EdgeSpec]


# --------------------------------------------------------------------------- parsing


class _Collector:
    """Accumulates FieldErrors so that one pass reports every problem (listing the first
    ``MAX_ERRORS_LISTED``), and rations "did you mean" so that it stays linear."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.count = 0
        self.suggestion_budget = _SUGGESTION_BUDGET

    def add(self, path: str, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(FieldError(path, message))

    @property
    def listing(self) -> bool:
        """Whether another error would be listed (past that, only the count matters)."""
        return len(self.errors) < MAX_ERRORS_LISTED

    def invalid(self, source: str | None) -> WorkflowInvalid:
        return WorkflowInvalid(self.errors, source=source, omitted=self.count - len(self.errors))

    def suggest(self, word: str, candidates: Sequence[str]) -> str | None:
        """The closest candidate, while comparisons are left in the document's budget."""
        if len(candidates) > self.suggestion_budget or len(word) > 2 * _DNS1123_LABEL_MAX:
            return None
        self.suggestion_budget -= len(candidates)
        hint = difflib.get_close_matches(word, candidates, n=1)
        return hint[0] if hint else None

    def mapping(self, value: Any, path: str, *, allowed: Sequence[str]) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.add(path, f"keys must be strings, got {_type_name(key)} {preview(key)}")
            elif key not in allowed:
                if not self.listing:
                    self.count += 1
                    continue
                hint = self.suggest(key, allowed)
                suggestion = f" (did you mean {hint!r}?)" if hint else \
                    f" (allowed: {', '.join(allowed)})"
                shown = key if len(key) <= 60 else f"{key[:40]}... ({len(key):,} characters)"
                self.add(_join(path, shown), f"unknown field{suggestion}")
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
            self.add(path, f"{preview(text)} is {len(text):,} characters long; at most {_DNS1123_LABEL_MAX}")
            return None
        if not _DNS1123_LABEL.match(text):
            fixed = text.lower().replace("_", "-").replace(".", "-")
            hint = f" (did you mean {fixed!r}?)" if _DNS1123_LABEL.match(fixed) else ""
            self.add(path, f"{text!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
                           f"starting and ending with a letter or digit){hint}")
            return None
        return text

    def positive_duration(self, value: Any, path: str) -> float | None:
        try:
            seconds = parse_duration(value)
        except UnitError as e:
            self.add(path, str(e))
            return None
        if seconds <= 0:
            self.add(path, f"must be greater than zero, got {preview(value)}")
            return None
        return seconds

    def positive_size(self, value: Any, path: str) -> int | None:
        try:
            size_bytes = parse_size(value)
        except UnitError as e:
            self.add(path, str(e))
            return None
        if size_bytes <= 0:
            self.add(path, f"must be greater than zero, got {preview(value)}")
            return None
        return size_bytes

    def duration(self, value: Any, path: str) -> float | None:
        """A duration that may be zero."""
        try:
            return parse_duration(value)
        except UnitError as e:
            self.add(path, str(e))
            return None

    def integer(self, value: Any, path: str, *, minimum: int, maximum: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"must be an integer, got {_type_name(value)}")
            return None
        if value < minimum:
            self.add(path, f"must be at least {minimum:,}, got {value:,}")
            return None
        if value > maximum:
            self.add(path, f"must be at most {maximum:,}, got {value:,}")
            return None
        return value


def parse_workflow(doc: Mapping[str, Any], *, source_path: str | os.PathLike[str] | None = None) -> Workflow:
    """Validate a Workflow document (YAML/JSON already loaded) and build the model.

    The document's size is checked first (``faastube_spec.documents.check_value``), so a
    Kubernetes object or a dict built in code meets the same limits as a file.
    Raises ``WorkflowInvalid`` listing the problems found.
    """
    source = None if source_path is None else str(source_path)
    try:
        documents.check_value(doc)
    except documents.DocumentInvalid as e:
        raise WorkflowInvalid([FieldError(e.path, e.message)], source=source) from e
    return _parse(doc, source=source, source_path=source_path)


def _parse(doc: Any, *, source: str | None, source_path: str | os.PathLike[str] | None) -> Workflow:
    """``parse_workflow`` on a document within ``documents``' limits (checked, or loaded by it)."""
    if not isinstance(doc, Mapping):
        raise WorkflowInvalid([FieldError("", f"expected a Workflow object (a mapping), "
                                              f"got {_type_name(doc)}")], source=source)
    c = _Collector()
    top = c.mapping(doc, "", allowed=_TOP_FIELDS)
    if top is None:
        raise c.invalid(source)

    api_version = top.get("apiVersion")
    if api_version != API_VERSION:
        c.add("apiVersion", f"must be {API_VERSION!r}, got {preview(api_version)}")
    kind = top.get("kind")
    if kind != KIND:
        c.add("kind", f"must be {KIND!r}, got {preview(kind)}")

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
        raise c.invalid(source)
    spec = c.mapping(top["spec"], "spec", allowed=_SPEC_FIELDS)
    if spec is None:
        raise c.invalid(source)

    slo_s: float | None = None
    if "slo" not in spec:
        c.add("spec.slo", "required: the end-to-end latency SLO, e.g. '800ms'")
    else:
        slo_s = c.positive_duration(spec["slo"], "spec.slo")

    functions, positions, rejected = _parse_functions(c, spec.get("functions"), workflow_slo_s=slo_s)
    edges, edges_dropped = _parse_edges(c, spec.get("edges", []), known=positions, rejected=rejected)
    input_shape, input_dtype = _parse_input(c, spec["input"]) if "input" in spec else (None, None)
    entry, exit_ = _check_graph(c, spec, functions, edges, positions=positions,
                                complete=not rejected and not edges_dropped)

    if c.count:
        raise c.invalid(source)
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
        input_shape=input_shape,
        input_dtype=input_dtype,
        source_path=None if source_path is None else Path(source_path),
    )


def _parse_input(c: _Collector, raw: Any) -> tuple[tuple[int, ...] | None, str | None]:
    """``spec.input: {shape, dtype}``: what a request sends (both required)."""
    if not isinstance(raw, Mapping):
        c.add("spec.input", f"must be a mapping like {{shape: [21, 270, 480, 3], dtype: uint8}}, "
                            f"got {_type_name(raw)}")
        return None, None
    fields = c.mapping(raw, "spec.input", allowed=_INPUT_FIELDS)
    if fields is None:
        return None, None
    for key in _INPUT_FIELDS:
        if key not in fields:
            c.add(f"spec.input.{key}", "required")
    shape = _parse_shape(c, fields["shape"], "spec.input.shape") if "shape" in fields else None
    dtype = _parse_dtype(c, fields["dtype"], "spec.input.dtype") if "dtype" in fields else None
    if shape is not None and dtype is not None and math.prod(shape) * DTYPE_BYTES[dtype] > MAX_SIZE_BYTES:
        c.add("spec.input.shape", f"{_shape_text(shape)} of {dtype} is more than {MAX_SIZE_BYTES:,} bytes")
        return None, None
    return (shape, dtype) if shape is not None and dtype is not None else (None, None)


def _parse_functions(c: _Collector, raw: Any, *, workflow_slo_s: float | None
                     ) -> tuple[list[FunctionSpec], dict[str, int], set[str]]:
    """The functions, each name's index in ``spec.functions`` (the paths of graph errors), and
    the names of functions rejected with an error (edges naming them add none of their own)."""
    if raw is None:
        c.add("spec.functions", "required: a list of at least one function")
        return [], {}, set()
    if not isinstance(raw, list):
        c.add("spec.functions", f"must be a list, got {_type_name(raw)}")
        return [], {}, set()
    if not raw:
        c.add("spec.functions", "must list at least one function")
        return [], {}, set()
    functions: list[FunctionSpec] = []
    first_index: dict[str, int] = {}
    rejected: set[str] = set()
    for i, item in enumerate(raw):
        path = f"spec.functions[{i}]"
        spec = _parse_function(c, item, path, workflow_slo_s=workflow_slo_s)
        if spec is None:
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                rejected.add(item["name"])
            continue
        if spec.name in first_index:
            c.add(f"{path}.name", f"duplicate function name {spec.name!r} "
                                  f"(first at spec.functions[{first_index[spec.name]}])")
            continue
        first_index[spec.name] = i
        functions.append(spec)
    return functions, first_index, rejected - first_index.keys()


def _parse_function(c: _Collector, item: Any, path: str, *,
                    workflow_slo_s: float | None) -> FunctionSpec | None:
    fn = c.mapping(item, path, allowed=_FUNCTION_FIELDS)
    if fn is None:
        return None
    before = c.count

    name = None
    if "name" not in fn:
        c.add(f"{path}.name", "required")
    else:
        name = c.dns_label(fn["name"], f"{path}.name")
        if name in RESERVED_FUNCTION_NAMES:
            c.add(f"{path}.name", f"{name!r} is reserved: the workflow's gateway has that name "
                                  "(at the sidecar and in its Deployment's name); choose another")

    handler = None
    if "handler" not in fn:
        c.add(f"{path}.handler", "required: 'module:function', e.g. 'functions:decode'")
    else:
        handler = c.string(fn["handler"], f"{path}.handler")
        if handler is not None and not _HANDLER.match(handler):
            c.add(f"{path}.handler", f"{preview(handler)} is not 'module:function' "
                                     "(e.g. 'functions:decode' or 'pkg.mod:fn')")

    image = None
    if "image" in fn:
        image = c.string(fn["image"], f"{path}.image")
        if image is not None and any(ch.isspace() for ch in image):
            c.add(f"{path}.image", f"{preview(image)} contains whitespace")

    gpu, gpu_memory_bytes = _parse_gpu(c, fn.get("gpu", False), f"{path}.gpu")

    replicas, min_replicas, max_replicas, target_concurrency = _parse_scaling(c, fn, path)

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

    batch = (_parse_batch(c, fn["batch"], f"{path}.batch", slo_s=slo_s, workflow_slo_s=workflow_slo_s,
                          compute_time_s=compute_time_s)
             if "batch" in fn else None)

    if batch is not None and "targetConcurrency" not in fn:
        # A batching replica holds batch.maxSize calls at once: that is its capacity.
        target_concurrency = float(batch.max_size)

    if c.count != before or name is None or handler is None:
        # Keep a named function in the graph checks so that edges to it are not reported as unknown.
        if name is not None:
            return FunctionSpec(name=name, handler=handler or "invalid:invalid")
        return None
    return FunctionSpec(name=name, handler=handler, image=image, gpu=gpu,
                        gpu_memory_bytes=gpu_memory_bytes, replicas=replicas,
                        slo_s=slo_s, compute_time_s=compute_time_s, min_replicas=min_replicas,
                        max_replicas=max_replicas, target_concurrency=target_concurrency, batch=batch)


def _parse_scaling(c: _Collector, fn: Mapping[str, Any],
                   path: str) -> tuple[int, int | None, int | None, float]:
    """``replicas``, ``minReplicas``, ``maxReplicas`` and ``targetConcurrency`` of a function.

    Without ``minReplicas`` and ``maxReplicas`` the function runs ``replicas`` (default 1)
    replicas, fixed. With either, it is autoscaled: ``minReplicas`` defaults to 1 (scaling to
    zero is asked for with ``minReplicas: 0``), ``replicas`` (the count it starts with) to
    ``max(1, minReplicas)``, and ``maxReplicas`` to ``max(replicas, minReplicas)``.
    Returns (replicas, min, max, target); min and max are None for a fixed function, and
    values are defaults where a field was invalid (an error is then recorded).
    """
    raw_min = fn.get("minReplicas")
    zero_ok = raw_min == 0 and not isinstance(raw_min, bool)  # only minReplicas: 0 lets a function start at 0
    given: dict[str, int | None] = {}
    for key, lowest in (("replicas", 0 if zero_ok else 1), ("minReplicas", 0), ("maxReplicas", 1)):
        if key in fn:
            given[key] = _replica_count(c, fn[key], f"{path}.{key}", lowest=lowest,
                                        zero_hint=key == "replicas")
    target = DEFAULT_TARGET_CONCURRENCY
    if "targetConcurrency" in fn:
        target = _positive_number(c, fn["targetConcurrency"], f"{path}.targetConcurrency") or target
    autoscaled = "minReplicas" in fn or "maxReplicas" in fn
    if not autoscaled and "targetConcurrency" in fn:
        c.add(f"{path}.targetConcurrency", "only with minReplicas or maxReplicas: a function with "
                                           "fixed replicas does not scale")
    counts = {key: value for key, value in given.items() if value is not None}
    if not autoscaled or len(counts) < len(given):  # fixed, or a bad count (reported above)
        return counts.get("replicas", 1), None, None, target
    low = counts.get("minReplicas", 1)
    replicas = counts.get("replicas", max(1, low))
    high = counts.get("maxReplicas", max(replicas, low))
    if high < low:
        c.add(f"{path}.maxReplicas", f"must be at least minReplicas ({low}), got {high}")
        return 1, None, None, target
    if not low <= replicas <= high:
        c.add(f"{path}.replicas", f"must lie within minReplicas..maxReplicas ({low}..{high}), "
                                  f"got {replicas}")
        return 1, None, None, target
    return replicas, low, high, target


def _replica_count(c: _Collector, raw: Any, path: str, *, lowest: int,
                   zero_hint: bool = False) -> int | None:
    """A replica count: an integer from ``lowest`` to ``MAX_REPLICAS``, or None (reported)."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        c.add(path, f"must be an integer, got {_type_name(raw)}")
        return None
    if raw < lowest:
        hint = " (0 only with minReplicas: 0, to start scaled to zero)" if zero_hint and raw == 0 else ""
        c.add(path, f"must be at least {lowest}, got {raw}{hint}")
        return None
    if raw > MAX_REPLICAS:
        c.add(path, f"must be at most {MAX_REPLICAS:,} (a Deployment's limit), got {raw:,}")
        return None
    return raw


def _positive_number(c: _Collector, raw: Any, path: str) -> float | None:
    """A finite number greater than zero (an integer or a float; not a string or a boolean)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        c.add(path, f"must be a number, got {_type_name(raw)}")
        return None
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        c.add(path, f"must be a finite number greater than zero, got {preview(raw)}")
        return None
    return value


def _parse_batch(c: _Collector, raw: Any, path: str, *, slo_s: float | None, workflow_slo_s: float | None,
                 compute_time_s: float | None) -> BatchSpec | None:
    """``{maxSize: N, maxDelay: <duration> | auto}``.

    Without ``maxDelay`` a batch never waits: it takes what queued while the previous one
    ran (opportunistic batching: no latency added to a request that finds the worker idle).
    ``auto`` waits up to a tenth of what the SLO leaves: the function's own SLO, else the
    workflow's, minus its computeTime (0 when not given). A wait must fit in what it leaves.
    """
    if not isinstance(raw, Mapping):
        c.add(path, f"must be a mapping like {{maxSize: 8, maxDelay: 5ms}}, got {_type_name(raw)}")
        return None
    batch = c.mapping(raw, path, allowed=_BATCH_FIELDS)
    if batch is None:
        return None
    max_size = None
    if "maxSize" not in batch:
        c.add(f"{path}.maxSize", "required: the most queued requests one handler call gathers, e.g. 8")
    else:
        max_size = c.integer(batch["maxSize"], f"{path}.maxSize", minimum=1, maximum=MAX_BATCH_SIZE)
    slo_of, slo_name = (slo_s, "the function's slo") if slo_s is not None else \
        (workflow_slo_s, "the workflow's spec.slo")
    left_s = None if slo_of is None else slo_of - (compute_time_s or 0.0)
    max_delay_s: float | None = 0.0
    if batch.get("maxDelay") == "auto":
        if left_s is not None and left_s > 0:
            # In whole microseconds, as the document would spell it (so it dumps as "26ms", not "26000us").
            delay_us = round(left_s * DEFAULT_BATCH_DELAY_FRACTION * 1e6)
            max_delay_s = parse_duration(f"{delay_us // 1000}ms" if delay_us % 1000 == 0 else f"{delay_us}us")
        else:
            max_delay_s = None  # the SLO or computeTime is in error, reported where it is
    elif "maxDelay" in batch:
        max_delay_s = c.duration(batch["maxDelay"], f"{path}.maxDelay")
        if max_delay_s is not None and left_s is not None and left_s > 0 and max_delay_s >= left_s:
            spent = "" if compute_time_s is None else f" after its computeTime {format_duration(compute_time_s)}"
            c.add(f"{path}.maxDelay", f"{format_duration(max_delay_s)} of waiting does not fit in what "
                                      f"{slo_name} {format_duration(slo_of or 0.0)} leaves{spent} "
                                      f"({format_duration(left_s)})")
            return None
    if max_size is None or max_delay_s is None:
        return None
    return BatchSpec(max_size=max_size, max_delay_s=max_delay_s)


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


def _parse_edges(c: _Collector, raw: Any, *, known: Mapping[str, int],
                 rejected: Set[str] = frozenset()) -> tuple[list[EdgeSpec], bool]:
    """The edges, and whether any was dropped for an error (then the graph is incomplete)."""
    if raw is None:
        return [], False
    if not isinstance(raw, list):
        c.add("spec.edges", f"must be a list, got {_type_name(raw)}")
        return [], True
    edges: list[EdgeSpec] = []
    dropped = False
    first_index: dict[tuple[str, str], int] = {}
    candidates: list[str] | None = None  # sorted function names, for suggestions; made once
    for i, item in enumerate(raw):
        path = f"spec.edges[{i}]"
        edge = c.mapping(item, path, allowed=_EDGE_FIELDS)
        if edge is None:
            dropped = True
            continue
        ends: list[str | None] = []
        for key in ("from", "to"):
            if key not in edge:
                c.add(f"{path}.{key}", "required")
                ends.append(None)
                continue
            end = c.string(edge[key], f"{path}.{key}")
            if end is not None and end in rejected:
                end = None  # the function's own error says what is wrong with it
            elif end is not None and end not in known:
                hint = None
                if c.listing:
                    if candidates is None:
                        candidates = sorted(known)
                    hint = c.suggest(end, candidates)
                c.add(f"{path}.{key}", f"unknown function {preview(end)}"
                                       + (f" (did you mean {hint!r}?)" if hint else ""))
                end = None
            ends.append(end)
        size_bytes, shape, dtype = _parse_edge_data(c, edge, path)
        source, target = ends
        if source is None or target is None:
            dropped = True
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
        edges.append(EdgeSpec(source, target, size_bytes or 0, shape=shape, dtype=dtype))
    return edges, dropped


def _parse_edge_data(c: _Collector, edge: Mapping[str, Any],
                     path: str) -> tuple[int | None, tuple[int, ...] | None, str | None]:
    """(size, shape, dtype) of an edge: a size, or a shape and a dtype (then the size is theirs), or all
    three if they agree."""
    shape = _parse_shape(c, edge["shape"], f"{path}.shape") if "shape" in edge else None
    dtype = _parse_dtype(c, edge["dtype"], f"{path}.dtype") if "dtype" in edge else None
    if "shape" in edge and "dtype" not in edge:
        c.add(f"{path}.dtype", "required with shape: the element type, e.g. 'float32'")
    if "dtype" in edge and "shape" not in edge:
        c.add(f"{path}.shape", "required with dtype: the dimensions, e.g. [21, 3, 736, 736]")
    derived = None
    if shape is not None and dtype is not None:
        derived = math.prod(shape) * DTYPE_BYTES[dtype]
        if derived > MAX_SIZE_BYTES:
            c.add(f"{path}.shape", f"{_shape_text(shape)} of {dtype} is {derived:,} bytes, "
                                   f"more than {MAX_SIZE_BYTES:,} (2**63 - 1)")
            derived = None
    if "size" not in edge:
        if "shape" not in edge and "dtype" not in edge:
            c.add(f"{path}.size", "required: the bytes passed on this edge, e.g. '130MB' "
                                  "(or give its shape and dtype)")
        return derived, (shape if derived else None), (dtype if derived else None)
    size_bytes = c.positive_size(edge["size"], f"{path}.size")
    if size_bytes is not None and derived is not None and size_bytes != derived:
        c.add(f"{path}.size", f"{size_bytes:,} bytes, but shape {_shape_text(shape or ())} of {dtype} is "
                              f"{derived:,} bytes; fix one, or leave size out")
    return size_bytes, (shape if derived else None), (dtype if derived else None)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _parse_shape(c: _Collector, raw: Any, path: str) -> tuple[int, ...] | None:
    if not isinstance(raw, list):
        c.add(path, f"must be a list of dimensions like [21, 3, 736, 736], got {_type_name(raw)}")
        return None
    if len(raw) > MAX_DIMS:
        c.add(path, f"has {len(raw):,} dimensions; at most {MAX_DIMS}")
        return None
    dims: list[int] = []
    for i, d in enumerate(raw):
        if isinstance(d, bool) or not isinstance(d, int):
            c.add(f"{path}[{i}]", f"must be an integer, got {_type_name(d)}")
        elif d < 1:
            c.add(f"{path}[{i}]", f"must be at least 1, got {d:,}")
        else:
            dims.append(d)
    return tuple(dims) if len(dims) == len(raw) else None


def _parse_dtype(c: _Collector, raw: Any, path: str) -> str | None:
    text = c.string(raw, path)
    if text is None:
        return None
    if text not in DTYPE_BYTES:
        hint = c.suggest(text, list(DTYPE_BYTES))
        c.add(path, f"unknown dtype {preview(text)}; use one of {', '.join(DTYPE_BYTES)}"
                    + (f" (did you mean {hint!r}?)" if hint else ""))
        return None
    return text


def _check_graph(c: _Collector, spec: Mapping[str, Any], functions: list[FunctionSpec],
                 edges: list[EdgeSpec], *, positions: Mapping[str, int],
                 complete: bool = True) -> tuple[str | None, str | None]:
    """Cycles, entry and exit, reachability, in time linear in functions + edges.

    Returns (entry, exit), None where invalid. When an edge or a function was dropped for an
    error (``complete`` false), which functions are ends or reachable is not known: those
    checks would only echo that error, so they are skipped.
    """
    names = [f.name for f in functions]
    explicit: dict[str, str | None] = {}
    for key in ("entry", "exit"):
        if key in spec:
            value = c.string(spec[key], f"spec.{key}")
            if value is not None and value not in positions:
                c.add(f"spec.{key}", f"unknown function {preview(value)}")
                value = None
            explicit[key] = value
    if not names:
        return None, None

    successors: dict[str, list[str]] = {n: [] for n in names}
    predecessors: dict[str, list[str]] = {n: [] for n in names}
    for e in edges:
        successors[e.source].append(e.target)
        predecessors[e.target].append(e.source)

    cycles = _find_cycles(names, successors)
    for cycle in cycles:
        c.add("spec.edges", "cycle " + _cycle_text(cycle))
    if cycles or not complete:
        # Entry, exit and reachability are ill-defined on a cyclic or partial graph; the cycle
        # (or the dropped edge's or function's error) is the error.
        return None, None

    sources = [n for n in names if not predecessors[n]]
    sinks = [n for n in names if not successors[n]]
    entry = _pick_end(c, "entry", explicit, ends=sources, neighbours=predecessors, incoming=True)
    exit_ = _pick_end(c, "exit", explicit, ends=sinks, neighbours=successors, incoming=False)

    if entry is not None:
        reached = _reachable(entry, successors)
        for n in names:
            if n not in reached:
                c.add(f"spec.functions[{positions[n]}]",
                      f"function {n!r} is not reachable from the entry {entry!r}")
    if exit_ is not None:
        reaching = _reachable(exit_, predecessors)
        for n in names:
            if n not in reaching:
                c.add(f"spec.functions[{positions[n]}]",
                      f"function {n!r} does not lead to the exit {exit_!r}")
    return entry, exit_


def _pick_end(c: _Collector, key: str, explicit: Mapping[str, str | None], *, ends: list[str],
              neighbours: Mapping[str, list[str]], incoming: bool) -> str | None:
    direction = "incoming" if incoming else "outgoing"
    if key in explicit:
        chosen = explicit[key]
        if chosen is None:
            return None
        if neighbours[chosen]:
            c.add(f"spec.{key}", f"{chosen!r} has {direction} edges "
                                 f"({'from' if incoming else 'to'} {_listing(sorted(neighbours[chosen]))}); "
                                 f"the {key} must have none")
            return None
        return chosen
    if len(ends) == 1:
        return ends[0]
    if not ends:
        c.add(f"spec.{key}", f"no function without {direction} edges")
    else:
        c.add(f"spec.{key}", f"ambiguous: several functions have no {direction} edges "
                             f"({_listing(ends)}); set spec.{key} or connect them")
    return None


def _listing(names: Sequence[str], *, limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit:,} more"


def _cycle_text(cycle: list[str], *, limit: int = 12) -> str:
    if len(cycle) <= limit:
        return " -> ".join([*cycle, cycle[0]])
    skipped = len(cycle) - (limit - 2)
    return " -> ".join([*cycle[:limit - 3], f"... ({skipped:,} more)", *cycle[-1:], cycle[0]]) \
        + f" ({len(cycle):,} functions)"


def _reachable(start: str, neighbours: Mapping[str, Iterable[str]]) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        for nxt in neighbours[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _find_cycles(names: list[str], successors: Mapping[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, in the order a depth-first
    search from each function in document order meets them."""
    component = _components(names, successors)
    cycles: list[list[str]] = []
    reported: set[int] = set()
    state: dict[str, int] = {}  # 1 on the DFS path, 2 done
    position: dict[str, int] = {}  # index on the DFS path, while there
    for root in names:
        if root in state:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        state[root], position[root] = 1, 0
        while stack:
            node, i = stack[-1]
            if i < len(successors[node]):
                stack[-1] = (node, i + 1)
                nxt = successors[node][i]
                seen = state.get(nxt)
                if seen == 1:
                    if component[nxt] not in reported:  # the path from nxt back to it is a cycle
                        reported.add(component[nxt])
                        cycles.append(path[position[nxt]:])
                elif seen is None:
                    state[nxt], position[nxt] = 1, len(path)
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return cycles


def _components(names: list[str], successors: Mapping[str, list[str]]) -> dict[str, int]:
    """Strongly connected components (Tarjan's algorithm, iterative): function -> component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    component: dict[str, int] = {}
    found = 0
    for root in names:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work[-1]
            if i < len(successors[node]):
                work[-1] = (node, i + 1)
                nxt = successors[node][i]
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component[member] = found
                    if member == node:
                        break
                found += 1
    return component


def _topological_order(names: list[str], pairs: list[tuple[str, str]]) -> tuple[str, ...] | None:
    """Kahn's algorithm taking the earliest ready function in document order (a heap)."""
    position = {n: i for i, n in enumerate(names)}
    successors: dict[str, list[str]] = {n: [] for n in names}
    indegree = dict.fromkeys(names, 0)
    for s, t in pairs:
        successors[s].append(t)
        indegree[t] += 1
    ready = [position[n] for n in names if indegree[n] == 0]  # ascending: already a heap
    order: list[str] = []
    while ready:
        node = names[heapq.heappop(ready)]
        order.append(node)
        for t in successors[node]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(ready, position[t])
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


def load_workflow(path: str | os.PathLike[str]) -> Workflow:
    """Read and validate a Workflow YAML (or JSON) file."""
    file_path = Path(path)
    source = str(file_path)
    max_bytes = documents.DEFAULT_LIMITS.max_bytes
    try:
        with file_path.open("rb") as f:
            # Never more than the limit allows: the file may be huge or endless (/dev/zero, a FIFO).
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise WorkflowInvalid([FieldError("", f"cannot read {file_path}: {e.strerror or e}")],
                              source=source) from e
    if len(data) > max_bytes:
        raise WorkflowInvalid([FieldError("", f"the file is larger than {max_bytes:,} bytes "
                                              "(the limit of max_bytes)")], source=source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WorkflowInvalid([FieldError("", f"not UTF-8 text: byte {e.start:,} is {data[e.start]:#04x}")],
                              source=source) from e
    workflow = loads_workflow(text, source=source, source_path=file_path)
    logger.debug("loaded workflow %s from %s", workflow.name, file_path)
    return workflow


def loads_workflow(text: str, *, source: str | None = None,
                   source_path: str | os.PathLike[str] | None = None) -> Workflow:
    """Validate a Workflow document's text: JSON (as a pod's environment carries it) or YAML.

    ``source`` names the document in errors (a file, an environment variable). Every
    way a document's text comes in goes through here, and through the same limits.
    """
    if source is None and source_path is not None:
        source = str(source_path)
    try:
        doc = _load_text(text)
    except documents.DocumentInvalid as e:
        raise WorkflowInvalid([FieldError(e.path, str(e))], source=source) from e
    return _parse(doc, source=source, source_path=source_path)


def _load_text(text: str) -> Any:
    if text.lstrip()[:1] in ("{", "["):
        try:
            return documents.load_json(text)
        except json.JSONDecodeError:
            pass  # YAML's flow style starts with a bracket too
    return documents.load_yaml(text)


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
        if f.min_replicas is not None and f.max_replicas is not None:
            item["minReplicas"] = f.min_replicas
            item["maxReplicas"] = f.max_replicas
            item["targetConcurrency"] = f.target_concurrency
        if f.slo_s is not None:
            item["slo"] = format_duration(f.slo_s)
        if f.compute_time_s is not None:
            item["computeTime"] = format_duration(f.compute_time_s)
        if f.batch is not None:
            item["batch"] = {"maxSize": f.batch.max_size, "maxDelay": format_duration(f.batch.max_delay_s)}
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
            "edges": [_dump_edge(e) for e in workflow.edges],
            **({"input": {"shape": list(workflow.input_shape), "dtype": workflow.input_dtype}}
               if workflow.input_shape is not None and workflow.input_dtype is not None else {}),
        },
    }



def _dump_edge(edge: EdgeSpec) -> dict[str, Any]:
    item: dict[str, Any] = {"from": edge.source, "to": edge.target, "size": format_size(edge.size_bytes)}
    if edge.shape is not None and edge.dtype is not None:
        item["shape"] = list(edge.shape)
        item["dtype"] = edge.dtype
    return item
