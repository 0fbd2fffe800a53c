"""Who is on the other end of the sidecar's socket?

Every object in the pool belongs to a workflow, and a function may touch only its own
workflow's objects. The sidecar enforces that with the :class:`Identity` an
:class:`Attestor` returns for each connection.

- :class:`ClaimAttestor` (local mode, one user's processes) believes what the client says.
- :class:`KubernetesAttestor` believes the kernel: the peer's pid (SO_PEERCRED) leads to
  its cgroup, the cgroup path to its pod UID, and the pod UID (through a
  :class:`PodDirectory`) to the pod's namespace and its ``faastube.io/workflow`` and
  ``faastube.io/function`` labels, which only the operator sets. A claim that disagrees
  is refused, as is any process outside a pod. See docs/identity.md for the reasoning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from faastube.errors import PermissionDenied, Unavailable

logger = logging.getLogger(__name__)

WORKFLOW_LABEL = "faastube.io/workflow"
FUNCTION_LABEL = "faastube.io/function"


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process as the kernel saw it at connect() time (in our pid namespace)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected unix socket (Linux ``struct ucred``: pid, uid, gid)."""
    fmt = "3i"
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


@dataclass(frozen=True, slots=True)
class Domain:
    """The unit of isolation: one workflow in one namespace.

    Memory is partitioned by domain (a slab holds one domain's objects, and a client is
    only handed handles to its own domain's slabs); functions of a domain share data.
    """

    namespace: str
    workflow: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.workflow}"


@dataclass(frozen=True)
class Identity:
    """A function of a workflow. In a *claim*, an empty field means "not claimed"."""

    namespace: str
    workflow: str
    function: str
    pod: str | None = None  # "<namespace>/<name>" when attested from a pod

    @property
    def domain(self) -> Domain:
        return Domain(self.namespace, self.workflow)


class Attestor(Protocol):
    async def attest(self, peer: PeerCredentials, claimed: Identity | None) -> Identity:
        """The peer's identity; raises ``PermissionDenied`` saying why it was refused."""
        ...


class ClaimAttestor:
    """Local mode: trust the claim; fill what it leaves empty from ``default``."""

    def __init__(self, default: Identity = Identity("default", "local", "anonymous")) -> None:
        self._default = default

    async def attest(self, peer: PeerCredentials, claimed: Identity | None) -> Identity:
        if claimed is None:
            return self._default
        return Identity(
            namespace=claimed.namespace or self._default.namespace,
            workflow=claimed.workflow or self._default.workflow,
            function=claimed.function or self._default.function,
            pod=claimed.pod,
        )


# --- cgroup path -> pod UID -------------------------------------------------------------
# cgroupfs driver:  /kubepods/burstable/pod<uid-with-dashes>/<container id>
# systemd driver:   /kubepods.slice/kubepods-burstable.slice/
#                   kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
# (cri-o: crio-<id>.scope, docker: docker-<id>.scope). Seen from inside a cgroup namespace
# the path may start with "/../..": we only look for the pod segment. Static (mirror) pods
# have a 32-hex-digit UID without dashes.
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_SEGMENT = re.compile(rf"(?:^|[/-])pod({_UUID}|[0-9a-f]{{32}})(?:\.slice)?(?:/|$)")


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a ``/proc/<pid>/cgroup`` file (v1 or v2), or None outside a pod.

    Raises ``PermissionDenied`` if lines name different pods (nothing sane does that).
    """
    uids: set[str] = set()
    for line in text.splitlines():
        # "hierarchy-ID:controller-list:cgroup-path"; the path may itself contain ':'.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        m = _POD_SEGMENT.search(parts[2].strip())
        if m is not None:
            uids.add(m.group(1).replace("_", "-"))
    if len(uids) > 1:
        raise PermissionDenied(f"cgroup names several pods {sorted(uids)}; refusing to guess")
    return uids.pop() if uids else None


def read_pod_uid(pid: int, *, proc_root: str = "/proc") -> str | None:
    path = os.path.join(proc_root, str(pid), "cgroup")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise PermissionDenied(f"process {pid} is gone or not visible ({path} missing)") from e
    except PermissionError as e:
        raise PermissionDenied(f"cannot read {path}: {e}") from e
    return pod_uid_from_cgroup(text)


# --- pod UID -> pod --------------------------------------------------------------------
@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


class PodDirectory(Protocol):
    async def pod_by_uid(self, uid: str) -> PodInfo | None:
        """The pod with this UID on this node, or None if there is none."""
        ...


class KubernetesPodDirectory:
    """Pods of one node from the API server, cached by UID.

    Lists ``spec.nodeName=<node>`` pods (across namespaces) and re-lists on a miss, because
    a miss is almost always a pod that started after the last list. Concurrent misses
    share one list call, and lists are at least ``min_relist_interval_s`` apart so a stream
    of unknown UIDs cannot flood the API server.
    """

    def __init__(self, api: Any, node_name: str, *, min_relist_interval_s: float = 1.0,
                 request_timeout_s: float = 10.0) -> None:
        # api: kubernetes.client.CoreV1Api (typed Any: the kubernetes package has no stubs)
        if not node_name:
            raise ValueError("node_name is empty")
        self._api = api
        self._node = node_name
        self._min_relist_s = min_relist_interval_s
        self._timeout_s = request_timeout_s
        self._pods: dict[str, PodInfo] = {}
        self._lock = asyncio.Lock()
        self._last_list = float("-inf")
        self._lists = 0

    @property
    def list_calls(self) -> int:
        return self._lists

    async def pod_by_uid(self, uid: str) -> PodInfo | None:
        pod = self._pods.get(uid)
        if pod is not None:
            return pod
        async with self._lock:  # single flight: later misses reuse this list's result
            pod = self._pods.get(uid)
            if pod is None and time.monotonic() - self._last_list >= self._min_relist_s:
                await self._relist()
                pod = self._pods.get(uid)
        return pod

    async def _relist(self) -> None:
        try:
            raw = await asyncio.to_thread(
                self._api.list_pod_for_all_namespaces,
                field_selector=f"spec.nodeName={self._node}",
                _preload_content=False, _request_timeout=self._timeout_s,
            )
            body = json.loads(raw.data)
        except Exception as e:  # the API server is down or unreachable: the caller may retry
            raise Unavailable(f"cannot list pods of node {self._node}: {e}") from e
        self._last_list = time.monotonic()
        self._lists += 1
        pods: dict[str, PodInfo] = {}
        for item in body.get("items") or []:
            meta = item.get("metadata") or {}
            # The field selector does this server-side; checking again costs nothing.
            if (item.get("spec") or {}).get("nodeName") != self._node or not meta.get("uid"):
                continue
            pods[meta["uid"]] = PodInfo(
                uid=meta["uid"], namespace=meta.get("namespace", ""), name=meta.get("name", ""),
                labels=dict(meta.get("labels") or {}),
            )
        self._pods = pods
        logger.debug("listed %d pods on node %s", len(pods), self._node)


class KubernetesAttestor:
    """Attests a peer from its cgroup and its pod's labels; see the module docstring."""

    def __init__(self, pods: PodDirectory, *, proc_root: str = "/proc") -> None:
        self._pods = pods
        self._proc_root = proc_root

    async def attest(self, peer: PeerCredentials, claimed: Identity | None) -> Identity:
        if peer.pid <= 0:
            raise PermissionDenied(
                "the peer's pid is not visible to the sidecar (run the sidecar with hostPID: true)"
            )
        uid = read_pod_uid(peer.pid, proc_root=self._proc_root)
        if uid is None:
            raise PermissionDenied(f"process {peer.pid} is not in a Kubernetes pod")
        pod = await self._pods.pod_by_uid(uid)
        if pod is None:
            raise PermissionDenied(f"process {peer.pid} runs in pod {uid}, which is not on this node")
        ref = f"{pod.namespace}/{pod.name}"
        workflow = pod.labels.get(WORKFLOW_LABEL)
        function = pod.labels.get(FUNCTION_LABEL)
        if not workflow or not function:
            raise PermissionDenied(
                f"pod {ref} lacks the {WORKFLOW_LABEL} and {FUNCTION_LABEL} labels: "
                "only function pods of a faastube Workflow may use the sidecar"
            )
        identity = Identity(namespace=pod.namespace, workflow=workflow, function=function, pod=ref)
        if claimed is not None:
            for name in ("namespace", "workflow", "function"):
                said, actual = getattr(claimed, name), getattr(identity, name)
                if said and said != actual:
                    raise PermissionDenied(
                        f"claimed {name} {said!r} but pod {ref} is {name} {actual!r}"
                    )
        return identity
