"""Operator settings, fixed at start-up from the command line (never read at import)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import string

from faastube_operator.podresources import (
    DEFAULT_FUNCTION_RESOURCES,
    DEFAULT_GATEWAY_RESOURCES,
    ContainerResources,
)

DEFAULT_IMAGE = "ghcr.io/faastube/faastube:0.1.0"
# The resolution of the heartbeat timestamps sidecars write.
TIMESTAMP_RESOLUTION_S = 1.0


@dataclasses.dataclass(frozen=True)
class PeeringSettings:
    """Several replicas, one active: kopf's peering through a ClusterKopfPeering object.

    kopf pauses every replica that sees a live peer of higher (or equal) priority, so each
    replica takes its own random priority: the highest one acts, the others stand by,
    and one takes over when the active one's keep-alive stops (at once when it exits
    cleanly, after ``lifetime_s`` when it dies).
    """

    name: str | None = None  # None: standalone, no peering (one replica only)
    identity: str = ""  # unique per process; "" for the host name and process id
    priority: int = 0
    lifetime_s: int = 60

    def __post_init__(self) -> None:
        if self.name is not None and not self.name:
            raise ValueError("peering name: must not be empty")
        if self.lifetime_s < 2:
            raise ValueError(f"peering lifetime_s: {self.lifetime_s} is under 2 seconds")

    @property
    def enabled(self) -> bool:
        return self.name is not None


@dataclasses.dataclass(frozen=True)
class NodeHealthSettings:
    """When a GpuNode counts as gone: its sidecar's heartbeat stopped for a while.

    The sidecar patches ``status.lastHeartbeatTime`` every ``heartbeat_s`` (its
    ``--heartbeat``); after ``missed_heartbeats`` of them without a change the operator
    marks the GpuNode NotReady and its workflows are placed again. The timestamp has
    whole seconds (a ``metav1.Time``, as a Node's heartbeat), so it changes at most once
    a second: a sidecar heartbeating faster counts as heartbeating every second.
    """

    heartbeat_s: float = 10.0
    missed_heartbeats: int = 3

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s: must be > 0")
        if self.missed_heartbeats < 1:
            raise ValueError("missed_heartbeats: must be at least 1")

    @property
    def stale_after_s(self) -> float:
        return max(self.heartbeat_s, TIMESTAMP_RESOLUTION_S) * self.missed_heartbeats


# Where the scaling loop asks a workflow's gateway for its decisions (GET <url>/scale).
DEFAULT_GATEWAY_URL_TEMPLATE = "http://{service}.{namespace}.svc:{port}"
GATEWAY_URL_FIELDS = frozenset({"service", "namespace", "port", "workflow"})


@dataclasses.dataclass(frozen=True)
class AutoscalingSettings:
    """How the active replica scales autoscaled functions' Deployments (``autoscaler``).

    Every ``interval_s`` it asks each deployed workflow's gateway for ``GET /scale``
    at ``gateway_url_template`` (``{service}``, ``{namespace}``, ``{port}`` and
    ``{workflow}`` filled in), waiting at most ``timeout_s``, and sets the replicas the
    gateway decided. ``enabled=False`` leaves replicas to another scaler (KEDA, an HPA):
    the operator still sets an autoscaled function's starting count, once.
    """

    enabled: bool = True
    interval_s: float = 2.0
    gateway_url_template: str = DEFAULT_GATEWAY_URL_TEMPLATE
    timeout_s: float = 1.0
    # At most one ScaledUp/ScaledDown event per function this often (the changes between
    # are counted into the next event), and one warning per unreachable gateway.
    event_interval_s: float = 10.0
    warning_interval_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "event_interval_s", "warning_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"autoscaling {name}: must be > 0")
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(self.gateway_url_template)
                      if field is not None}
        except ValueError as e:
            raise ValueError(f"gateway URL template {self.gateway_url_template!r}: {e}") from None
        unknown = fields - GATEWAY_URL_FIELDS
        if unknown:
            raise ValueError(f"gateway URL template {self.gateway_url_template!r}: unknown field(s) "
                             f"{', '.join(repr(u) for u in sorted(unknown))} (known: {', '.join(sorted(GATEWAY_URL_FIELDS))})")
        if not self.gateway_url_template.startswith(("http://", "https://")):
            raise ValueError(f"gateway URL template {self.gateway_url_template!r}: must start with "
                             "http:// or https://")

    def gateway_url(self, *, service: str, namespace: str, port: int, workflow: str) -> str:
        """The base URL of one workflow's gateway (``/scale`` is appended by the caller)."""
        return self.gateway_url_template.format(service=service, namespace=namespace, port=port,
                                                workflow=workflow).rstrip("/")


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    # Image of the workflow runtime: the gateway runs ``faastube gateway`` in it.
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    gateway_port: int = 8080
    # Function pods run ``faastube worker`` listening on this port; the gateway finds
    # them through each function's headless Service.
    worker_port: int = 8081
    # The sidecar's socket directory on every node; function pods mount the directory
    # (not the socket file) so a restarted sidecar's new socket is visible to them.
    socket_dir: str = "/var/run/faastube"
    socket_name: str = "faastube.sock"
    mount_socket_dir: bool = True
    # The group the sidecar's socket admits (its --socket-group); function and gateway pods
    # get it as a supplemental group. None: the pods' own groups must already match.
    socket_group: int | None = None
    # How often the active replica sweeps: Ready refreshed from the children's rollout
    # state, GpuNodes whose heartbeat stopped marked NotReady.
    status_interval_s: float = 10.0
    # Delay before re-trying a workflow that could not be placed or hit an API error.
    retry_delay_s: float = 30.0
    default_network_bandwidth_bytes_per_s: float = 12.5e9
    # Namespaces (kopf patterns) the operator serves; empty: all.
    namespaces: tuple[str, ...] = ()
    peering: PeeringSettings = PeeringSettings()
    node_health: NodeHealthSettings = NodeHealthSettings()
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    # RuntimeClass of GPU function pods: the NVIDIA runtime when the device plugin hands GPUs
    # over as NVIDIA_VISIBLE_DEVICES; "" (none) with its CDI exposure.
    gpu_runtime_class: str = ""
    # Requests and limits of function and gateway containers (a Workflow declares none).
    function_resources: ContainerResources = DEFAULT_FUNCTION_RESOURCES
    gateway_resources: ContainerResources = DEFAULT_GATEWAY_RESOURCES

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("image: must not be empty")
        if not 1 <= self.gateway_port <= 65535:
            raise ValueError(f"gateway_port: {self.gateway_port} is not a TCP port")
        if not 1 <= self.worker_port <= 65535:
            raise ValueError(f"worker_port: {self.worker_port} is not a TCP port")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"image_pull_policy: {self.image_pull_policy!r} is not "
                             "Always, IfNotPresent or Never")
        if self.status_interval_s <= 0 or self.retry_delay_s <= 0:
            raise ValueError("status_interval_s and retry_delay_s: must be > 0")
        if self.default_network_bandwidth_bytes_per_s <= 0:
            raise ValueError("default_network_bandwidth_bytes_per_s: must be > 0")
        if self.gpu_runtime_class and not _DNS_SUBDOMAIN.match(self.gpu_runtime_class):
            raise ValueError(f"gpu_runtime_class: {self.gpu_runtime_class!r} is not a RuntimeClass name")

    def serves(self, namespace: str) -> bool:
        return not self.namespaces or any(fnmatch.fnmatchcase(namespace, pattern)
                                          for pattern in self.namespaces)

    @property
    def socket_path(self) -> str:
        return f"{self.socket_dir.rstrip('/')}/{self.socket_name}"


_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
