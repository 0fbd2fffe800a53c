"""The sidecar's Kubernetes pieces, wired: device plugin, GpuNode publisher, pod attestation.

The device plugin and the node publisher describe the same GPUs, so they share one
topology and one :class:`~faastube_sidecar.gpuhealth.HealthMonitor`: the kubelet and the
operator never disagree about which GPU is healthy or how many slots it has.

grpcio and the kubernetes client are imported only here, and only when a flag asks for
them: GPU test machines and CPU-only nodes run the sidecar without either installed.
Everything that can fail on configuration (no GPU, no kubeconfig, missing package)
happens in :meth:`KubernetesPieces.prepare`, before the sidecar binds its socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from faastube import locations
from faastube.errors import FaastubeError
from faastube.locations import Location
from faastube_spec import gpunode, topology

from faastube_sidecar import discovery, gpuhealth, identity, nics, nodepublisher

logger = logging.getLogger(__name__)

DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_HEARTBEAT_S = 10.0
# Mirrors of deviceplugin's defaults, kept here so that reading the settings needs no gRPC.
DEFAULT_CDI_KIND = "nvidia.com/gpu"
DEFAULT_CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")


class KubeSetupError(FaastubeError):
    """This node or cluster cannot do what the flags ask; fix the setup, retrying won't help."""


@dataclasses.dataclass(frozen=True)
class KubeSettings:
    device_plugin: bool = False
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    sharing_slots: int | None = None          # None: the topology's own (4 for discovered GPUs)
    # How an allocated GPU reaches the container: envvar, cdi or cdi-annotations
    # (deviceplugin.GpuExposure), and the CDI names and spec directories of the cdi modes.
    gpu_exposure: str = "envvar"
    cdi_kind: str = DEFAULT_CDI_KIND
    cdi_device_name: str = "uuid"
    cdi_spec_dirs: tuple[str, ...] = DEFAULT_CDI_SPEC_DIRS
    socket_devices: int = 0                   # faastube.io/socket devices; 0: no such resource
    publish_node: bool = False
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    simulated_topology: str | None = None     # a faastube_spec.topology.builtin() name; None: NVML
    kubeconfig: str | None = None             # None: in-cluster if possible, else the default file
    proc_root: str = "/proc"                  # where peers' /proc/<pid>/cgroup are read
    sysfs_root: str = "/sys"                  # where the NICs published with the GpuNode are found
    health_interval_s: float = 5.0
    stop_timeout_s: float = 5.0

    @property
    def needs_topology(self) -> bool:
        return self.device_plugin or self.publish_node


# --- topology ---------------------------------------------------------------------------


def resolve_topology(settings: KubeSettings, *, node_name: str | None) -> topology.NodeTopology:
    """This node's topology: simulated when asked, else discovered through NVML.

    ``node_name`` renames the node (the GpuNode is named after the Kubernetes node), and
    ``settings.sharing_slots`` applies to every GPU, so that the published topology and
    the device plugin offer the same number of slots.
    """
    if settings.simulated_topology is not None:
        try:
            node = topology.builtin_node(settings.simulated_topology)
        except topology.TopologyError as e:
            raise KubeSetupError(f"--simulated-topology: {e}") from e
        logger.warning("using the simulated topology %r: the GPUs it lists are not this machine's",
                       settings.simulated_topology)
    else:
        try:
            node = discovery.discover_local_node(node_name=node_name)
        except discovery.NoGpuVisible as e:
            raise KubeSetupError(
                f"--device-plugin and --publish-node need GPUs, but {e}; "
                "pass --simulated-topology NAME to run them without GPUs (tests, development)"
            ) from e
        # NVML numbers GPUs in PCI bus order; make CUDA (the pools' "gpu:N") agree.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            logger.warning("CUDA_VISIBLE_DEVICES=%s renumbers CUDA devices: pool stats of GPU N "
                           "are those of CUDA device N", os.environ["CUDA_VISIBLE_DEVICES"])
    gpus = node.gpus
    if settings.sharing_slots is not None:
        gpus = tuple(dataclasses.replace(g, sharing_slots=settings.sharing_slots) for g in gpus)
    return topology.NodeTopology(name=node_name or node.name, gpus=gpus, links=node.links,
                                 host_memory_bytes=node.host_memory_bytes)


# --- pool stats for the GpuNode status ----------------------------------------------------


class PoolOwner(Protocol):
    """The part of the DataPlane read here (kept narrow: the data plane is evolving)."""

    @property
    def budgets(self) -> Mapping[Any, Any]: ...  # Location -> Budget (with .max_bytes)

    def pool_stats(self) -> Sequence[Any]: ...  # PoolStats(location, reserved_bytes, used_bytes, ...)


class DataPlanePoolStats:
    """``nodepublisher.PoolStatsSource`` over the data plane's pools ``gpu:<index>``.

    A GPU without a pool (the host backend on a simulated topology) reports an empty pool
    with the configured limit: what a pool on it would be allowed to reserve.
    """

    def __init__(self, dataplane: PoolOwner, gpu_indices: Sequence[int], *,
                 default_limit_bytes: int) -> None:
        self._dataplane = dataplane
        self._indices = tuple(gpu_indices)
        self._default_limit_bytes = default_limit_bytes

    def missing_pools(self) -> list[int]:
        return [i for i in self._indices if _location(i) not in self._dataplane.budgets]

    def pool_stats(self) -> Mapping[int, nodepublisher.GpuPoolStats]:
        by_location = {s.location: s for s in self._dataplane.pool_stats()}
        out: dict[int, nodepublisher.GpuPoolStats] = {}
        for index in self._indices:
            stats = by_location.get(_location(index))
            budget = self._dataplane.budgets.get(_location(index))
            if stats is None or budget is None:
                out[index] = nodepublisher.GpuPoolStats(0, 0, self._default_limit_bytes)
            else:
                out[index] = nodepublisher.GpuPoolStats(stats.reserved_bytes, stats.used_bytes, budget.max_bytes)
        return out


def _location(gpu_index: int) -> Location:
    return locations.gpu(gpu_index)


# --- health -------------------------------------------------------------------------------


class _CloseAfterStop:
    """Wraps the NVML source: HealthMonitor.stop() closes its source while the worker
    thread may still wait on NVML's event set, and freeing that set under a waiter is
    undefined behaviour in the driver. The real close runs once the monitor has stopped."""

    def __init__(self, source: gpuhealth.GpuHealthSource) -> None:
        self.source = source

    def poll(self, uuids: Sequence[str], *, timeout_s: float) -> Mapping[str, gpuhealth.GpuHealth]:
        return self.source.poll(uuids, timeout_s=timeout_s)

    def close(self) -> None:
        pass


def _health_source(node: topology.NodeTopology, *, simulated: bool) -> gpuhealth.GpuHealthSource:
    if simulated:
        # Nothing else runs on a simulated GPU: all of its memory is free.
        return gpuhealth.FixedHealthSource({g.uuid: g.memory_bytes for g in node.gpus})
    return _CloseAfterStop(gpuhealth.NvmlHealthSource())


# --- Kubernetes API client ------------------------------------------------------------------


def api_client(kubeconfig: str | None) -> Any:
    """A ``kubernetes.client.ApiClient``: ``kubeconfig`` if given, else in-cluster when
    ``KUBERNETES_SERVICE_HOST`` is set, else the default kubeconfig ($KUBECONFIG, ~/.kube)."""
    try:
        from kubernetes import client, config
    except ImportError as e:
        raise KubeSetupError(
            f"the kubernetes client is not installed ({e}); pip install 'faastube[sidecar]'"
        ) from e
    configuration = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
            source = "in-cluster service account"
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            source = f"kubeconfig {kubeconfig or os.environ.get('KUBECONFIG') or '~/.kube/config'}"
    except Exception as e:  # the edge: every config failure becomes one clear message
        raise KubeSetupError(f"cannot configure the Kubernetes client: {e}") from e
    logger.info("Kubernetes API %s (from %s)", configuration.host, source)
    return client.ApiClient(configuration)


# --- the pieces together --------------------------------------------------------------------


class KubernetesPieces:
    """Prepared before the sidecar binds its socket, started after, stopped before it."""

    def __init__(self, settings: KubeSettings, *, node: topology.NodeTopology | None,
                 client: Any | None, node_name: str | None,
                 nics: tuple[gpunode.Nic, ...] = ()) -> None:
        self.settings = settings
        self.node = node
        self.nics = nics
        self._client = client
        self._node_name = node_name
        self._health: gpuhealth.HealthMonitor | None = None
        self._source: gpuhealth.GpuHealthSource | None = None
        self._plugin: Any | None = None      # deviceplugin.DevicePluginService
        self._publisher: nodepublisher.NodePublisher | None = None

    @property
    def health(self) -> gpuhealth.HealthMonitor | None:
        """The monitor the plugin and the publisher share (None until started)."""
        return self._health

    @classmethod
    def prepare(cls, settings: KubeSettings, *, node_name: str | None,
                attest: bool) -> KubernetesPieces:
        if settings.publish_node and not node_name:
            raise KubeSetupError("--publish-node needs the node's name (--node-name or $NODE_NAME)")
        if attest and not node_name:
            raise KubeSetupError("--identity kubernetes needs the node's name (--node-name or $NODE_NAME)")
        if settings.device_plugin:
            try:
                from faastube_sidecar import deviceplugin  # fail now, not after binding
            except Exception as e:  # ImportError, or protobuf's VersionError for old runtimes
                raise KubeSetupError(
                    f"--device-plugin needs grpcio and protobuf ({e}); pip install 'faastube[sidecar]'"
                ) from e
            try:
                _exposure(settings)
                if settings.socket_devices:
                    deviceplugin.SocketResource(settings.socket_devices)
            except FaastubeError as e:
                raise KubeSetupError(f"device plugin: {e}") from e
        node = resolve_topology(settings, node_name=node_name) if settings.needs_topology else None
        client = api_client(settings.kubeconfig) if settings.publish_node or attest else None
        found = _discover_nics(settings.sysfs_root) if settings.publish_node else ()
        return cls(settings, node=node, client=client, node_name=node_name, nics=found)

    def peer_lookup(self):  # -> network.peers.ClusterLookup | None
        """Where other nodes' sidecars answer, read from their GpuNodes (None without a client)."""
        if self._client is None:
            return None
        from kubernetes import client as k8s

        from faastube_sidecar.network.peers import gpunode_lookup

        return gpunode_lookup(k8s.CustomObjectsApi(self._client))

    def attestor(self) -> identity.Attestor:
        if self._client is None or not self._node_name:
            raise KubeSetupError("Kubernetes attestation was not prepared")
        from kubernetes import client as k8s

        pods = identity.KubernetesPodDirectory(k8s.CoreV1Api(self._client), self._node_name)
        return identity.KubernetesAttestor(pods, proc_root=self.settings.proc_root)

    async def start(self, dataplane: PoolOwner, *, socket_path: Path, gpu_limit_bytes: int,
                    network: gpunode.PeerNetwork | None = None) -> None:
        """Health first (both others read it), then the plugin, then the publisher (which
        publishes `network`, where this sidecar serves cross-node reads, when given)."""
        if self.node is None:
            return
        s = self.settings
        self._source = _health_source(self.node, simulated=s.simulated_topology is not None)
        monitored: gpuhealth.GpuHealthSource = self._source
        gpus: list[Any] = []
        if s.device_plugin:
            from faastube_sidecar import deviceplugin

            gpus = deviceplugin.gpu_devices_from_topology(self.node)
            exposure = _exposure(s)
            if exposure.uses_cdi:
                # A GPU whose CDI device no spec defines cannot reach a container: unhealthy,
                # for the kubelet and the GpuNode alike (closing stays with self._source).
                monitored = deviceplugin.CdiCheckedHealth(
                    self._source, devices={g.uuid: exposure.cdi_device(g) for g in gpus},
                    spec_dirs=s.cdi_spec_dirs)
        self._health = gpuhealth.HealthMonitor(monitored, [g.uuid for g in self.node.gpus],
                                               interval_s=s.health_interval_s)
        await self._health.start()
        if s.device_plugin:
            self._plugin = deviceplugin.DevicePluginService(
                gpus, health=self._health,
                socket=deviceplugin.SocketMount(host_dir=str(socket_path.parent),
                                                socket_name=socket_path.name),
                settings=deviceplugin.DevicePluginSettings(plugin_dir=s.kubelet_dir),
                exposure=exposure,
                socket_resource=(deviceplugin.SocketResource(s.socket_devices)
                                 if s.socket_devices else None),
            )
            await self._plugin.start()
            logger.info("device plugin: %d GPUs x %s slots (%s) and %d socket devices in %s",
                        len(self.node.gpus), sorted({g.sharing_slots for g in self.node.gpus}),
                        s.gpu_exposure, s.socket_devices, s.kubelet_dir)
        if s.publish_node:
            from kubernetes import client as k8s

            pools = DataPlanePoolStats(dataplane, self.node.gpu_indices,
                                       default_limit_bytes=gpu_limit_bytes)
            missing = pools.missing_pools()
            if missing and any(not loc.is_host for loc in dataplane.budgets):
                logger.warning("GPUs %s of the topology have no pool in this sidecar", missing)
            self._publisher = nodepublisher.NodePublisher(
                k8s.CustomObjectsApi(self._client), self.node, health=self._health, pools=pools,
                nodes=nodepublisher.CoreV1NodeUids(k8s.CoreV1Api(self._client)),
                settings=nodepublisher.PublisherSettings(interval_s=s.heartbeat_s),
                nics=self.nics, network=network)
            await self._publisher.start()
            logger.info("publishing GpuNode %s every %.3gs", self.node.name, s.heartbeat_s)

    async def stop(self) -> None:
        """The plugin first (the kubelet stops handing out slots), then the publisher and
        health; each step bounded, and a failure does not skip the rest. The API client stays
        open for connections still being attested: :meth:`close` it after the server stops."""
        timeout_s = self.settings.stop_timeout_s
        if self._plugin is not None:
            await _bounded("device plugin", self._plugin.stop(), timeout_s)
            self._plugin = None
        if self._publisher is not None:
            await _bounded("node publisher", self._publisher.stop(), timeout_s)
            self._publisher = None
        if self._health is not None:
            await self._health.stop()  # bounded by the monitor itself (one poll interval)
            self._health = None
        if isinstance(self._source, _CloseAfterStop):
            self._source.source.close()
        self._source = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _discover_nics(sysfs_root: str) -> tuple[gpunode.Nic, ...]:
    """The NICs to publish; none (and a warning) when sysfs cannot be read: the node
    still works, placement then prices its links at the cluster's default bandwidth."""
    try:
        return nics.discover_nics(sysfs_root).nics
    except nics.NicDiscoveryError as e:
        logger.warning("publishing no NICs: %s", e)
        return ()


def _exposure(settings: KubeSettings) -> Any:  # -> deviceplugin.GpuExposure (gRPC imported late)
    from faastube_sidecar import deviceplugin

    return deviceplugin.GpuExposure(mode=settings.gpu_exposure,  # type: ignore[arg-type]
                                    cdi_kind=settings.cdi_kind,
                                    cdi_naming=settings.cdi_device_name)  # type: ignore[arg-type]


async def _bounded(what: str, stopping: Any, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(stopping, timeout_s)
    except TimeoutError:
        logger.warning("%s did not stop within %.3gs", what, timeout_s)
    except Exception:  # keep shutting the rest down
        logger.exception("stopping the %s failed", what)
