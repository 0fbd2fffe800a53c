"""``faastube operator``: run the kopf operator with metrics, a health endpoint and peering."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, cast

from faastube_operator.podresources import ContainerResources
from faastube_operator.settings import (
    DEFAULT_GATEWAY_URL_TEMPLATE,
    DEFAULT_IMAGE,
    AutoscalingSettings,
    NodeHealthSettings,
    OperatorSettings,
    PeeringSettings,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", default=DEFAULT_IMAGE,
                        help="image of the workflow runtime (gateway)")
    parser.add_argument("--image-pull-policy", default="IfNotPresent",
                        choices=("Always", "IfNotPresent", "Never"))
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument("--worker-port", type=int, default=8081,
                        help="port function pods serve calls on (faastube worker)")
    parser.add_argument("--socket-dir", default="/var/run/faastube",
                        help="the sidecar's socket directory on every node")
    parser.add_argument("--socket-name", default="faastube.sock")
    parser.add_argument("--socket-group", type=int, metavar="GID",
                        help="the group the sidecar's socket admits (its --socket-group): function and "
                             "gateway pods get it as a supplemental group")
    parser.add_argument("--no-socket-mount", action="store_true",
                        help="do not mount the socket directory (the device plugin adds it)")
    parser.add_argument("--gpu-runtime-class", default="", metavar="NAME",
                        help="RuntimeClass of GPU function pods (e.g. nvidia when the device plugin "
                             "exposes GPUs through NVIDIA_VISIBLE_DEVICES); default: none")
    parser.add_argument("--function-resources", type=_resources, metavar="JSON",
                        help='requests and limits of function containers, e.g. {"requests": {"cpu": '
                             '"500m", "memory": "1Gi"}, "limits": {"memory": "8Gi"}} (the default)')
    parser.add_argument("--gateway-resources", type=_resources, metavar="JSON",
                        help='requests and limits of gateway containers (default {"requests": '
                             '{"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "6Gi"}})')
    parser.add_argument("--status-interval-s", type=float, default=10.0,
                        help="how often the active replica sweeps: Ready refreshed from the "
                             "deployments, GpuNodes whose heartbeat stopped marked NotReady")
    parser.add_argument("--retry-delay-s", type=float, default=30.0)
    parser.add_argument("--default-network-bandwidth-GBps", type=float, default=12.5,
                        dest="network_GBps", help="between nodes, 10^9 bytes/s")
    parser.add_argument("--metrics-port", type=int, default=9090, help="0 disables metrics")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--liveness-port", type=int, default=8081, help="0 disables /healthz")
    parser.add_argument("--namespace", action="append", default=[],
                        help="watch only these namespaces (repeatable); default: all")
    parser.add_argument("--peering", default=None, metavar="NAME",
                        help="the ClusterKopfPeering several replicas share (created if missing): "
                             "one replica acts, the others stand by; default: standalone")
    parser.add_argument("--peering-priority", type=int, default=None,
                        help="this replica's priority among its peers (the highest acts); "
                             "default: random, so that replicas never tie")
    parser.add_argument("--peering-lifetime-s", type=int, default=60,
                        help="how long a silent peer counts as alive: the failover time when "
                             "the active replica dies without saying goodbye")
    parser.add_argument("--gpunode-heartbeat-s", type=float, default=10.0,
                        help="how often sidecars heartbeat their GpuNode (their --heartbeat)")
    parser.add_argument("--gpunode-missed-heartbeats", type=int, default=3,
                        help="heartbeats missed before a GpuNode is marked NotReady")
    scaling = parser.add_argument_group(
        "autoscaling (functions with minReplicas/maxReplicas; docs/operator.md, \"Autoscaling\")")
    defaults = AutoscalingSettings()
    scaling.add_argument("--no-autoscaling", action="store_true",
                         help="do not scale function Deployments (leave replicas to KEDA or an HPA); "
                              "autoscaled functions still start at their replicas")
    scaling.add_argument("--autoscaling-interval-s", type=float, default=defaults.interval_s,
                         help="how often the active replica asks every gateway for GET /scale and "
                              "sets the replicas it decided (default %(default)s)")
    scaling.add_argument("--gateway-url-template", default=DEFAULT_GATEWAY_URL_TEMPLATE, metavar="URL",
                         help="where a workflow's gateway answers, with {service}, {namespace}, {port} "
                              "and {workflow} filled in (default %(default)s)")
    scaling.add_argument("--gateway-scrape-timeout-s", type=float, default=defaults.timeout_s,
                         help="how long one GET /scale may take (default %(default)s)")


def _resources(text: str) -> ContainerResources:
    try:
        return ContainerResources.parse(json.loads(text))
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise argparse.ArgumentTypeError(str(e)) from None


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    from faastube_operator import leadership

    peering = PeeringSettings(
        name=args.peering, identity=leadership.new_identity(),
        priority=args.peering_priority if args.peering_priority is not None
        else leadership.new_priority(),
        lifetime_s=args.peering_lifetime_s)
    resources = {name: value for name in ("function_resources", "gateway_resources")
                 if (value := getattr(args, name)) is not None}
    return OperatorSettings(
        image=args.image, image_pull_policy=args.image_pull_policy,
        gateway_port=args.gateway_port, worker_port=args.worker_port, socket_dir=args.socket_dir,
        socket_name=args.socket_name, mount_socket_dir=not args.no_socket_mount, socket_group=args.socket_group,
        status_interval_s=args.status_interval_s, retry_delay_s=args.retry_delay_s,
        default_network_bandwidth_bytes_per_s=args.network_GBps * 1e9,
        gpu_runtime_class=args.gpu_runtime_class,
        namespaces=tuple(args.namespace), peering=peering,
        node_health=NodeHealthSettings(heartbeat_s=args.gpunode_heartbeat_s,
                                       missed_heartbeats=args.gpunode_missed_heartbeats),
        autoscaling=AutoscalingSettings(enabled=not args.no_autoscaling,
                                        interval_s=args.autoscaling_interval_s,
                                        gateway_url_template=args.gateway_url_template,
                                        timeout_s=args.gateway_scrape_timeout_s),
        **resources)


def run(args: argparse.Namespace) -> int:
    import kopf
    import prometheus_client

    from faastube_operator import handlers
    from faastube_operator.metrics import OperatorMetrics

    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"faastube operator: {e}")
        return 2
    registry = prometheus_client.CollectorRegistry()
    metrics = OperatorMetrics.build(registry)
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port, addr=args.metrics_host,
                                            registry=registry)
        logger.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    kopf_registry = kopf.OperatorRegistry()
    handlers.register(kopf_registry, settings=settings, metrics=metrics)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    if settings.peering.enabled:
        logger.info("peering %s as %s with priority %d", settings.peering.name,
                    settings.peering.identity, settings.peering.priority)
    kopf.run(
        registry=kopf_registry,
        standalone=not settings.peering.enabled,
        peering_name=settings.peering.name,
        # kopf's Identity is a NewType of str that kopf does not export.
        identity=cast(Any, settings.peering.identity or None),
        priority=settings.peering.priority,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=liveness,
    )
    return 0
