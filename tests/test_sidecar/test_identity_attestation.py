"""Peer attestation: SO_PEERCRED on real sockets, cgroup fixtures, pods from kmock's
Kubernetes emulator over real HTTP."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from faastube.errors import PermissionDenied
from faastube_sidecar.identity import (
    ClaimAttestor,
    Identity,
    KubernetesAttestor,
    KubernetesPodDirectory,
    PeerCredentials,
    peer_credentials,
    pod_uid_from_cgroup,
)
from kubernetes import client as k8s

UID = "0f3c2a9e-5b7d-4c1e-9a2b-3c4d5e6f7a8b"
OTHER_UID = "11111111-2222-3333-4444-555555555555"
NODE = "node-a"

# One per (cgroup version, driver, runtime) combination seen in the wild.
CGROUPS = {
    "v2 systemd containerd": f"0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-3f4e5d6c7b8a.scope\n",
    "v2 systemd cri-o guaranteed": f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/"
    "crio-9a8b7c6d5e4f.scope\n",
    "v2 cgroupfs containerd": f"0::/kubepods/besteffort/pod{UID}/3f4e5d6c7b8a9f0e\n",
    "v2 seen from a cgroup namespace": f"0::/../../kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
    "cri-containerd-abc.scope\n",
    "v1 cgroupfs docker": (
        f"12:memory:/kubepods/burstable/pod{UID}/0123456789abcdef\n"
        f"11:cpu,cpuacct:/kubepods/burstable/pod{UID}/0123456789abcdef\n"
        "1:name=systemd:/docker/0123456789abcdef\n"
    ),
    "v1 systemd docker": (
        f"10:devices:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}"
        ".slice/docker-0123456789abcdef.scope\n"
        "0::/\n"
    ),
}


@pytest.mark.parametrize("name", sorted(CGROUPS))
def test_pod_uid_is_found_in_every_cgroup_layout(name):
    assert pod_uid_from_cgroup(CGROUPS[name]) == UID


def test_static_pod_uids_without_dashes_are_found():
    text = "0::/kubepods/burstable/pod6d1e7f6c2cfa1d4cf1c2a5b2a3e2b1c0/abc\n"
    assert pod_uid_from_cgroup(text) == "6d1e7f6c2cfa1d4cf1c2a5b2a3e2b1c0"


@pytest.mark.parametrize("text", [
    "0::/user.slice/user-1000.slice/session-3.scope\n",
    "0::/system.slice/containerd.service\n",
    "0::/\n",
    "12:memory:/docker/0123456789abcdef\n",
    "garbage without colons\n",
])
def test_processes_outside_pods_have_no_pod_uid(text):
    assert pod_uid_from_cgroup(text) is None


def test_a_cgroup_naming_two_pods_is_refused():
    text = f"12:memory:/kubepods/pod{UID}/a\n11:cpu:/kubepods/pod{OTHER_UID}/b\n"
    with pytest.raises(PermissionDenied, match="several pods"):
        pod_uid_from_cgroup(text)


def test_peer_credentials_of_a_real_unix_socket_are_this_process(tmp_path):
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    with server, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        conn, _ = server.accept()
        with conn:
            creds = peer_credentials(conn)
    assert creds == PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


async def test_claim_attestor_trusts_the_claim_and_fills_gaps():
    attestor = ClaimAttestor(Identity("dev", "local", "anonymous"))
    peer = PeerCredentials(1, 2, 3)
    assert await attestor.attest(peer, None) == Identity("dev", "local", "anonymous")
    assert await attestor.attest(peer, Identity("", "traffic", "decode")) == Identity("dev", "traffic", "decode")


# --- Kubernetes attestor against kmock --------------------------------------------------

def pod(name: str, uid: str, *, node: str = NODE, namespace: str = "apps", labels=None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1",
                     "labels": labels if labels is not None else {
                         "faastube.io/workflow": "traffic", "faastube.io/function": "decode"}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
    }


@pytest.fixture
def core_api(kmock):
    kmock.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod", singular="pod")
    cfg = k8s.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    api_client = k8s.ApiClient(cfg)
    yield k8s.CoreV1Api(api_client)
    api_client.close()


def proc_tree(root: Path, pid: int, cgroup: str) -> str:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "cgroup").write_text(cgroup)
    return str(root)


@pytest.fixture
def peer(tmp_path) -> PeerCredentials:
    """This test process's own credentials, read from a real connected socket pair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        return peer_credentials(a)


async def test_a_function_pod_is_attested_from_its_cgroup_and_labels(kmock, core_api, tmp_path, peer):
    kmock.objects["v1/pods", "apps", "decode-0"] = pod("decode-0", UID)
    root = proc_tree(tmp_path / "proc", peer.pid, CGROUPS["v2 systemd containerd"])
    attestor = KubernetesAttestor(KubernetesPodDirectory(core_api, NODE), proc_root=root)

    identity = await attestor.attest(peer, Identity("apps", "traffic", "decode"))
    assert identity == Identity("apps", "traffic", "decode", pod="apps/decode-0")
    # An unspecified claim is filled from the pod.
    assert await attestor.attest(peer, None) == identity


@pytest.mark.parametrize(("claim", "wrong"), [
    (Identity("apps", "other-workflow", "decode"), "workflow"),
    (Identity("apps", "traffic", "recognition"), "function"),
    (Identity("default", "traffic", "decode"), "namespace"),
])
async def test_a_claim_that_disagrees_with_the_pod_is_refused(kmock, core_api, tmp_path, peer, claim, wrong):
    kmock.objects["v1/pods", "apps", "decode-0"] = pod("decode-0", UID)
    root = proc_tree(tmp_path / "proc", peer.pid, CGROUPS["v1 cgroupfs docker"])
    attestor = KubernetesAttestor(KubernetesPodDirectory(core_api, NODE), proc_root=root)
    with pytest.raises(PermissionDenied, match=f"claimed {wrong} .* but pod apps/decode-0"):
        await attestor.attest(peer, claim)


async def test_a_process_outside_any_pod_is_refused(core_api, tmp_path, peer):
    root = proc_tree(tmp_path / "proc", peer.pid, "0::/user.slice/user-1000.slice/session-1.scope\n")
    attestor = KubernetesAttestor(KubernetesPodDirectory(core_api, NODE), proc_root=root)
    with pytest.raises(PermissionDenied, match="not in a Kubernetes pod"):
        await attestor.attest(peer, None)


async def test_an_invisible_or_vanished_peer_is_refused(core_api, tmp_path):
    attestor = KubernetesAttestor(KubernetesPodDirectory(core_api, NODE), proc_root=str(tmp_path))
    with pytest.raises(PermissionDenied, match="hostPID"):
        await attestor.attest(PeerCredentials(0, 0, 0), None)
    with pytest.raises(PermissionDenied, match="gone or not visible"):
        await attestor.attest(PeerCredentials(424242, 0, 0), None)


async def test_pods_of_other_nodes_and_unlabelled_pods_are_refused(kmock, core_api, tmp_path, peer):
    kmock.objects["v1/pods", "apps", "elsewhere"] = pod("elsewhere", UID, node="node-b")
    root = proc_tree(tmp_path / "proc", peer.pid, CGROUPS["v2 cgroupfs containerd"])
    attestor = KubernetesAttestor(KubernetesPodDirectory(core_api, NODE, min_relist_interval_s=0), proc_root=root)
    with pytest.raises(PermissionDenied, match="not on this node"):
        await attestor.attest(peer, None)

    kmock.objects["v1/pods", "apps", "plain"] = pod("plain", UID, labels={"app": "nginx"})
    with pytest.raises(PermissionDenied, match="pod apps/plain lacks the faastube.io/workflow"):
        await attestor.attest(peer, None)


async def test_the_directory_relists_on_a_miss_and_caches_hits(kmock, core_api):
    kmock.objects["v1/pods", "apps", "a"] = pod("a", UID)
    directory = KubernetesPodDirectory(core_api, NODE, min_relist_interval_s=0)
    assert (await directory.pod_by_uid(UID)).name == "a"
    assert (await directory.pod_by_uid(UID)).name == "a"
    assert directory.list_calls == 1  # the second lookup was a cache hit

    kmock.objects["v1/pods", "apps", "b"] = pod("b", OTHER_UID)  # started after the list
    found = await directory.pod_by_uid(OTHER_UID)
    assert (found.namespace, found.name, found.labels["faastube.io/function"]) == ("apps", "b", "decode")
    assert directory.list_calls == 2
    # The list call asked the server for this node's pods only.
    assert any(r.params.get("fieldSelector") == f"spec.nodeName={NODE}" for r in list(kmock))


async def test_misses_in_quick_succession_share_one_list(kmock, core_api):
    directory = KubernetesPodDirectory(core_api, NODE, min_relist_interval_s=60)
    assert await directory.pod_by_uid(UID) is None
    assert await directory.pod_by_uid(OTHER_UID) is None
    assert directory.list_calls == 1


# --- attacks on attestation ---------------------------------------------------------------

@pytest.mark.parametrize("text", [
    f"0::/user.slice/user-1000.slice/user@1000.service/pod{UID}/x\n",
    f"0::/user.slice/user-1000.slice/user@1000.service/kubepods-pod{UID.replace('-', '_')}.slice/x\n",
    f"0::/system.slice/evil.service/kubepods/burstable/pod{UID}/x\n",
    f"0::/pod{UID}/x\n",
])
def test_a_pod_cgroup_outside_the_kubelets_hierarchy_names_no_pod(text):
    assert pod_uid_from_cgroup(text) is None


async def test_the_cgroup_is_read_when_the_connection_is_accepted_not_at_hello(kmock, core_api, tmp_path, peer):
    """A client that connects, hands the socket on and exits can't have its pid reused by a pod."""
    kmock.objects["v1/pods", "apps", "decode-0"] = pod("decode-0", UID)
    root = tmp_path / "proc"
    proc_tree(root, peer.pid, "0::/user.slice/user-1000.slice/session-1.scope\n")   # not a pod at accept
    attestor = KubernetesAttestor(KubernetesPodDirectory(core_api, NODE), proc_root=str(root))
    observed = attestor.observe(peer)
    proc_tree(root, peer.pid, CGROUPS["v2 systemd containerd"])       # the pid now names a pod's process
    with pytest.raises(PermissionDenied, match="not in a Kubernetes pod"):
        await attestor.attest(observed, None)


def test_a_live_peer_is_observed_through_a_pidfd(tmp_path):
    from faastube_sidecar.identity import observe_live_peer

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        observed = observe_live_peer(a, peer_credentials(a))
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        assert observed.problem is None and observed.cgroup == f.read()


def test_a_peer_whose_pid_is_invisible_is_refused_with_the_reason():
    from faastube_sidecar.identity import observe_live_peer

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        observed = observe_live_peer(a, PeerCredentials(0, 0, 0))
    assert observed.cgroup is None and "hostPID" in (observed.problem or "")
