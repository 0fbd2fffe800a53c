"""Every Kubernetes API call the operator makes (kopf's own watching aside).

One small client over the ``kubernetes`` package's configured transport
(kubeconfig or in-cluster service account), speaking raw JSON dicts so the
manifest builders' output goes out as-is.

Children are written with server-side apply under one field manager
(``faastube-operator``, forcing conflicts: the Workflow is the source of truth for
every field we set). The replicas of an autoscaled function's Deployment are the one
exception: they are applied alone under a second manager, ``faastube-autoscaler``
(``apply_replicas``), and left out of the children's configuration, so that a
reconciliation never resets what the scaling loop (or another scaler) set. The API server merges by field ownership, so a field we stop
sending is removed and fields other controllers own are left alone, and an apply
of an unchanged configuration is a no-op there. To avoid even sending it, the
client compares first: a child whose ``faastube.io/applied-config`` digest matches
the configuration and whose live fields still hold every value we set is left
untouched (see ``up_to_date``), which keeps a repeated reconciliation silent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from faastube_spec import api

from faastube_operator import errors

logger = logging.getLogger(__name__)

# kind -> (apiVersion, plural, namespaced) of every kind the operator touches
KINDS: dict[str, tuple[str, str, bool]] = {
    "Deployment": ("apps/v1", "deployments", True),
    "Service": ("v1", "services", True),
    "Event": ("v1", "events", True),
    api.WORKFLOW_KIND: (api.API_VERSION, api.WORKFLOW_PLURAL, True),
    api.GPUNODE_KIND: (api.API_VERSION, api.GPUNODE_PLURAL, False),
    "ClusterKopfPeering": ("kopf.dev/v1", "clusterkopfpeerings", False),
}

FIELD_MANAGER = "faastube-operator"
# Owns the replicas of autoscaled functions' Deployments (docs/operator.md, "Autoscaling").
AUTOSCALER_FIELD_MANAGER = "faastube-autoscaler"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# A digest of the configuration last applied to a child: a field we stopped sending is
# still on the live object (until the apply removes it), so values alone can't tell.
ANNOTATION_APPLIED = "faastube.io/applied-config"
# The manager name the API server derived for the ``kubernetes`` client's user agent
# ("OpenAPI-Generator/<version>/python"): earlier operator versions wrote children with
# create and merge patches under it. ``apply`` moves its fields to our Apply manager once.
LEGACY_MANAGERS = frozenset({"OpenAPI-Generator"})

ApplyResult = Literal["created", "patched", "unchanged"]


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    kind: str
    name: str
    namespace: str | None = None


class KubeApi(Protocol):
    """The seam the reconciler uses; ``KubeClient`` is the real implementation."""

    def get(self, ref: ObjectRef) -> dict[str, Any] | None: ...
    def list(self, kind: str, *, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]: ...
    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def apply(self, obj: Mapping[str, Any], *,
              initial: Mapping[str, Any] | None = None) -> ApplyResult: ...
    def apply_replicas(self, ref: ObjectRef, replicas: int, *,
                       field_manager: str) -> dict[str, Any]: ...
    def merge_patch(self, ref: ObjectRef, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]: ...
    def delete(self, ref: ObjectRef) -> bool: ...


def _path(kind: str, *, namespace: str | None, name: str | None = None,
          subresource: str | None = None) -> str:
    try:
        api_version, plural, namespaced = KINDS[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r} is not one the operator manages") from None
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{urllib.parse.quote(namespace, safe='')}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{urllib.parse.quote(name, safe='')}"
        if subresource is not None:
            base += f"/{urllib.parse.quote(subresource, safe='')}"
    return base


def is_subset(desired: Any, actual: Any) -> bool:
    """Whether every field of ``desired`` already has that value in ``actual``."""
    if isinstance(desired, Mapping):
        # None asks a merge patch to remove the key: satisfied when it is absent.
        return isinstance(actual, Mapping) and all(
            (actual.get(key) is None) if value is None
            else (key in actual and is_subset(value, actual[key]))
            for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(desired) == len(actual)
                and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True)))
    return bool(desired == actual)


def _apply_form(value: Any, *, quantities: bool = False) -> Any:
    """``value`` as an apply configuration states it.

    None values and empty lists go: in an apply, absent means "not ours" (the server
    removes what we owned before), while the API server drops empty lists of built-in
    types anyway, so one sent would never compare equal to the live object.
    Integer resource quantities become strings, the form the server returns them in.
    """
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if quantities and isinstance(item, int) and not isinstance(item, bool):
                form: Any = str(item)  # a quantity of resources.limits / requests
            else:
                form = _apply_form(item, quantities=key in ("limits", "requests"))
            if form is None or form == []:
                continue
            out[str(key)] = form
        return out
    if isinstance(value, list):
        return [_apply_form(item) for item in value if item is not None]
    return value


def config_digest(config: Mapping[str, Any]) -> str:
    """A short stable digest of an apply configuration (without its own annotation)."""
    meta = dict(config.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k != ANNOTATION_APPLIED}
    meta["annotations"] = annotations
    canonical = json.dumps({**config, "metadata": meta}, sort_keys=True,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def apply_config(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The server-side apply configuration for ``obj``, stamped with its digest."""
    config: dict[str, Any] = _apply_form(obj)
    meta = config.setdefault("metadata", {})
    meta.setdefault("annotations", {})[ANNOTATION_APPLIED] = config_digest(config)
    return config


def up_to_date(config: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
    """Whether applying ``config`` to ``live`` would change nothing, so need not be sent.

    The digest says the last applied configuration was this one (no field of ours to
    remove); the values say nobody changed a field we set since.
    """
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    digest = (config.get("metadata") or {}).get("annotations", {}).get(ANNOTATION_APPLIED)
    return annotations.get(ANNOTATION_APPLIED) == digest and is_subset(config, live)


def legacy_ownership(live: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``managedFields`` with a legacy writer's entries handed to our Apply manager.

    None when there is nothing to move: we already apply this object, or no earlier
    operator version wrote it. Without the move, the fields an earlier version set and
    this one no longer sends would stay owned by that old manager, and no apply would
    ever remove them. (The same migration as client-go's ``csaupgrade``.)
    """
    entries = [dict(e) for e in (live.get("metadata") or {}).get("managedFields") or []
               if isinstance(e, Mapping)]
    ours = [e for e in entries if e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply"
            and not e.get("subresource")]
    legacy = [e for e in entries if e.get("manager") in LEGACY_MANAGERS
              and e.get("operation") == "Update" and not e.get("subresource")]
    if ours or not legacy:
        return None
    fields: dict[str, Any] = {}
    for entry in legacy:
        fields = _union_fields(fields, entry.get("fieldsV1") or {})
    moved = {"manager": FIELD_MANAGER, "operation": "Apply",
             "apiVersion": str(live.get("apiVersion", "")), "fieldsType": "FieldsV1",
             "fieldsV1": fields}
    if legacy[0].get("time"):
        moved["time"] = legacy[0]["time"]
    return [e for e in entries if not any(e is entry for entry in legacy)] + [moved]


def _union_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, Mapping) else {} for k, v in a.items()}
    for key, sub in b.items():
        out[key] = _union_fields(out.get(key, {}), sub if isinstance(sub, Mapping) else {})
    return out


def replicas_owners(live: Mapping[str, Any]) -> set[str]:
    """The field managers that own ``spec.replicas`` of ``live`` (its ``managedFields``).

    Whoever owns it keeps it through another manager's apply that leaves it out: a field
    a manager stops applying is removed only when nobody else owns it (and a Deployment's
    replicas would then default to 1).
    """
    owners = set()
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        if not isinstance(entry, Mapping) or entry.get("subresource") == "status":
            continue
        spec = (entry.get("fieldsV1") or {}).get("f:spec")
        if isinstance(spec, Mapping) and "f:replicas" in spec:
            owners.add(str(entry.get("manager", "")))
    return owners


def replicas_config(ref: ObjectRef, replicas: int) -> dict[str, Any]:
    """An apply configuration that states a Deployment's replicas and nothing else.

    Applied to an existing Deployment it sets (and, for its manager, owns) only that
    field; it can create nothing (a Deployment needs a selector and a template).
    """
    if replicas < 0:
        raise ValueError(f"replicas: {replicas} is negative")
    return {"apiVersion": KINDS["Deployment"][0], "kind": "Deployment",
            "metadata": {"name": ref.name, "namespace": ref.namespace},
            "spec": {"replicas": replicas}}


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        current = out.get(key)
        out[key] = (_merged(current, value) if isinstance(current, Mapping) and isinstance(value, Mapping)
                    else value)
    return out


def resource_version(obj: Mapping[str, Any] | None) -> str | None:
    version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return None if version is None else str(version)


def ref_of(obj: Mapping[str, Any]) -> ObjectRef:
    meta = obj.get("metadata") or {}
    return ObjectRef(kind=str(obj.get("kind")), name=str(meta.get("name")),
                     namespace=meta.get("namespace"))


class KubeClient:
    """A synchronous JSON client; kopf runs sync handlers in its thread pool."""

    def __init__(self, api_client: Any, *, timeout_s: float = 30.0) -> None:
        self._api = api_client
        self._timeout_s = timeout_s

    @classmethod
    def from_environment(cls, *, timeout_s: float = 30.0) -> KubeClient:
        """In-cluster service account if present, else $KUBECONFIG / ~/.kube/config."""
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        return cls(kubernetes.client.ApiClient(), timeout_s=timeout_s)

    def close(self) -> None:
        self._api.close()

    def _request(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                 body: Any = None, content_type: str = "application/json") -> Any:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self._api.param_serialize(method, path, query_params=query or None,
                                           header_params=headers, body=body,
                                           auth_settings=["BearerToken"])
        try:
            response = self._api.call_api(*params, _request_timeout=self._timeout_s)
            raw = response.read()
        except (ApiException, OSError) as e:
            raise errors.KubeUnavailable(f"{method} {path}: {e}", status=0) from e
        status = int(response.status)
        if status >= 300:
            message = raw.decode(errors="replace")[:500] if raw else ""
            try:
                payload = json.loads(raw)
                message, reason = str(payload.get("message", message)), str(payload.get("reason", ""))
            except (ValueError, AttributeError):
                reason = ""
            text = f"{method} {path}: HTTP {status}: {message}"
            if status == 409:
                raise errors.KubeConflict(text, status=status, reason=reason)
            if status >= 500 or status == 429:
                raise errors.KubeUnavailable(text, status=status, reason=reason)
            raise errors.KubeApiError(text, status=status, reason=reason)
        return json.loads(raw) if raw else {}

    def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._request(
                "GET", _path(ref.kind, namespace=ref.namespace, name=ref.name))
        except errors.KubeApiError as e:
            if e.status == 404:
                return None
            raise
        return result

    def list(self, kind: str, *, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        query = []
        if labels:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))))
        result = self._request("GET", _path(kind, namespace=namespace), query=query)
        items = [dict(item) for item in result.get("items") or []]
        api_version = KINDS[kind][0]
        for item in items:  # list items come without their type
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        # Filter here too: the selector is an optimisation, not something to trust blindly.
        return [item for item in items
                if all(((item.get("metadata") or {}).get("labels") or {}).get(k) == v
                       for k, v in (labels or {}).items())
                and (namespace is None or not KINDS[kind][2]
                     or (item.get("metadata") or {}).get("namespace") == namespace)]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        ref = ref_of(obj)
        result: dict[str, Any] = self._request(
            "POST", _path(ref.kind, namespace=ref.namespace),
            query=[("fieldManager", FIELD_MANAGER)], body=dict(obj))
        return result

    def merge_patch(self, ref: ObjectRef, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        """A JSON merge patch; a ``metadata.resourceVersion`` in it makes it conditional
        (HTTP 409, ``KubeConflict``, when the object changed since that version)."""
        result: dict[str, Any] = self._request(
            "PATCH", _path(ref.kind, namespace=ref.namespace, name=ref.name,
                           subresource=subresource),
            query=[("fieldManager", FIELD_MANAGER)], body=dict(patch), content_type=MERGE_PATCH)
        return result

    def delete(self, ref: ObjectRef) -> bool:
        try:
            self._request("DELETE", _path(ref.kind, namespace=ref.namespace, name=ref.name),
                          body={"propagationPolicy": "Background"})
        except errors.KubeApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    def apply_replicas(self, ref: ObjectRef, replicas: int, *,
                       field_manager: str) -> dict[str, Any]:
        """Server-side apply a Deployment's replicas alone as ``field_manager``, forcing.

        The manager then owns the field (alone, or with others that applied the same
        value), so another manager's apply that leaves it out no longer removes it.
        A Deployment that does not exist is not created (HTTP 404 or 422).
        """
        result: dict[str, Any] = self._request(
            "PATCH", _path(ref.kind, namespace=ref.namespace, name=ref.name),
            query=[("fieldManager", field_manager), ("force", "true")],
            body=json.dumps(replicas_config(ref, replicas), separators=(",", ":")),
            content_type=APPLY_PATCH)
        return result

    def apply(self, obj: Mapping[str, Any], *, initial: Mapping[str, Any] | None = None) -> ApplyResult:
        """Server-side apply ``obj`` as ``faastube-operator``, unless it would change nothing.

        ``initial`` holds fields sent only when the apply creates the object (an
        autoscaled Deployment's starting replicas): they are not part of the
        configuration's digest, so later applies without them are up to date.
        """
        ref = ref_of(obj)
        config = apply_config(obj)
        current = self.get(ref)
        if current is not None and up_to_date(config, current):
            return "unchanged"
        if current is None and initial:
            config = _merged(config, _apply_form(initial))
        if current is not None and (moved := legacy_ownership(current)) is not None:
            self._request(
                "PATCH", _path(ref.kind, namespace=ref.namespace, name=ref.name),
                body=[{"op": "test", "path": "/metadata/resourceVersion",
                       "value": resource_version(current)},
                      {"op": "replace", "path": "/metadata/managedFields", "value": moved}],
                content_type=JSON_PATCH)
            logger.info("took over the fields of %s %s/%s from the previous operator version",
                        ref.kind, ref.namespace, ref.name)
        result = self._request(
            "PATCH", _path(ref.kind, namespace=ref.namespace, name=ref.name),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            # JSON is YAML; a string body goes out as-is whatever the client version.
            body=json.dumps(config, separators=(",", ":")), content_type=APPLY_PATCH)
        if current is None:
            logger.info("created %s %s/%s", ref.kind, ref.namespace, ref.name)
            return "created"
        if resource_version(result) == resource_version(current):
            return "unchanged"  # the server found nothing to change
        logger.info("patched %s %s/%s", ref.kind, ref.namespace, ref.name)
        return "patched"
