"""Every Kubernetes API call the operator makes (kopf's own watching aside).

One small client over the ``kubernetes`` package's configured transport
(kubeconfig or in-cluster service account), speaking raw JSON dicts so the
manifest builders' output goes out as-is. Writes are create-or-merge-patch by
name, which makes reconciliations idempotent.
"""

from __future__ import annotations

import dataclasses
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
    api.WORKFLOW_KIND: (api.API_VERSION, api.WORKFLOW_PLURAL, True),
    api.GPUNODE_KIND: (api.API_VERSION, api.GPUNODE_PLURAL, False),
}

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
    def apply(self, obj: Mapping[str, Any]) -> ApplyResult: ...
    def merge_patch(self, ref: ObjectRef, patch: Mapping[str, Any]) -> dict[str, Any]: ...
    def delete(self, ref: ObjectRef) -> bool: ...


def _path(kind: str, *, namespace: str | None, name: str | None = None) -> str:
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
        result: dict[str, Any] = self._request("POST", _path(ref.kind, namespace=ref.namespace),
                                               body=dict(obj))
        return result

    def merge_patch(self, ref: ObjectRef, patch: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "PATCH", _path(ref.kind, namespace=ref.namespace, name=ref.name),
            body=dict(patch), content_type="application/merge-patch+json")
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

    def apply(self, obj: Mapping[str, Any]) -> ApplyResult:
        """Create the object, or merge-patch it to the desired fields when they differ."""
        ref = ref_of(obj)
        current = self.get(ref)
        if current is None:
            try:
                self.create(obj)
                logger.info("created %s %s/%s", ref.kind, ref.namespace, ref.name)
                return "created"
            except errors.KubeConflict:
                current = self.get(ref)  # created meanwhile: fall through and patch it
                if current is None:
                    raise
        if is_subset(obj, current):
            return "unchanged"
        self.merge_patch(ref, obj)
        logger.info("patched %s %s/%s", ref.kind, ref.namespace, ref.name)
        return "patched"
