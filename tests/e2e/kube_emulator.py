"""An API server emulator on kmock, good enough to run the real operator against.

kmock serves list/watch/patch/delete over real HTTP and honours finalizers, but it has
no controllers, admission or schema pruning (see kubernetes-notes.md). On top of it:

- ``ApiServerEmulator`` fills in ``uid``, ``resourceVersion``, ``generation`` and
  ``creationTimestamp`` the way the API server does, keeps watches gap-free, and
  implements **server-side apply** (``PATCH`` with ``application/apply-patch+yaml``):
  field ownership per manager in ``metadata.managedFields`` (FieldsV1), merge of
  associative lists by key, removal of fields a manager stops applying when nobody
  else owns them, conflicts (409) unless ``force=true``, no write (same
  resourceVersion) when an apply changes nothing, and ownership moving to whoever
  changes a field with a create or merge patch. It knows the list keys of the few
  built-in lists the operator writes (containers, env, ports, volumes, volumeMounts,
  ownerReferences); any other list is atomic. An apply that would create a Deployment
  without a selector or template is refused (422), as validation does. Objects of
  built-in kinds lose nulls and empty lists on the way in, as the API server's
  ``omitempty`` serialisation does, and a ``generateName`` gets a random suffix (kopf
  names its events so).
- ``Cluster`` is HTTP access as kubectl would have it, plus stand-ins for the
  controllers the tests need: the Deployment controller (``finish_rollouts``), the
  garbage collector (``collect_garbage``: owner references) and the namespace controller
  (``delete_namespace_contents``).
- ``OperatorProcess`` runs ``faastube operator`` against it.

Deletions between a list and a watch are not replayed (kmock keeps no history of
versions); the tests don't need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
import yaml
from faastube_spec import topology
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
NS = "team-a"
WF = "faastube.io/v1alpha1"
APPLY_PATCH = "application/apply-patch+yaml"
# Requests the tests make themselves (as kubectl or a controller would) say so.
TEST_USER_AGENT = "faastube-tests/1"

# --- server-side apply, as a pure function over dicts --------------------------------------

FieldPath = tuple[str, ...]  # FieldsV1 path elements: "f:name", 'k:{"name":"x"}', 'v:"x"'

# Built-in lists merged by key (their +listType=map keys); every other list is atomic.
LIST_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",), "initContainers": ("name",), "env": ("name",),
    "volumes": ("name",), "volumeMounts": ("mountPath",), "ownerReferences": ("uid",),
    "imagePullSecrets": ("name",), "conditions": ("type",),
}
SET_LISTS = {"finalizers"}
# Not owned by anyone: identity and bookkeeping the server sets.
UNOWNED_META = {"name", "namespace", "uid", "resourceVersion", "generation",
                "creationTimestamp", "deletionTimestamp", "managedFields", "selfLink"}
_MISSING = object()


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, FieldPath]]) -> None:
        self.conflicts = conflicts
        super().__init__("; ".join(f"conflict with {m!r}: {_dotted(p)}" for m, p in conflicts))


def _dotted(path: FieldPath) -> str:
    return ".".join(el.partition(":")[2] for el in path)


def _list_keys(name: str | None, items: list[Any]) -> tuple[str, ...] | None:
    if not items or not all(isinstance(i, Mapping) for i in items):
        return None
    if name == "ports":  # container ports and Service ports differ in their key
        field = "containerPort" if any("containerPort" in i for i in items) else "port"
        return (field, "protocol")
    return LIST_KEYS.get(name or "")


def _key_value(item: Mapping[str, Any], key: str) -> Any:
    return item.get(key, "TCP" if key == "protocol" else None)  # the defaulted key


def _item_element(item: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    values = {k: _key_value(item, k) for k in keys}
    return "k:" + json.dumps({k: v for k, v in values.items() if v is not None},
                             sort_keys=True, separators=(",", ":"))


def field_set(obj: Mapping[str, Any]) -> set[FieldPath]:
    """The fields an object (or an apply configuration) sets, as member paths."""
    out: set[FieldPath] = set()
    for key, value in obj.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in UNOWNED_META}
            if not value:
                continue
        out |= _fields_of(value, ("f:" + key,), key)
    return out


def _fields_of(value: Any, path: FieldPath, name: str | None) -> set[FieldPath]:
    if isinstance(value, Mapping):
        if not value:
            return {path}
        out: set[FieldPath] = set()
        for key, sub in value.items():
            out |= _fields_of(sub, path + ("f:" + key,), key)
        return out
    if isinstance(value, list):
        keys = _list_keys(name, value)
        if keys is not None:
            out = set()
            for item in value:
                item_path = path + (_item_element(item, keys),)
                out.add(item_path)
                for key, sub in item.items():
                    out |= _fields_of(sub, item_path + ("f:" + key,), key)
            return out
        if name in SET_LISTS and value:
            return {path + ("v:" + json.dumps(v),) for v in value}
        return {path}
    return {path}


def resolve(obj: Any, path: FieldPath) -> Any:
    """The value at ``path`` in ``obj``, or ``_MISSING``."""
    current = obj
    for element in path:
        kind, _, arg = element.partition(":")
        if kind == "f":
            if not isinstance(current, Mapping) or arg not in current:
                return _MISSING
            current = current[arg]
        elif kind == "k":
            want = json.loads(arg)
            if not isinstance(current, list):
                return _MISSING
            current = next((i for i in current if isinstance(i, Mapping)
                            and all(_key_value(i, k) == v for k, v in want.items())), _MISSING)
            if current is _MISSING:
                return _MISSING
        elif kind == "v":
            want = json.loads(arg)
            if not isinstance(current, list) or want not in current:
                return _MISSING
            current = want
    return current


def _remove(obj: dict[str, Any], path: FieldPath) -> None:
    parent = resolve(obj, path[:-1])
    kind, _, arg = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(arg, None)
    elif kind == "k" and isinstance(parent, list):
        want = json.loads(arg)
        parent[:] = [i for i in parent if not (isinstance(i, Mapping) and all(
            _key_value(i, k) == v for k, v in want.items()))]
    elif kind == "v" and isinstance(parent, list):
        want = json.loads(arg)
        parent[:] = [i for i in parent if i != want]


def _prune_empty_parents(obj: dict[str, Any], path: FieldPath, owned: set[FieldPath]) -> None:
    """After removing ``path``: drop maps and lists it leaves empty (unless owned empty)."""
    for depth in range(len(path) - 1, 0, -1):
        parent_path = path[:depth]
        value = resolve(obj, parent_path)
        if value in ({}, []) and parent_path not in owned:
            _remove(obj, parent_path)
        else:
            return


def merge(live: Any, config: Any, name: str | None = None) -> Any:
    """``config`` merged into ``live``: maps by key, keyed lists by item key, sets by value."""
    if isinstance(config, Mapping) and isinstance(live, Mapping):
        out = copy.deepcopy(dict(live))
        for key, value in config.items():
            out[key] = merge(live[key], value, key) if key in live else copy.deepcopy(value)
        return out
    if isinstance(config, list) and isinstance(live, list):
        keys = _list_keys(name, config + live)
        if keys is not None:
            out_list = copy.deepcopy(live)
            for item in config:
                element = _item_element(item, keys)
                at = next((n for n, i in enumerate(out_list) if _item_element(i, keys) == element),
                          None)
                if at is None:
                    out_list.append(copy.deepcopy(item))
                else:
                    out_list[at] = merge(out_list[at], item)
            return out_list
        if name in SET_LISTS:
            return copy.deepcopy(live) + [v for v in config if v not in live]
    return copy.deepcopy(config)


def to_fields_v1(paths: Iterable[FieldPath]) -> dict[str, Any]:
    members = set(paths)
    tree: dict[str, Any] = {}
    for path in members:
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    for path in members:
        node = tree
        for element in path:
            node = node[element]
        if node:
            node["."] = {}
    return tree


def from_fields_v1(tree: Mapping[str, Any], prefix: FieldPath = ()) -> set[FieldPath]:
    out: set[FieldPath] = set()
    for element, sub in tree.items():
        if element == ".":
            continue
        path = prefix + (element,)
        if not sub or "." in sub:
            out.add(path)
        out |= from_fields_v1(sub or {}, path)
    return out


def _entries(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        entry = dict(entry)
        entry["fields"] = from_fields_v1(entry.pop("fieldsV1", None) or {})
        out.append(entry)
    return out


def _store_entries(obj: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    stored = []
    for entry in entries:
        if not entry["fields"]:
            continue
        out = {k: v for k, v in entry.items() if k != "fields"}
        out["fieldsType"] = "FieldsV1"
        out["fieldsV1"] = to_fields_v1(entry["fields"])
        stored.append(out)
    meta = obj.setdefault("metadata", {})
    if stored:
        meta["managedFields"] = stored
    else:
        meta.pop("managedFields", None)


def server_side_apply(live: Mapping[str, Any] | None, config: Mapping[str, Any], *,
                      manager: str, force: bool, now: str) -> dict[str, Any]:
    """The object after ``manager`` applies ``config`` to ``live`` (None: creates it)."""
    live = copy.deepcopy(dict(live or {}))
    entries = _entries(live)
    ours = next((e for e in entries if e.get("manager") == manager
                 and e.get("operation") == "Apply" and not e.get("subresource")), None)
    previous = set(ours["fields"]) if ours else set()
    applied = field_set(config)
    conflicts = []
    for entry in entries:
        if entry is ours:
            continue
        for path in entry["fields"] & applied:
            if path[-1].startswith(("k:", "v:")):
                continue  # an item's identity; its fields are compared one by one
            if resolve(live, path) != resolve(config, path):
                conflicts.append((str(entry.get("manager")), path))
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    for manager_name, path in conflicts:  # forced: the fields become ours alone
        for entry in entries:
            if entry.get("manager") == manager_name and entry is not ours:
                entry["fields"].discard(path)

    body = {k: v for k, v in live.items()}
    body.setdefault("metadata", {}).pop("managedFields", None)
    merged: dict[str, Any] = merge(body, dict(config))
    owned_by_others = set().union(*(e["fields"] for e in entries if e is not ours))
    still_used = {path[:n] for path in applied | owned_by_others for n in range(1, len(path))}
    for path in sorted(previous - applied, key=len):
        if path in owned_by_others or path in still_used or resolve(merged, path) is _MISSING:
            continue
        _remove(merged, path)
        _prune_empty_parents(merged, path, owned_by_others | applied)
    if ours is None:
        ours = {"manager": manager, "operation": "Apply",
                "apiVersion": str(config.get("apiVersion", "")), "time": now, "fields": set()}
        entries.append(ours)
    if ours["fields"] != applied:
        ours["time"] = now
    ours["fields"] = applied
    _store_entries(merged, entries)
    return merged


def record_update(before: Mapping[str, Any], after: dict[str, Any], *, manager: str,
                  api_version: str, now: str) -> None:
    """Ownership after a create or merge patch by ``manager``: the fields it changed are
    its own now, and no longer anyone else's (stored into ``after``)."""
    old_fields, new_fields = field_set(before), field_set(after)
    changed = {p for p in new_fields if resolve(before, p) != resolve(after, p)}
    gone = old_fields - new_fields
    entries = _entries(before)
    for entry in entries:
        entry["fields"] -= changed | gone
    if changed:
        mine = next((e for e in entries if e.get("manager") == manager
                     and e.get("operation") == "Update" and not e.get("subresource")), None)
        if mine is None:
            mine = {"manager": manager, "operation": "Update", "apiVersion": api_version,
                    "fields": set()}
            entries.append(mine)
        mine["fields"] |= changed
        mine["time"] = now
    _store_entries(after, entries)


def omit_empty_lists(value: Any) -> Any:
    """What built-in types keep of a value: nulls and empty lists are dropped (``omitempty``)."""
    if isinstance(value, Mapping):
        return {k: omit_empty_lists(v) for k, v in value.items() if v != [] and v is not None}
    if isinstance(value, list):
        return [omit_empty_lists(v) for v in value]
    return value


# --- the emulator ---------------------------------------------------------------------------


class ApiServerEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock plus the API server's bookkeeping on writes, server-side apply, and its
    list/watch contract.

    kmock stores objects as sent, lists with a dummy resourceVersion and starts every
    watch by streaming all stored objects again. A real API server fills ``uid`` and
    ``creationTimestamp`` on create, gives each write a new ``resourceVersion``, bumps
    ``generation`` on spec changes, and a watch from a list's resourceVersion sends
    only later changes. kopf depends on all of it: it lists, then watches from the
    list's version, and after its own patch it waits for the event carrying the
    patched version. With kmock's constant versions and replayed objects it takes an
    older event as the result of its patch and handles a stale body again; with
    versions but the replay, its optimistic finalizer patch fails on the stale body.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._revision = 0  # etcd's revision: one counter for all writes
        # Serialises writes with their revisions, and lists/watch starts against them, so
        # a revision is applied before any later one and a list's revision covers its items.
        self._writes = asyncio.Lock()

    async def _handle(self, request: Any) -> Any:
        action = getattr(request, "action", None)
        if request.resource is None or action not in (
                kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)
        async with self._writes:
            if action == kmock.action.UPDATE and _content_type(request) == APPLY_PATCH:
                return await self._serve_apply(request)
            self._stamp(request, action)
            try:
                return await super()._handle(request)
            except jsonpatch.JsonPatchTestFailed as e:
                # What the API server answers to a failed optimistic `test` op (kopf retries it).
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e

    def _stamp(self, request: Any, action: Any) -> None:
        data = request.data  # mutated in place: the request itself is frozen
        current = self._current(request)
        builtin = _is_builtin(request.resource)
        if action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            if builtin:
                cleaned = omit_empty_lists(data)
                data.clear()
                data.update(cleaned)
                record_update({}, data, manager=_manager(request),
                              api_version=str(data.get("apiVersion", "")), now=_timestamp())
            data.setdefault("metadata", {}).update({
                "uid": str(uuid.uuid4()), "resourceVersion": self._next_revision(),
                "generation": 1, "creationTimestamp": _timestamp()})
        elif action == kmock.action.UPDATE and isinstance(data, list):
            # JSON patch: its `test` ops see the old version, as they do on the API server.
            data.append({"op": "add", "path": "/metadata/resourceVersion",
                         "value": self._next_revision()})
        elif action == kmock.action.UPDATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            expected = meta.get("resourceVersion")
            if expected is not None and current and str(expected) != _version(current):
                raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                    f"the object has been modified: resourceVersion {expected} "
                    f"is not {_version(current)}"))
            if builtin and current and request.subresource is None:
                _nulls_for_empty_lists(data)
                after = _merge_patch(copy.deepcopy(current), data)
                record_update(current, after, manager=_manager(request),
                              api_version=str(current.get("apiVersion", "")), now=_timestamp())
                meta["managedFields"] = (after.get("metadata") or {}).get("managedFields")
            meta["resourceVersion"] = self._next_revision()
            if request.subresource is None and "spec" in data:
                meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        elif action == kmock.action.DELETE and current:
            meta = current.get("metadata") or {}
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                # Setting deletionTimestamp is a write; kmock makes it keeping the version.
                for key, obj in self.objects.items():
                    if self._is(request, key) and not obj.deleted:
                        obj.patch({"metadata": {"resourceVersion": self._next_revision()}})

    async def _serve_apply(self, request: Any) -> Any:
        """Server-side apply: create or merge by field manager (see the module's docstring)."""
        manager = (request.params or {}).get("fieldManager")
        if not manager:
            raise kmock.KubernetesError(status=422, reason="Invalid",
                                        message="fieldManager is required for apply requests")
        if request.subresource is not None:
            raise kmock.KubernetesError(status=422, reason="Invalid",
                                        message="this emulator applies to main resources only")
        try:
            config = yaml.safe_load(request.text)
        except yaml.YAMLError as e:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message=str(e)) from e
        meta = (config or {}).get("metadata") or {} if isinstance(config, dict) else {}
        if not isinstance(config, dict) or meta.get("name") != request.name:
            raise kmock.KubernetesError(status=400, reason="BadRequest",
                                        message="the apply configuration must name the object")
        force = str((request.params or {}).get("force", "")).lower() == "true"
        current = self._current(request)
        if not current and request.resource.plural == "deployments":
            # The API server validates what an apply would create: a Deployment needs its
            # selector and template (so a replicas-only apply never creates one).
            spec = config.get("spec") or {}
            missing = [f"spec.{f}" for f in ("selector", "template") if not spec.get(f)]
            if missing:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=(
                    f"Deployment.apps {request.name!r} is invalid: {', '.join(missing)}: Required value"))
        try:
            result = server_side_apply(current or None, config, manager=manager, force=force,
                                       now=_timestamp())
        except ApplyConflict as e:
            raise kmock.KubernetesError(status=409, reason="Conflict",
                                        message=f"Apply failed with conflicts: {e}") from e
        if _is_builtin(request.resource):
            result = omit_empty_lists(result)
        key = (request.resource, request.namespace, request.name)
        bus = self._buses[request.resource]
        if not current:
            result.setdefault("metadata", {}).update({
                "namespace": request.namespace, "uid": str(uuid.uuid4()),
                "resourceVersion": self._next_revision(), "generation": 1,
                "creationTimestamp": _timestamp()})
            if request.namespace is None:
                result["metadata"].pop("namespace")
            if key in self.objects:
                self.objects[key].create(result)
            else:
                self.objects[key] = result
            await bus.put({"type": "ADDED", "object": result})
            return aiohttp.web.json_response(result, status=201)
        if result == current:
            return aiohttp.web.json_response(current)  # nothing changed: no write, same version
        result["metadata"]["resourceVersion"] = self._next_revision()
        if result.get("spec") != current.get("spec"):
            result["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        self.objects[key].create(result)
        await bus.put({"type": "MODIFIED", "object": result})
        return aiohttp.web.json_response(result)

    async def _serve_list(self, request: Any) -> Any:
        await super()._serve_list(request)  # its checks (unknown resource: 404)
        async with self._writes:
            items = self._stored(request)
            return {"metadata": {"resourceVersion": str(self._revision)}, "items": items}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """Changes after the requested resourceVersion, none lost, none replayed.

        Without a version (or kmock's "..."), the stored objects come first as ADDED,
        as for a watch from "0". The bus is marked and the objects read under the write
        lock, so no write falls between them.
        """
        yield b""  # send the headers now, as kmock does
        since = str((request.params or {}).get("resourceVersion") or "")
        bus = self._buses[request.resource]
        async with self._writes:
            marker = await bus.mark()
            snapshot = [raw for raw in self._stored(request)
                        if not since.isdigit() or int(_version(raw) or 0) > int(since)]
        try:
            for raw in snapshot:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._watched(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)

    def _stored(self, request: Any) -> list[dict[str, Any]]:
        return [obj.raw for key, obj in self.objects.items()
                if not obj.deleted and self._watched(request, *key)]

    @staticmethod
    def _watched(request: Any, resource: Any, namespace: str | None, name: str | None) -> bool:
        return bool(resource == request.resource
                    and (request.namespace is None or namespace == request.namespace)
                    and (request.name is None or name == request.name))

    @staticmethod
    def _is(request: Any, key: tuple[Any, str | None, str]) -> bool:
        return key == (request.resource, request.namespace, request.name)

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _current(self, request: Any) -> dict[str, Any]:
        for key, obj in self.objects.items():
            if self._is(request, key) and not obj.deleted:
                return copy.deepcopy(dict(obj.raw))
        return {}


def _is_builtin(resource: Any) -> bool:
    return getattr(resource, "group", None) in ("", "apps")


def _content_type(request: Any) -> str:
    headers = {k.lower(): v for k, v in (request.headers or {}).items()}
    return str(headers.get("content-type", "")).split(";")[0].strip().lower()


def _manager(request: Any) -> str:
    """The field manager of a non-apply write: the parameter, else the user agent's
    product name (what the API server derives)."""
    given = (request.params or {}).get("fieldManager")
    if given:
        return str(given)
    return user_agent(request).split("/")[0] or "unknown"


def user_agent(request: Any) -> str:
    headers = {k.lower(): v for k, v in (request.headers or {}).items()}
    return str(headers.get("user-agent", ""))


def _nulls_for_empty_lists(patch: dict[str, Any]) -> None:
    """An empty list in a merge patch stores as absent on a built-in type."""
    for key, value in list(patch.items()):
        if value == []:
            patch[key] = None
        elif isinstance(value, dict):
            _nulls_for_empty_lists(value)


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _version(obj: Mapping[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return None if version is None else str(version)


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the cluster, as kubectl and the controllers see it ---------------------------------------


def resource_path(resource: Any, namespace: str | None, name: str | None = None) -> str:
    base = (f"/api/{resource.version}" if not resource.group
            else f"/apis/{resource.group}/{resource.version}")
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{resource.plural}"
    return base + (f"/{name}" if name else "")


class Cluster:
    """HTTP access to the emulator, as kubectl would do it, plus its controller stand-ins."""

    def __init__(self, emulator: ApiServerEmulator, session: aiohttp.ClientSession, url: str,
                 *, kubeconfig: Path, workdir: Path) -> None:
        self.emulator = emulator
        self.session = session
        self.url = url.rstrip("/")
        self.kubeconfig = kubeconfig
        self.workdir = workdir

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, self.url + path, json=body,
                                        headers=headers) as resp:
            data = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, data

    async def request_apply(self, path: str, config: Mapping[str, Any], *,
                            manager: str = "faastube-operator",
                            force: bool = True) -> tuple[int, Any]:
        """A server-side apply, as ``kubectl apply --server-side`` sends it."""
        query = f"?fieldManager={manager}" + ("&force=true" if force else "")
        async with self.session.patch(self.url + path + query, data=json.dumps(config),
                                      headers={"Content-Type": APPLY_PATCH}) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> dict[str, Any] | None:
        status, data = await self.request("GET", path)
        return data if status == 200 else None

    async def items(self, path: str) -> list[dict[str, Any]]:
        status, data = await self.request("GET", path)
        assert status == 200, data
        return list(data["items"])

    async def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        status, data = await self.request("POST", path, obj)
        assert status in (200, 201), data
        return dict(data)

    async def patch(self, path: str, patch: dict[str, Any]) -> None:
        status, data = await self.request("PATCH", path, patch)
        assert status == 200, data

    async def eventually(self, what: str, check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = await check()
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")

    def writes(self, *, plurals: tuple[str, ...] = ("deployments", "services"),
               by_the_test: bool = True) -> list[Any]:
        """Requests so far that could change objects of these kinds (all but reads);
        ``by_the_test=False`` leaves out the test's own."""
        return [r for r in list(self.emulator)
                if str(r.method).upper().rsplit(".", 1)[-1] in ("POST", "PATCH", "PUT", "DELETE")
                and getattr(r.resource, "plural", None) in plurals
                and (by_the_test or user_agent(r) != TEST_USER_AGENT)]

    async def finish_rollouts(self, namespace: str = NS) -> None:
        """Play the Deployment controller: every Deployment becomes available."""
        for dep in await self.items(f"/apis/apps/v1/namespaces/{namespace}/deployments"):
            replicas = dep["spec"].get("replicas", 1)
            await self.patch(
                f"/apis/apps/v1/namespaces/{namespace}/deployments/{dep['metadata']['name']}",
                {"status": {"replicas": replicas, "updatedReplicas": replicas,
                            "readyReplicas": replicas, "availableReplicas": replicas}})

    async def delete_namespace_contents(self, namespace: str) -> list[str]:
        """Play the namespace controller after ``kubectl delete namespace``: delete every
        object in the namespace; return those still there (held by a finalizer), which
        would keep the namespace Terminating."""
        for (resource, ns, name), obj in list(self.emulator.objects.items()):
            if ns == namespace and not obj.deleted:
                status, data = await self.request("DELETE", resource_path(resource, ns, name))
                assert status in (200, 202, 404), data
        return [f"{resource.plural}/{name}"
                for (resource, ns, name), obj in self.emulator.objects.items()
                if ns == namespace and not obj.deleted]

    def finalizers(self) -> dict[str, list[str]]:
        """Every stored object that carries finalizers, with them."""
        return {f"{resource.plural}/{name}": list(obj.raw["metadata"]["finalizers"])
                for (resource, _, name), obj in self.emulator.objects.items()
                if not obj.deleted and (obj.raw.get("metadata") or {}).get("finalizers")}

    async def collect_garbage(self) -> list[str]:
        """Play the garbage collector: delete objects all of whose owners are gone."""
        live = {(obj.raw.get("metadata") or {}).get("uid")
                for obj in self.emulator.objects.values() if not obj.deleted}
        doomed = []
        for (resource, namespace, name), obj in list(self.emulator.objects.items()):
            if obj.deleted:
                continue
            owners = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
            if owners and all(o.get("uid") not in live for o in owners):
                status, _ = await self.request("DELETE", resource_path(resource, namespace, name))
                if status == 200:
                    doomed.append(f"{resource.plural}/{name}")
        return doomed


@contextlib.asynccontextmanager
async def emulated_cluster(workdir: Path) -> AsyncIterator[Cluster]:
    """The emulator serving the kinds the operator and sidecar use, and a kubeconfig for it."""
    info = kmock.ResourceInfo
    async with ApiServerEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["faastube.io/v1alpha1/workflows"] = info(
            kind="Workflow", singular="workflow", namespaced=True, shortnames={"ftwf"},
            categories={"faastube"}, subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        emulator.resources["faastube.io/v1alpha1/gpunodes"] = info(
            kind="GpuNode", singular="gpunode", namespaced=False, shortnames={"ftnode"},
            subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "delete"})
        emulator.resources["kopf.dev/v1/clusterkopfpeerings"] = info(
            kind="ClusterKopfPeering", singular="clusterkopfpeering", namespaced=False,
            verbs={"get", "list", "watch", "create", "patch"})
        # Without namespaces, `kopf run -A` never starts watching (kubernetes-notes.md).
        emulator.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False,
                                                   verbs={"get", "list", "watch"})
        emulator.resources["v1/nodes"] = info(kind="Node", namespaced=False,
                                              verbs={"get", "list", "create", "delete"})
        emulator.resources["apps/v1/deployments"] = info(kind="Deployment", namespaced=True,
                                                         verbs={"get", "list", "create", "patch",
                                                                "delete", "watch"})
        emulator.resources["v1/services"] = info(kind="Service", namespaced=True,
                                                 verbs={"get", "list", "create", "patch", "delete"})
        emulator.resources["v1/events"] = info(kind="Event", namespaced=True,
                                               verbs={"create", "list"})
        url = str(server.url)
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        }))
        async with aiohttp.ClientSession(headers={"User-Agent": TEST_USER_AGENT}) as session:
            yield Cluster(emulator, session, url, kubeconfig=kubeconfig, workdir=workdir)


class OperatorProcess:
    """``faastube operator`` as a subprocess against the emulator."""

    def __init__(self, cluster: Cluster, name: str, *extra: str) -> None:
        self.cluster = cluster
        self.name = name
        self.extra = extra
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.log_path = cluster.workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness_port}/healthz"

    async def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "faastube.cli",
                "--log-level", os.environ.get("FAASTUBE_TEST_LOG_LEVEL", "INFO"), "operator",
                "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1",
                "--liveness-port", str(self.liveness_port),
                "--status-interval-s", "0.3", "--retry-delay-s", "1",
                "--image", "ghcr.io/faastube/faastube:test", *self.extra,
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self, *, kill: bool = False) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.returncode
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if os.environ.get("FAASTUBE_TEST_SHOW_LOG"):
            print(f"--- {self.name}\n{self.log()}")
        return self.proc.returncode


# --- objects the tests create ---------------------------------------------------------------


def gpunode(name: str, *, unhealthy: tuple[int, ...] = (), heartbeat: str = "2026-11-27T18:00:00Z",
            builtin: str = "4x-a10") -> dict[str, Any]:
    node = topology.dump_node(topology.builtin_node(builtin))
    node["name"] = name
    gpus = [{"index": g["index"], "uuid": g["uuid"], "healthy": g["index"] not in unhealthy,
             "poolReservedBytes": 0, "poolUsedBytes": 0, "freeMemoryBytes": g["memoryBytes"]}
            for g in node["gpus"]]
    return {"apiVersion": WF, "kind": "GpuNode", "metadata": {"name": name},
            "spec": {"topology": node},
            "status": {"gpus": gpus, "freePoolBytes": sum(g["freeMemoryBytes"] for g in gpus),
                       "lastHeartbeatTime": heartbeat,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                                       "message": "sidecar is up",
                                       "lastTransitionTime": "2026-11-27T18:00:00Z"}]}}


def workflow(name: str, **spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "slo": "800ms",
        "functions": [
            {"name": "decode", "handler": "functions:decode", "image": "example/fn:1"},
            {"name": "detect", "handler": "functions:detect", "image": "example/fn:1",
             "gpu": {"memory": "8Gi"}},
            {"name": "classify", "handler": "functions:classify", "image": "example/fn:1",
             "gpu": {"memory": "4Gi"}},
        ],
        "edges": [{"from": "decode", "to": "detect", "size": "130MB"},
                  {"from": "detect", "to": "classify", "size": "20MB"}],
    }
    spec.update(spec_changes)
    return {"apiVersion": WF, "kind": "Workflow", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


def wf_path(name: str = "", namespace: str = NS) -> str:
    return f"/apis/{WF}/namespaces/{namespace}/workflows" + (f"/{name}" if name else "")


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}
