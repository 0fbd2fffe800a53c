"""``kubectl get``-style tables from a CRD's additionalPrinterColumns (pure).

Evaluates the small JSONPath subset printer columns use (``.a.b``, ``[*]``,
``[N]`` and ``[?(@.key=="value")]``), renders ``date`` columns as ages the way
kubectl does, and skips ``priority > 0`` columns unless asked (``-o wide``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Any

_TOKEN = re.compile(r"""\.([A-Za-z0-9_-]+)|\[\*\]|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_-]+)==["']([^"']*)["']\)\]""")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """All values ``path`` selects in ``obj`` (empty when it selects nothing)."""
    values = [obj]
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None:
            raise ValueError(f"jsonPath {path!r}: unsupported syntax at {path[pos:]!r}")
        pos = m.end()
        key, index, fkey, fvalue = m.groups()
        nxt: list[Any] = []
        for v in values:
            if key is not None:
                if isinstance(v, Mapping) and key in v:
                    nxt.append(v[key])
            elif isinstance(v, list):
                if index is not None:
                    if int(index) < len(v):
                        nxt.append(v[int(index)])
                elif fkey is not None:
                    nxt.extend(i for i in v if isinstance(i, Mapping) and str(i.get(fkey)) == fvalue)
                else:
                    nxt.extend(v)
        values = nxt
    return values


def age(created: str, *, now: datetime.datetime) -> str:
    """kubectl's short age: 45s, 12m, 3h, 5d."""
    when = datetime.datetime.fromisoformat(created)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cell(values: list[Any], column: Mapping[str, Any], now: datetime.datetime) -> str:
    if not values:
        return "<none>"
    if column.get("type") == "date" and isinstance(values[0], str):
        return age(values[0], now=now)
    return ",".join("true" if v is True else "false" if v is False else str(v) for v in values)


def printer_columns(crd: Mapping[str, Any], version: str | None = None) -> list[Mapping[str, Any]]:
    versions = crd["spec"]["versions"]
    chosen = next((v for v in versions if v["name"] == version), None) if version else versions[0]
    if chosen is None:
        raise ValueError(f"the CRD serves no version {version!r}")
    return list(chosen.get("additionalPrinterColumns") or [])


def table(crd: Mapping[str, Any], objects: Sequence[Mapping[str, Any]], *,
          now: datetime.datetime | None = None, wide: bool = False) -> str:
    """The text ``kubectl get <plural>`` prints for these objects."""
    now = now or datetime.datetime.now(datetime.UTC)
    columns = [c for c in printer_columns(crd) if wide or not c.get("priority")]
    header = ["NAME"] + [str(c["name"]).upper() for c in columns]
    rows = [[str(obj.get("metadata", {}).get("name", ""))]
            + [_cell(jsonpath(obj, str(c["jsonPath"])), c, now) for c in columns]
            for obj in objects]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)
