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


@dataclass(frozen=True)
class PeerProcess:
    """What the attestor learned about the peer when its connection was accepted.

    Read at accept time, not at hello: a client may delay its hello as long as it
    likes, and meanwhile hand the socket to another process and exit, letting its pid
    be reused by someone else.
    """

    credentials: PeerCredentials
    cgroup: str | None = None          # /proc/<pid>/cgroup of the live peer
    problem: str | None = None         # why it could not be read (refused at hello)


class Attestor(Protocol):
    def observe(self, peer: PeerCredentials, sock: socket.socket | None = None) -> PeerProcess:
        """Called at accept time, synchronously: capture what attestation needs, from the live peer."""
        ...

    async def attest(self, peer: PeerProcess, claimed: Identity | None) -> Identity:
        """The peer's identity; raises ``PermissionDenied`` saying why it was refused."""
        ...


class ClaimAttestor:
    """Local mode: trust the claim; fill what it leaves empty from ``default``."""

    def __init__(self, default: Identity = Identity("default", "local", "anonymous")) -> None:
        self._default = default

    def observe(self, peer: PeerCredentials, sock: socket.socket | None = None) -> PeerProcess:
        return PeerProcess(peer)

    async def attest(self, peer: PeerProcess, claimed: Identity | None) -> Identity:
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
# the path may start with "/../..". Static (mirror) pods have a 32-hex-digit UID without dashes.
# Only the kubelet's hierarchy counts: every segment above the pod's must be "..", a
# kubepods slice or a QoS class, so a "pod<uid>" cgroup a user created under a delegated
# subtree (user.slice, a systemd service) names no pod.
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_SEGMENT = re.compile(rf"(?:kubepods-(?:besteffort-|burstable-)?)?pod({_UUID}|[0-9a-f]{{32}})(?:\.slice)?")
_KUBELET_SEGMENT = re.compile(r"\.\.|kubepods(?:\.slice)?|kubepods-(?:besteffort|burstable)(?:\.slice)?"
                              r"|besteffort|burstable")


def _pod_in_path(path: str) -> str | None:
    segments = [seg for seg in path.strip().split("/") if seg]
    for i, segment in enumerate(segments):
        m = _POD_SEGMENT.fullmatch(segment)
        if m is not None:
            above = segments[:i]
            if above and all(_KUBELET_SEGMENT.fullmatch(seg) for seg in above) and \
                    (any(seg.startswith("kubepods") for seg in above) or segment.startswith("kubepods-")
                     or above[-1] in ("besteffort", "burstable")):
                return m.group(1).replace("_", "-")
            return None
    return None


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
        uid = _pod_in_path(parts[2])
        if uid is not None:
            uids.add(uid)
    if len(uids) > 1:
        raise PermissionDenied(f"cgroup names several pods {sorted(uids)}; refusing to guess")
    return uids.pop() if uids else None


def read_pod_uid(pid: int, *, proc_root: str = "/proc") -> str | None:
    return pod_uid_from_cgroup(read_cgroup(pid, proc_root=proc_root))


def read_cgroup(pid: int, *, proc_root: str = "/proc") -> str:
    path = os.path.join(proc_root, str(pid), "cgroup")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(1 << 16)
    except FileNotFoundError as e:
        raise PermissionDenied(f"process {pid} is gone or not visible ({path} missing)") from e
    except PermissionError as e:
        raise PermissionDenied(f"cannot read {path}: {e}") from e


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)     # Linux >= 6.5


def observe_live_peer(sock: socket.socket, peer: PeerCredentials, *, proc_root: str = "/proc") -> PeerProcess:
    """Read the peer's cgroup while holding a pidfd of it, and make sure it was that process.

    The pidfd comes from the socket itself where the kernel can (SO_PEERPIDFD, the process
    that connected, even if its pid was reused since), else from the pid (pidfd_open). If
    the process has exited by the time the cgroup was read, the pid may already name
    another process: refused.
    """
    if peer.pid <= 0:
        return PeerProcess(peer, problem="the peer's pid is not visible to the sidecar "
                                         "(run the sidecar with hostPID: true)")
    pidfd = -1
    try:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
            pidfd = struct.unpack("i", raw)[0]
        except OSError:
            try:
                pidfd = os.pidfd_open(peer.pid)
            except OSError as e:
                return PeerProcess(peer, problem=f"process {peer.pid} is gone ({e.strerror})")
        cgroup = read_cgroup(peer.pid, proc_root=proc_root)
        if proc_root == "/proc" and _exited(pidfd):
            return PeerProcess(peer, problem=f"process {peer.pid} exited while it was being attested")
        return PeerProcess(peer, cgroup=cgroup)
    except PermissionDenied as e:
        return PeerProcess(peer, problem=str(e))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


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

    def observe(self, peer: PeerCredentials, sock: socket.socket | None = None) -> PeerProcess:
        if sock is not None:
            return observe_live_peer(sock, peer, proc_root=self._proc_root)
        if peer.pid <= 0:
            return PeerProcess(peer, problem="the peer's pid is not visible to the sidecar "
                                             "(run the sidecar with hostPID: true)")
        try:
            return PeerProcess(peer, cgroup=read_cgroup(peer.pid, proc_root=self._proc_root))
        except PermissionDenied as e:
            return PeerProcess(peer, problem=str(e))

    async def attest(self, peer: PeerProcess | PeerCredentials, claimed: Identity | None) -> Identity:
        if isinstance(peer, PeerCredentials):
            peer = self.observe(peer)
        if peer.problem is not None or peer.cgroup is None:
            raise PermissionDenied(peer.problem or "the peer's cgroup was not read")
        pid = peer.credentials.pid
        uid = pod_uid_from_cgroup(peer.cgroup)
        if uid is None:
            raise PermissionDenied(f"process {pid} is not in a Kubernetes pod")
        pod = await self._pods.pod_by_uid(uid)
        if pod is None:
            raise PermissionDenied(f"process {pid} runs in pod {uid}, which is not on this node")
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
