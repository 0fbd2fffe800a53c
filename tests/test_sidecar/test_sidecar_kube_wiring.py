"""`faastube sidecar` with its Kubernetes pieces on, as a real process.

The kubelet is the gRPC stand-in of test_deviceplugin_kubelet.py, on real unix sockets in
a temporary directory; the API server is kmock's emulator over real HTTP, reached through
a kubeconfig file. The sidecar runs the host backend on the simulated lent-4xh100
topology. Sidecars start in a worker thread so that the event loop keeps serving the
kubelet stand-in and kmock while the process starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from faastube import client as ft_client
from faastube import locations, topology
from faastube.errors import PermissionDenied
from faastube.locations import HOST
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.deviceplugin import api_pb2
from faastube_sidecar.identity import Domain
from faastube_sidecar.kube import DataPlanePoolStats
from faastube_sidecar.nodepublisher import GpuPoolStats
from faastube_sidecar.pool import Budget, Pool, PoolLimits
from test_deviceplugin_kubelet import Kubelet

GIB = 1 << 30
MIB = 1 << 20
NODE = "node-a"
GPUNODES = "faastube.io/v1alpha1/gpunodes"
POD_UID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
LENT = topology.builtin_node("lent-4xh100")


@pytest.fixture
def kubelet_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ftkw", dir="/tmp")  # unix socket paths: at most 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def kubelet(kubelet_dir: str) -> AsyncIterator[Kubelet]:
    k = Kubelet(kubelet_dir)
    await k.start()
    yield k
    await k.stop()


@pytest.fixture
def kubeconfig(kmock, tmp_path: Path) -> str:
    kmock.resources[GPUNODES] = kmock.ResourceInfo(
        namespaced=False, kind="GpuNode", singular="gpunode", shortnames={"ftnode"},
        subresources={"status"})
    kmock.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod", singular="pod")
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
    }))
    return str(path)


async def start(make_sidecar, *flags: str):
    return await asyncio.to_thread(make_sidecar, *flags)


async def eventually(check, *, timeout_s: float = 10.0, what: str = "condition"):
    """Poll ``check`` (returns a value or raises/returns None) on the event loop."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        with contextlib.suppress(KeyError, AssertionError):
            value = check()
            if value is not None:
                return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- device plugin --------------------------------------------------------------------------


async def test_sidecar_registers_one_resource_per_gpu_and_hands_out_its_socket_directory(
        kubelet, kubelet_dir, make_sidecar):
    sidecar = await start(make_sidecar, "--device-plugin", "--kubelet-dir", kubelet_dir,
                          "--simulated-topology", "lent-4xh100", "--sharing-slots", "2")
    regs = {r.resource_name: r for r in [await kubelet.next_registration() for _ in range(4)]}
    assert sorted(regs) == [f"faastube.io/gpu-{i}" for i in range(4)]

    async with kubelet.dial(regs["faastube.io/gpu-2"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        devices = (await asyncio.wait_for(stream.read(), 5)).devices
        stream.cancel()
        reply = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["gpu2-slot1"])]))
    # --sharing-slots reached the plugin; simulated GPUs are healthy.
    assert [(d.ID, d.health) for d in devices] == [("gpu2-slot0", "Healthy"), ("gpu2-slot1", "Healthy")]

    (container,) = reply.container_responses
    assert container.envs["NVIDIA_VISIBLE_DEVICES"] == LENT.gpu(2).uuid
    assert container.envs["FAASTUBE_GPU_INDEX"] == "2"
    (mount,) = container.mounts
    assert (mount.container_path, mount.read_only) == ("/var/run/faastube", True)
    # The pod's FAASTUBE_SOCKET, seen through the mount, is the sidecar's own socket.
    in_pod = container.envs["FAASTUBE_SOCKET"]
    assert in_pod == "/var/run/faastube/faastube.sock"
    host_path = Path(mount.host_path) / os.path.relpath(in_pod, mount.container_path)
    assert host_path == sidecar.socket_path and host_path.is_socket()

    # A kubelet restart wipes the directory; the running sidecar registers all GPUs again.
    await kubelet.restart()
    again = sorted([(await kubelet.next_registration(timeout_s=8)).resource_name for _ in range(4)])
    assert again == sorted(regs)

    # Graceful shutdown: the plugin's sockets go, then the sidecar's, and the exit is clean.
    assert len(os.listdir(kubelet_dir)) == 5  # kubelet.sock + four plugins
    assert await asyncio.to_thread(sidecar.stop) == 0
    assert "Traceback" not in sidecar.log()
    assert os.listdir(kubelet_dir) == ["kubelet.sock"]
    assert not sidecar.socket_path.exists()


async def test_sidecar_exposes_gpus_as_cdi_devices_and_offers_the_socket_resource(
        kubelet, kubelet_dir, make_sidecar, tmp_path):
    # The node's CDI spec (as nvidia-ctk cdi generate writes it) defines GPUs 0-2, not GPU 3.
    cdi_dir = tmp_path / "cdi"
    cdi_dir.mkdir()
    (cdi_dir / "nvidia.yaml").write_text(yaml.safe_dump({
        "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
        "devices": [{"name": g.uuid, "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{g.index}"}]}}
                    for g in LENT.gpus[:3]]}))
    sidecar = await start(make_sidecar, "--device-plugin", "--kubelet-dir", kubelet_dir,
                          "--simulated-topology", "lent-4xh100", "--gpu-exposure", "cdi",
                          "--cdi-spec-dir", str(cdi_dir), "--socket-devices", "16")
    regs = {r.resource_name: r for r in [await kubelet.next_registration() for _ in range(5)]}
    assert sorted(regs) == [*(f"faastube.io/gpu-{i}" for i in range(4)), "faastube.io/socket"]

    async with kubelet.dial(regs["faastube.io/gpu-1"]) as plugin:
        reply = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["gpu1-slot0"])]))
    (container,) = reply.container_responses
    assert [d.name for d in container.cdi_devices] == [f"nvidia.com/gpu={LENT.gpu(1).uuid}"]
    assert container.envs["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert Path(container.mounts[0].host_path) == sidecar.socket_path.parent

    async with kubelet.dial(regs["faastube.io/gpu-3"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        devices = (await asyncio.wait_for(stream.read(), 5)).devices
        stream.cancel()
    assert {d.health for d in devices} == {"Unhealthy"}  # no CDI device: no pod could use it

    async with kubelet.dial(regs["faastube.io/socket"]) as plugin:
        reply = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["socket-15"])]))
    (container,) = reply.container_responses
    in_pod = container.envs["FAASTUBE_SOCKET"]
    host_path = Path(container.mounts[0].host_path) / os.path.relpath(in_pod, container.mounts[0].container_path)
    assert host_path == sidecar.socket_path and host_path.is_socket()

    assert await asyncio.to_thread(sidecar.stop) == 0
    assert "CDI devices ['nvidia.com/gpu=" + LENT.gpu(3).uuid + "'] are defined by no spec" in sidecar.log()
    assert os.listdir(kubelet_dir) == ["kubelet.sock"]


# --- GpuNode publishing ---------------------------------------------------------------------


def status_patches(kmock) -> int:
    return sum(1 for r in list(kmock)
               if str(r.method).upper().endswith("PATCH") and str(r.url.path).endswith(f"/{NODE}/status"))


async def test_sidecar_publishes_its_gpunode_with_four_gpus_and_pool_memory(
        kmock, kubeconfig, make_sidecar):
    sidecar = await start(make_sidecar, "--publish-node", "--node-name", NODE, "--kubeconfig", kubeconfig,
                          "--simulated-topology", "lent-4xh100", "--heartbeat", "100ms",
                          "--gpu-pool-max", "2Gi")

    def published():
        obj = dict(kmock.objects[GPUNODES, None, NODE].raw)
        return obj if obj.get("status") else None

    obj = await eventually(published, what="the GpuNode status")
    assert obj["kind"] == "GpuNode" and obj["metadata"]["name"] == NODE
    topo = topology.parse_node(obj["spec"]["topology"], "spec.topology")
    assert topo.name == NODE
    assert [g.uuid for g in topo.gpus] == [g.uuid for g in LENT.gpus]
    assert topo.link(0, 3) == LENT.link(0, 3)

    status = obj["status"]
    assert [(g["index"], g["healthy"]) for g in status["gpus"]] == [(i, True) for i in range(4)]
    for g in status["gpus"]:
        # Host backend: no pool on the simulated GPUs yet; all their memory is free.
        assert (g["poolReservedBytes"], g["poolUsedBytes"]) == (0, 0)
        assert g["freeMemoryBytes"] == LENT.gpu(g["index"]).memory_bytes
    assert status["freePoolBytes"] == 4 * 2 * GIB  # each pool may still grow to --gpu-pool-max
    assert status["conditions"][0]["status"] == "True"

    # The heartbeat keeps patching the status.
    seen = status_patches(kmock)
    await eventually(lambda: status_patches(kmock) >= seen + 3 or None, what="heartbeats")
    assert await asyncio.to_thread(sidecar.stop) == 0
    assert "Traceback" not in sidecar.log()


def test_pool_stats_come_from_the_gpu_pools_with_their_limits():
    # Real pools over shared memory stand in for GPU memory; GPU 2 has no pool at all.
    backend = HostBackend()
    limits = PoolLimits(slab_bytes=4 * MIB, max_bytes=64 * MIB)
    where = (HOST, locations.gpu(0), locations.gpu(1))
    budgets = {loc: Budget(loc, limits) for loc in where}
    pools = {loc: Pool(Domain("ns", "wf"), loc, backend, limits, budgets[loc]) for loc in where}

    class Owner:  # the two members of the DataPlane the source reads
        def __init__(self):
            self.budgets = budgets

        def pool_stats(self):
            return [p.stats() for p in pools.values()]

    pools[locations.gpu(1)].allocate(3 * MIB)
    pools[HOST].allocate(1 * MIB)
    try:
        stats = DataPlanePoolStats(Owner(), [0, 1, 2], default_limit_bytes=16 * MIB).pool_stats()
        assert stats[0] == GpuPoolStats(0, 0, 64 * MIB)
        assert stats[1].reserved_bytes == 4 * MIB and 3 * MIB <= stats[1].used_bytes < 4 * MIB
        assert stats[1].limit_bytes == 64 * MIB
        assert stats[2] == GpuPoolStats(0, 0, 16 * MIB)
        assert DataPlanePoolStats(Owner(), [0, 1, 2], default_limit_bytes=0).missing_pools() == [2]
    finally:
        for p in pools.values():
            p.close()


# --- identity ---------------------------------------------------------------------------------


async def test_sidecar_attests_clients_from_their_pod(kmock, kubeconfig, make_sidecar, tmp_path):
    # A procfs stand-in where this test process lives in the pod POD_UID (systemd driver).
    proc = tmp_path / "proc"
    (proc / str(os.getpid())).mkdir(parents=True)
    (proc / str(os.getpid()) / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        f"{POD_UID.replace('-', '_')}.slice/cri-containerd-0123abcd.scope\n")
    kmock.objects["v1/pods", "apps", "decode-0"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "decode-0", "namespace": "apps", "uid": POD_UID, "resourceVersion": "1",
                     "labels": {"faastube.io/workflow": "traffic", "faastube.io/function": "decode"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "x"}]},
    }
    sidecar = await start(make_sidecar, "--identity", "kubernetes", "--node-name", NODE,
                          "--kubeconfig", kubeconfig, "--proc-root", str(proc))

    def identity(**claim):
        with ft_client.connect(sidecar.socket_path, **claim) as client:
            return client.identity

    attested = await asyncio.to_thread(identity)
    assert {k: attested[k] for k in ("namespace", "workflow", "function")} == {
        "namespace": "apps", "workflow": "traffic", "function": "decode"}
    with pytest.raises(PermissionDenied, match="claimed workflow 'other'"):
        await asyncio.to_thread(identity, workflow="other")
    assert await asyncio.to_thread(sidecar.stop) == 0
    assert "Traceback" not in sidecar.log()


# --- bad flags --------------------------------------------------------------------------------


def sidecar_cli(*flags: str, socket_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "KUBERNETES_SERVICE_HOST")}
    return subprocess.run(
        [sys.executable, "-m", "faastube.cli", "sidecar", "--socket", str(socket_dir / "s.sock"),
         "--backend", "host", *flags], check=False, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("flags, message", [
    (["--publish-node"], "--publish-node needs --node-name (or $NODE_NAME)"),
    (["--identity", "kubernetes"], "--identity kubernetes needs --node-name"),
    (["--heartbeat", "5s"], "--heartbeat has no effect without --publish-node"),
    (["--kubelet-dir", "/tmp"], "--kubelet-dir has no effect without --device-plugin"),
    (["--sharing-slots", "2"], "--sharing-slots has no effect without --device-plugin or --publish-node"),
    (["--device-plugin", "--sharing-slots", "0"], "--sharing-slots: must be >= 1, got 0"),
    (["--device-plugin", "--simulated-topology", "dgx-9000"], "unknown topology 'dgx-9000' (known: "),
    (["--simulated-topology", "lent-4xh100"], "--simulated-topology has no effect without"),
    (["--kubeconfig", "/etc/hostname"], "--kubeconfig has no effect without --publish-node or --identity"),
    (["--publish-node", "--node-name", "n", "--kubeconfig", "/nonexistent/kubeconfig"],
     "--kubeconfig: no such file '/nonexistent/kubeconfig'"),
    (["--publish-node", "--node-name", "n", "--heartbeat", "1ms"], "--heartbeat must be at least 100ms"),
    (["--proc-root", "/proc"], "--proc-root has no effect without --identity kubernetes"),
    (["--gpu-exposure", "cdi"], "--gpu-exposure has no effect without --device-plugin"),
    (["--socket-devices", "8"], "--socket-devices has no effect without --device-plugin"),
    (["--device-plugin", "--cdi-kind", "nvidia.com/gpu"],
     "--cdi-kind has no effect without --gpu-exposure cdi or cdi-annotations"),
    (["--device-plugin", "--gpu-exposure", "envvar", "--cdi-spec-dir", "/etc/cdi"],
     "--cdi-spec-dir has no effect without --gpu-exposure cdi or cdi-annotations"),
    (["--device-plugin", "--gpu-exposure", "runtime"], "invalid choice: 'runtime'"),
])
def test_bad_flag_combinations_exit_2_naming_the_flag(flags, message, tmp_path):
    done = sidecar_cli(*flags, socket_dir=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "s.sock").exists()


def test_device_plugin_without_gpus_or_a_simulated_topology_fails_clearly(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has GPUs")
    done = sidecar_cli("--device-plugin", "--kubelet-dir", str(tmp_path), socket_dir=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "--device-plugin and --publish-node need GPUs" in done.stderr
    assert "--simulated-topology" in done.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_bad_cdi_kind_fails_before_the_socket_is_bound(tmp_path):
    done = sidecar_cli("--device-plugin", "--kubelet-dir", str(tmp_path), "--simulated-topology",
                       "lent-4xh100", "--gpu-exposure", "cdi", "--cdi-kind", "nvidia-gpu", socket_dir=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "device plugin: CDI kind 'nvidia-gpu' is not vendor/class" in done.stderr
    assert not (tmp_path / "s.sock").exists()


def test_the_daemon_imports_neither_grpc_nor_kubernetes_unless_asked():
    # GPU machines run the sidecar without either package installed.
    code = ("import sys, faastube_sidecar.cli, faastube_sidecar.app, faastube_sidecar.kube; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'kubernetes', 'google'}))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
