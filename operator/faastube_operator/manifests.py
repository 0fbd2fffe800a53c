"""Pure builders of the Kubernetes objects a Workflow owns.

Nothing here talks to the API: each builder is a function of the parsed
workflow, where its functions were placed and the operator settings, so tests
check the objects without a cluster and the handlers stay thin. Owner
references are added by the caller (``kopf.adopt``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from faastube_placement import Where
from faastube_spec import api
from faastube_spec.workflow import GATEWAY_FUNCTION, FunctionSpec, Workflow, dump_workflow

from faastube_operator.settings import OperatorSettings

GROUP = api.GROUP
LABEL_WORKFLOW = "faastube.io/workflow"
LABEL_FUNCTION = "faastube.io/function"
LABEL_COMPONENT = "faastube.io/component"
ANNOTATION_SPEC_HASH = "faastube.io/spec-hash"
ANNOTATION_PLACEMENT = "faastube.io/placement"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# The gateway also uses the node's sidecar, which admits only pods labelled with a
# workflow and a function: it is the workflow's "gateway", a name the workflow parser
# reserves (no function may take it, so `<workflow>-gateway` is never a function's too).
GATEWAY = GATEWAY_FUNCTION
HEALTH_PATH = "/healthz"  # faastube_runtime.wire.HEALTH_PATH (the operator imports no runtime)
# How long a function pod may take to get warm (import, sidecar, model load, warm-up call)
# before its container is restarted: the startup probe's period x failure threshold.
WORKER_WARMUP_LIMIT_S = 600
_STARTUP_PERIOD_S = 5
# The sidecar's device plugin (the operator imports no sidecar): this resource's Allocate
# mounts the socket directory into pods that get no GPU, so they need no hostPath volume.
SOCKET_RESOURCE = f"{GROUP}/socket"
# Every workflow pod runs on a node with a sidecar, a GPU node; GPU nodes are often tainted
# so that only GPU pods land there. Our pods ask for faastube.io resources, not nvidia.com/gpu,
# so the ExtendedResourceToleration admission plugin does not add this toleration for them.
GPU_NODE_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
MAX_NAME_LENGTH = 63  # DNS-1123 label: Service names and the pods' hostname prefix


def gpu_resource_name(gpu_index: int) -> str:
    """The device plugin's extended resource for one GPU of a node."""
    return f"{GROUP}/gpu-{gpu_index}"


def child_name(*parts: str) -> str:
    """``a-b`` if it is a valid label length, else a truncated prefix plus a stable hash."""
    name = "-".join(parts)
    if len(name) <= MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:MAX_NAME_LENGTH - 11].rstrip('-')}-{digest}"


def function_deployment_name(workflow_name: str, function_name: str) -> str:
    return child_name(workflow_name, function_name)


def gateway_name(workflow_name: str) -> str:
    return child_name(workflow_name, GATEWAY)


def function_service_name(workflow_name: str, function_name: str) -> str:
    """The headless Service of a function: its DNS name lists the ready replicas."""
    return child_name(workflow_name, function_name)


def function_service_host(workflow_name: str, function_name: str, namespace: str) -> str:
    return f"{function_service_name(workflow_name, function_name)}.{namespace}.svc"


def spec_hash(spec: Mapping[str, Any]) -> str:
    """A short stable digest of a Workflow spec; a new one rolls every function."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def common_labels(workflow_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/part-of": "faastube",
        "app.kubernetes.io/managed-by": "faastube-operator",
        "app.kubernetes.io/instance": workflow_name,
        LABEL_WORKFLOW: workflow_name,
    }


def function_labels(workflow_name: str, function_name: str) -> dict[str, str]:
    return {**common_labels(workflow_name), LABEL_FUNCTION: function_name,
            LABEL_COMPONENT: "function", "app.kubernetes.io/name": "faastube-function"}


def gateway_labels(workflow_name: str) -> dict[str, str]:
    return {**common_labels(workflow_name), LABEL_COMPONENT: GATEWAY,
            "app.kubernetes.io/name": "faastube-gateway"}


def _required_node_affinity(node: str) -> dict[str, Any]:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}}}


def _colocated_affinity(workflow_name: str) -> dict[str, Any]:
    """Unpinned pods of a workflow share one node: refs live in one node's sidecar.

    The first pod goes anywhere (a pod matching its own affinity term may start a
    group), the others follow it.
    """
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {LABEL_WORKFLOW: workflow_name}},
         "topologyKey": HOSTNAME_LABEL}]}}


def _affinity(workflow_name: str, node: str | None) -> dict[str, Any]:
    """A pin to ``node``, else co-location; the other kind is None so that a merge
    patch removes it when a workflow moves between the two."""
    if node:
        return {**_required_node_affinity(node), "podAffinity": None}
    return {"nodeAffinity": None, **_colocated_affinity(workflow_name)}


def workflow_document(workflow: Workflow) -> str:
    """The Workflow as JSON, for ``FAASTUBE_WORKFLOW_DOCUMENT`` of function pods."""
    return json.dumps(dump_workflow(workflow), sort_keys=True, separators=(",", ":"))


def _socket_access(
    settings: OperatorSettings, *, gpu: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """How a pod reaches the sidecar's socket directory: (volumes, mounts, extended resources).

    A GPU's ``faastube.io/gpu-<i>`` allocation adds the mount; other pods ask for one
    ``faastube.io/socket`` device, whose allocation adds it, unless the operator is told to
    mount the directory itself (a hostPath, which Pod Security "baseline" forbids).
    """
    if gpu is not None:
        return [], [], {gpu_resource_name(gpu): 1}
    if not settings.mount_socket_dir:
        return [], [], {SOCKET_RESOURCE: 1}
    volumes = [{"name": "faastube-socket",
                "hostPath": {"path": settings.socket_dir, "type": "Directory"}}]
    mounts = [{"name": "faastube-socket", "mountPath": settings.socket_dir}]
    return volumes, mounts, {}


def _env(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": key, "value": value} for key, value in pairs]


def _pod_security(settings: OperatorSettings) -> dict[str, Any]:
    """The sidecar's socket admits one group: pods that connect to it join that group."""
    if settings.socket_group is None:
        return {}
    return {"securityContext": {"supplementalGroups": [settings.socket_group]}}


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def function_deployment(
    workflow: Workflow,
    fn: FunctionSpec,
    *,
    namespace: str,
    where: Where,
    settings: OperatorSettings,
    workflow_spec_hash: str,
) -> dict[str, Any]:
    """One Deployment per function, pinned to its placement; without ``replicas`` when the
    function is autoscaled (``reconcile.apply_autoscaled``).

    Its container runs ``faastube worker``, which serves the function's calls on
    ``settings.worker_port`` and learns the rest (workflow document, function,
    sidecar socket, GPU) from the environment built here. It is ready once
    ``/healthz`` answers 200: the handler is imported, the sidecar reached and the
    function warm (its ``warmup`` hook and a warm-up call ran).
    """
    labels = function_labels(workflow.name, fn.name)
    selector = {LABEL_WORKFLOW: workflow.name, LABEL_FUNCTION: fn.name}
    gpu = where.gpu if fn.gpu else None
    volumes, mounts, extended = _socket_access(settings, gpu=gpu)
    env = [
        ("FAASTUBE_WORKFLOW", workflow.name),
        ("FAASTUBE_NAMESPACE", namespace),
        ("FAASTUBE_FUNCTION", fn.name),
        ("FAASTUBE_HANDLER", fn.handler),
        ("FAASTUBE_SOCKET", settings.socket_path),
        ("FAASTUBE_GATEWAY",
         f"http://{gateway_name(workflow.name)}.{namespace}.svc:{settings.gateway_port}"),
        ("FAASTUBE_WORKFLOW_DOCUMENT", workflow_document(workflow)),
    ]
    container: dict[str, Any] = {
        "name": "function",
        "image": fn.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["faastube", "worker", "--listen", f"tcp://0.0.0.0:{settings.worker_port}"],
        "env": _env(env) + [{"name": "FAASTUBE_NODE",
                             "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": [{"name": "http", "containerPort": settings.worker_port, "protocol": "TCP"}],
        # Ready once warm (the handler's warmup hook and a warm-up call ran; 503 until then). The
        # startup probe gives a slow model load WORKER_WARMUP_LIMIT_S before the container is
        # restarted; readiness is checked after it, as before.
        "startupProbe": {"httpGet": {"path": HEALTH_PATH, "port": "http"},
                         "periodSeconds": _STARTUP_PERIOD_S,
                         "failureThreshold": WORKER_WARMUP_LIMIT_S // _STARTUP_PERIOD_S},
        "readinessProbe": {"httpGet": {"path": HEALTH_PATH, "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 3},
        "volumeMounts": mounts,
        "securityContext": _security_context(),
        "resources": settings.function_resources.to_kubernetes(extended=extended),
    }
    if gpu is not None:
        container["env"].append({"name": "FAASTUBE_GPU_INDEX", "value": str(gpu)})
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes, **_pod_security(settings),
                                "enableServiceLinks": False,
                                "affinity": _affinity(workflow.name, where.node),
                                "tolerations": [dict(t) for t in GPU_NODE_TOLERATIONS],
                                # None lets a merge patch drop a class the pod no longer needs.
                                "runtimeClassName": (settings.gpu_runtime_class or None
                                                     if gpu is not None else None)}
    placement_note = "anywhere" if where.node is None else (
        where.node if where.gpu is None else f"{where.node}/gpu-{where.gpu}")
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": {"labels": dict(labels),
                         "annotations": {ANNOTATION_SPEC_HASH: workflow_spec_hash,
                                         ANNOTATION_PLACEMENT: placement_note}},
            "spec": pod_spec,
        },
    }
    if not fn.autoscaled:  # an autoscaled function's count is the autoscaler's
        spec = {"replicas": fn.replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": function_deployment_name(workflow.name, fn.name),
                     "namespace": namespace, "labels": labels},
        "spec": spec,
    }


def function_service(workflow: Workflow, fn: FunctionSpec, *, namespace: str,
                     settings: OperatorSettings) -> dict[str, Any]:
    """A headless Service per function: the gateway resolves it to the ready replicas."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": function_service_name(workflow.name, fn.name), "namespace": namespace,
                     "labels": function_labels(workflow.name, fn.name)},
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_WORKFLOW: workflow.name, LABEL_FUNCTION: fn.name},
            "ports": [{"name": "http", "port": settings.worker_port,
                       "targetPort": "http", "protocol": "TCP"}],
        },
    }


def gateway_deployment(
    workflow: Workflow,
    *,
    namespace: str,
    spec: Mapping[str, Any],
    node: str | None,
    settings: OperatorSettings,
    workflow_spec_hash: str,
) -> dict[str, Any]:
    """The workflow's HTTP entry point, on the workflow's node (its data is there).

    It reaches every function through that function's headless Service.
    """
    labels = gateway_labels(workflow.name)
    volumes, mounts, extended = _socket_access(settings, gpu=None)
    document = {"apiVersion": api.API_VERSION, "kind": api.WORKFLOW_KIND,
                "metadata": {"name": workflow.name}, "spec": dict(spec)}
    services = [
        f"--function-service={fn.name}="
        f"{function_service_host(workflow.name, fn.name, namespace)}:{settings.worker_port}"
        for fn in workflow.functions]
    container: dict[str, Any] = {
        "name": GATEWAY,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["faastube", "gateway", "--port", str(settings.gateway_port), *services],
        "env": _env([
            ("FAASTUBE_WORKFLOW", workflow.name),
            ("FAASTUBE_NAMESPACE", namespace),
            ("FAASTUBE_SOCKET", settings.socket_path),
            ("FAASTUBE_WORKFLOW_DOCUMENT", json.dumps(document, sort_keys=True)),
        ]),
        "ports": [{"name": "http", "containerPort": settings.gateway_port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
        "volumeMounts": mounts,
        "securityContext": _security_context(),
        "resources": settings.gateway_resources.to_kubernetes(extended=extended),
    }
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes, **_pod_security(settings),
                                "enableServiceLinks": False,
                                "affinity": _affinity(workflow.name, node),
                                "tolerations": [dict(t) for t in GPU_NODE_TOLERATIONS]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": gateway_name(workflow.name), "namespace": namespace,
                     "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {LABEL_WORKFLOW: workflow.name,
                                         LABEL_COMPONENT: GATEWAY}},
            "template": {
                "metadata": {"labels": {**labels, LABEL_FUNCTION: GATEWAY_FUNCTION},
                             "annotations": {ANNOTATION_SPEC_HASH: workflow_spec_hash}},
                "spec": pod_spec,
            },
        },
    }


def gateway_service(workflow: Workflow, *, namespace: str,
                    settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": gateway_name(workflow.name), "namespace": namespace,
                     "labels": gateway_labels(workflow.name)},
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_WORKFLOW: workflow.name, LABEL_COMPONENT: GATEWAY},
            "ports": [{"name": "http", "port": settings.gateway_port,
                       "targetPort": "http", "protocol": "TCP"}],
        },
    }


def workflow_children(
    workflow: Workflow,
    *,
    namespace: str,
    spec: Mapping[str, Any],
    placement: Mapping[str, Where],
    settings: OperatorSettings,
) -> list[dict[str, Any]]:
    """Every object the Workflow owns: per function (topological order) a Deployment and a
    headless Service, then the gateway's Deployment and Service."""
    digest = spec_hash(spec)
    objects: list[dict[str, Any]] = []
    for name in workflow.topological_order():
        fn = workflow.function(name)
        objects.append(function_deployment(workflow, fn, namespace=namespace,
                                           where=placement.get(name, Where(node=None)),
                                           settings=settings, workflow_spec_hash=digest))
        objects.append(function_service(workflow, fn, namespace=namespace, settings=settings))
    objects.append(gateway_deployment(
        workflow, namespace=namespace, spec=spec, node=workflow_node(workflow, placement),
        settings=settings, workflow_spec_hash=digest))
    objects.append(gateway_service(workflow, namespace=namespace, settings=settings))
    return objects


def workflow_node(workflow: Workflow, placement: Mapping[str, Where]) -> str | None:
    """The node the gateway joins: its entry function's, else any placed function's."""
    entry = placement.get(workflow.entry)
    if entry is not None and entry.node is not None:
        return entry.node
    return next((w.node for w in placement.values() if w.node is not None), None)


def placement_nodes(placement: Mapping[str, Where]) -> set[str]:
    return {w.node for w in placement.values() if w.node is not None}
