"""CPU and memory requests and limits of the containers the operator creates.

A Workflow says nothing about CPU or host memory (a function declares only whether it needs a
GPU and how much GPU memory), so function and gateway containers get operator-wide values,
set by the chart (``functions.resources``, ``functions.gatewayResources``). The defaults
give every pod requests, so none is BestEffort (the first evicted under memory pressure),
and a memory limit, so one function cannot take a node's memory. They set no CPU limit:
CFS throttling adds tail latency to bursty inference calls, and the request already
guarantees the share.

Quantities are kept in the form the API server returns (``0.5`` is stored as ``500m``,
``1024Mi`` as ``1Gi``): the operator compares what it wants with what it reads back, and a
value written one way and read back another would be patched again at every pass.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[numkMGTPE])?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_BINARY_SUFFIX = {0: "", **{v: k for k, v in _BINARY.items()}}
_DECIMAL = {"n": -3, "u": -2, "m": -1, "": 0, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def canonical_quantity(text: str) -> str:
    """A Kubernetes quantity in the API server's canonical form; ValueError if it is not one.

    Binary suffixes stay binary (the largest one that keeps the number whole, ``1.5Gi`` ->
    ``1536Mi``); anything else is written with the largest SI suffix that keeps it whole
    (``0.5`` -> ``500m``, ``2000`` -> ``2k``). Exponent notation is not accepted.
    """
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a quantity (e.g. 500m, 2, 512Mi, 4Gi)")
    number, suffix = Decimal(m.group("number")), m.group("suffix") or ""
    if suffix in _BINARY:
        value = number * 1024 ** _BINARY[suffix]
        if value == value.to_integral_value() and value >= 1024:
            power = max(p for p in range(7) if value % 1024 ** p == 0)
            return f"{int(value // 1024 ** power)}{_BINARY_SUFFIX[power]}"
    else:
        value = number * Decimal(1000) ** _DECIMAL[suffix]
    if value == 0:
        return "0"
    for name, power in sorted(_DECIMAL.items(), key=lambda item: -item[1]):
        scaled = value / Decimal(1000) ** power
        if scaled == scaled.to_integral_value():
            return f"{int(scaled)}{name}"
    raise ValueError(f"{text!r} is finer than 1n")


def _value(quantity: str) -> Decimal:
    m = _QUANTITY.match(quantity)
    if m is None:  # canonical quantities always match
        raise ValueError(f"{quantity!r} is not a quantity")
    suffix = m.group("suffix") or ""
    scale = Decimal(1024) ** _BINARY[suffix] if suffix in _BINARY else Decimal(1000) ** _DECIMAL[suffix]
    return Decimal(m.group("number")) * scale


@dataclasses.dataclass(frozen=True)
class ContainerResources:
    """Requests and limits by resource name (cpu, memory, ephemeral-storage), canonical."""

    requests: tuple[tuple[str, str], ...] = ()
    limits: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, doc: Mapping[str, Any], *, what: str = "resources") -> ContainerResources:
        """From a Kubernetes ``ResourceRequirements``-shaped mapping; ValueError naming the key."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"{what}: expected a mapping with requests and/or limits")
        unknown = set(doc) - {"requests", "limits"}
        if unknown:
            raise ValueError(f"{what}: unknown keys {sorted(unknown)} (requests, limits)")
        parts: dict[str, tuple[tuple[str, str], ...]] = {}
        for part in ("requests", "limits"):
            given = doc.get(part) or {}
            if not isinstance(given, Mapping):
                raise ValueError(f"{what}.{part}: expected a mapping of resource -> quantity")
            pairs = []
            for name, quantity in sorted(given.items()):
                if name not in RESOURCE_NAMES:
                    raise ValueError(f"{what}.{part}.{name}: not one of {', '.join(RESOURCE_NAMES)}")
                try:
                    pairs.append((name, canonical_quantity(str(quantity))))
                except ValueError as e:
                    raise ValueError(f"{what}.{part}.{name}: {e}") from None
            parts[part] = tuple(pairs)
        resources = cls(**parts)
        limits = dict(resources.limits)
        for name, request in resources.requests:
            if name in limits and _value(request) > _value(limits[name]):
                raise ValueError(f"{what}: requests.{name} {request} is above limits.{name} {limits[name]}")
        return resources

    def to_kubernetes(self, *, extended: Mapping[str, int] | None = None) -> dict[str, Any]:
        """A container's ``resources``; ``extended`` resources (faastube.io/...) go in limits,
        from which Kubernetes copies them to requests."""
        out: dict[str, Any] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        limits: dict[str, Any] = {**dict(self.limits), **dict(extended or {})}
        if limits:
            out["limits"] = limits
        return out


DEFAULT_FUNCTION_RESOURCES = ContainerResources.parse(
    {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "8Gi"}})
# The gateway holds up to --max-input-in-flight (4 GiB by default) of request inputs.
DEFAULT_GATEWAY_RESOURCES = ContainerResources.parse(
    {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "6Gi"}})
