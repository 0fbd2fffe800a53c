"""The object store of the operator tests' in-memory ``KubeApi`` doubles: objects by
(kind, namespace, name), read back as copies. Each test module subclasses it with the writes
its code under test may make (recorded, refused or stored)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from faastube_operator import k8s

Key = tuple[str, str | None, str]


def key_of(obj: Mapping[str, Any]) -> Key:
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


class MemoryObjects:
    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects: dict[Key, dict[str, Any]] = {key_of(o): copy.deepcopy(o) for o in objects}

    def get(self, ref: k8s.ObjectRef) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((ref.kind, ref.namespace, ref.name)))

    def list(self, kind: str, *, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items() if k == kind
                and (namespace is None or ns == namespace)
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in (labels or {}).items())]
