"""The real operator process (``faastube operator``) against kmock's Kubernetes emulator.

kmock serves list/watch/patch/delete over real HTTP and honours finalizers, but
it has no controllers, admission or schema pruning (see kubernetes-notes.md):
the test plays the Deployment controller by patching Deployment status, fills
in ``uid``, ``resourceVersion`` and ``generation`` the way the API server would
and keeps the watch gap-free (``ApiServerEmulator``), and checks schema
validation separately (test_crds_schema.py).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("kopf")

from faastube import topology
from faastube_operator import printer

ROOT = Path(__file__).resolve().parents[2]
NS = "team-a"
WF = "faastube.io/v1alpha1"
pytestmark = pytest.mark.timeout(120)


class ApiServerEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock plus the API server's bookkeeping on writes and its list/watch contract.

    kmock stores objects as sent, lists with a dummy resourceVersion and starts every
    watch by streaming all stored objects again. A real API server fills ``uid`` and
    ``creationTimestamp`` on create, gives each write a new ``resourceVersion``, bumps
    ``generation`` on spec changes, and a watch from a list's resourceVersion sends
    only later changes. kopf depends on all of it: it lists, then watches from the
    list's version, and after its own patch it waits for the event carrying the
    patched version. With kmock's constant versions and replayed objects it takes an
    older event as the result of its patch and handles a stale body again; with
    versions but the replay, its optimistic finalizer patch fails on the stale body.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._revision = 0  # etcd's revision: one counter for all writes
        # Serialises writes with their revisions, and lists/watch starts against them, so
        # a revision is applied before any later one and a list's revision covers its items.
        self._writes = asyncio.Lock()

    async def _handle(self, request: Any) -> Any:
        action = getattr(request, "action", None)
        if request.resource is None or action not in (
                kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)
        async with self._writes:
            self._stamp(request, action)
            try:
                return await super()._handle(request)
            except jsonpatch.JsonPatchTestFailed as e:
                # What the API server answers to a failed optimistic `test` op (kopf retries it).
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e

    def _stamp(self, request: Any, action: Any) -> None:
        data = request.data  # mutated in place: the request itself is frozen
        current = self._current(request)
        if action == kmock.action.CREATE and isinstance(data, dict):
            data.setdefault("metadata", {}).update({
                "uid": str(uuid.uuid4()), "resourceVersion": self._next_revision(),
                "generation": 1, "creationTimestamp": _timestamp()})
        elif action == kmock.action.UPDATE and isinstance(data, list):
            # JSON patch: its `test` ops see the old version, as they do on the API server.
            data.append({"op": "add", "path": "/metadata/resourceVersion",
                         "value": self._next_revision()})
        elif action == kmock.action.UPDATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            expected = meta.get("resourceVersion")
            if expected is not None and current and str(expected) != _version(current):
                raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                    f"the object has been modified: resourceVersion {expected} "
                    f"is not {_version(current)}"))
            meta["resourceVersion"] = self._next_revision()
            if request.subresource is None and "spec" in data:
                meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        elif action == kmock.action.DELETE and current:
            meta = current.get("metadata") or {}
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                # Setting deletionTimestamp is a write; kmock makes it keeping the version.
                for key, obj in self.objects.items():
                    if self._is(request, key) and not obj.deleted:
                        obj.patch({"metadata": {"resourceVersion": self._next_revision()}})

    async def _serve_list(self, request: Any) -> Any:
        await super()._serve_list(request)  # its checks (unknown resource: 404)
        async with self._writes:
            items = self._stored(request)
            return {"metadata": {"resourceVersion": str(self._revision)}, "items": items}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """Changes after the requested resourceVersion, none lost, none replayed.

        Without a version (or kmock's "..."), the stored objects come first as ADDED,
        as for a watch from "0". The bus is marked and the objects read under the write
        lock, so no write falls between them. Deletions between a list and the watch
        are not replayed (kmock keeps no history of versions); the tests don't need it.
        """
        yield b""  # send the headers now, as kmock does
        since = str((request.params or {}).get("resourceVersion") or "")
        bus = self._buses[request.resource]
        async with self._writes:
            marker = await bus.mark()
            snapshot = [raw for raw in self._stored(request)
                        if not since.isdigit() or int(_version(raw) or 0) > int(since)]
        try:
            for raw in snapshot:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._watched(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)

    def _stored(self, request: Any) -> list[dict[str, Any]]:
        return [obj.raw for key, obj in self.objects.items()
                if not obj.deleted and self._watched(request, *key)]

    @staticmethod
    def _watched(request: Any, resource: Any, namespace: str | None, name: str | None) -> bool:
        return bool(resource == request.resource
                    and (request.namespace is None or namespace == request.namespace)
                    and (request.name is None or name == request.name))

    @staticmethod
    def _is(request: Any, key: tuple[Any, str | None, str]) -> bool:
        return key == (request.resource, request.namespace, request.name)

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _current(self, request: Any) -> dict[str, Any]:
        for key, obj in self.objects.items():
            if self._is(request, key) and not obj.deleted:
                return dict(obj.raw)
        return {}


def _version(obj: dict[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return None if version is None else str(version)


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """HTTP access to the emulator, as kubectl would do it, plus its controller stand-ins."""

    def __init__(self, emulator: Any, session: aiohttp.ClientSession, url: str) -> None:
        self.emulator = emulator
        self.session = session
        self.url = url.rstrip("/")

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, self.url + path, json=body,
                                        headers=headers) as resp:
            data = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, data

    async def get(self, path: str) -> dict[str, Any] | None:
        status, data = await self.request("GET", path)
        return data if status == 200 else None

    async def items(self, path: str) -> list[dict[str, Any]]:
        status, data = await self.request("GET", path)
        assert status == 200, data
        return list(data["items"])

    async def create(self, path: str, obj: dict[str, Any]) -> None:
        status, data = await self.request("POST", path, obj)
        assert status in (200, 201), data

    async def patch(self, path: str, patch: dict[str, Any]) -> None:
        status, data = await self.request("PATCH", path, patch)
        assert status == 200, data

    async def eventually(self, what: str, check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = await check()
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")

    async def finish_rollouts(self) -> None:
        """Play the Deployment controller: every Deployment becomes available."""
        for dep in await self.items(f"/apis/apps/v1/namespaces/{NS}/deployments"):
            replicas = dep["spec"].get("replicas", 1)
            await self.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{dep['metadata']['name']}",
                             {"status": {"replicas": replicas, "updatedReplicas": replicas,
                                         "readyReplicas": replicas, "availableReplicas": replicas}})


def _gpunode(name: str, *, unhealthy: tuple[int, ...] = ()) -> dict[str, Any]:
    node = topology.dump_node(topology.builtin_node("4x-a10"))
    node["name"] = name
    gpus = [{"index": g["index"], "uuid": g["uuid"], "healthy": g["index"] not in unhealthy,
             "poolReservedBytes": 0, "poolUsedBytes": 0, "freeMemoryBytes": g["memoryBytes"]}
            for g in node["gpus"]]
    return {"apiVersion": WF, "kind": "GpuNode", "metadata": {"name": name},
            "spec": {"topology": node},
            "status": {"gpus": gpus, "freePoolBytes": sum(g["freeMemoryBytes"] for g in gpus),
                       "lastHeartbeatTime": "2026-11-27T18:00:00Z",
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                                       "message": "sidecar is up",
                                       "lastTransitionTime": "2026-11-27T18:00:00Z"}]}}


def _workflow(name: str, **spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "slo": "800ms",
        "functions": [
            {"name": "decode", "handler": "functions:decode", "image": "example/fn:1"},
            {"name": "detect", "handler": "functions:detect", "image": "example/fn:1",
             "gpu": {"memory": "8Gi"}},
            {"name": "classify", "handler": "functions:classify", "image": "example/fn:1",
             "gpu": {"memory": "4Gi"}},
        ],
        "edges": [{"from": "decode", "to": "detect", "size": "130MB"},
                  {"from": "detect", "to": "classify", "size": "20MB"}],
    }
    spec.update(spec_changes)
    return {"apiVersion": WF, "kind": "Workflow", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    info = kmock.ResourceInfo
    async with ApiServerEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["faastube.io/v1alpha1/workflows"] = info(
            kind="Workflow", singular="workflow", namespaced=True, shortnames={"ftwf"},
            categories={"faastube"}, subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        emulator.resources["faastube.io/v1alpha1/gpunodes"] = info(
            kind="GpuNode", singular="gpunode", namespaced=False, shortnames={"ftnode"},
            subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "delete"})
        # Without namespaces, `kopf run -A` never starts watching (kubernetes-notes.md).
        emulator.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False,
                                                   verbs={"get", "list", "watch"})
        emulator.resources["apps/v1/deployments"] = info(kind="Deployment", namespaced=True,
                                                         verbs={"get", "list", "create", "patch",
                                                                "delete", "watch"})
        emulator.resources["v1/services"] = info(kind="Service", namespaced=True,
                                                 verbs={"get", "list", "create", "patch", "delete"})
        emulator.resources["v1/events"] = info(kind="Event", namespaced=True,
                                               verbs={"create", "list"})
        url = str(server.url)
        async with aiohttp.ClientSession() as session:
            c = Cluster(emulator, session, url)
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
                "users": [{"name": "kmock", "user": {"token": "test"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            }))
            metrics_port, liveness_port = _free_port(), _free_port()
            log_path = tmp_path / "operator.log"
            env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
            with log_path.open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "faastube.cli",
                    "--log-level", os.environ.get("FAASTUBE_TEST_LOG_LEVEL", "INFO"), "operator",
                    "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
                    "--liveness-port", str(liveness_port),
                    "--status-interval-s", "0.3", "--retry-delay-s", "1",
                    "--image", "ghcr.io/faastube/faastube:test",
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            c.proc = proc  # type: ignore[attr-defined]
            c.log_path = log_path  # type: ignore[attr-defined]
            c.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
            c.liveness_url = f"http://127.0.0.1:{liveness_port}/healthz"  # type: ignore[attr-defined]
            try:
                yield c
            finally:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), timeout=10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                if os.environ.get("FAASTUBE_TEST_SHOW_LOG"):
                    print(log_path.read_text())


def _wf_path(name: str = "") -> str:
    return f"/apis/{WF}/namespaces/{NS}/workflows" + (f"/{name}" if name else "")


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


async def test_operator_places_deploys_replaces_and_cleans_up_a_workflow(cluster: Cluster) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", _gpunode("node-a"))
    await c.create(_wf_path(), _workflow("traffic"))

    async def deploying() -> Any:
        obj = await c.get(_wf_path("traffic"))
        return obj if (obj or {}).get("status", {}).get("phase") == "Deploying" else None

    wf = await c.eventually("the workflow to be placed and deployed", deploying)
    placement = wf["status"]["placement"]
    assert placement["detect"]["node"] == "node-a" and placement["detect"]["gpu"] is not None
    assert placement["decode"] == {"node": "node-a"}  # follows the GPU it feeds
    assert "faastube.io/cleanup" in wf["metadata"]["finalizers"]
    qualified = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    for key in wf["metadata"].get("annotations") or {}:
        assert qualified.match(key) and len(key.rpartition("/")[2]) <= 63, key
    assert wf["status"]["observedGeneration"] == 1 and wf["status"]["functionCount"] == 3
    assert _condition(wf, "Progressing")["status"] == "True"

    deployments = {d["metadata"]["name"]: d for d in
                   await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments")}
    assert set(deployments) == {"traffic-decode", "traffic-detect", "traffic-classify",
                                "traffic-gateway"}
    detect = deployments["traffic-detect"]
    gpu = placement["detect"]["gpu"]
    container = detect["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {f"faastube.io/gpu-{gpu}": 1, "memory": "8Gi"}
    assert {"name": "FAASTUBE_FUNCTION", "value": "detect"} in container["env"]
    assert detect["metadata"]["ownerReferences"][0]["uid"] == wf["metadata"]["uid"]
    assert await c.get(f"/api/v1/namespaces/{NS}/services/traffic-gateway") is not None
    services = {s["metadata"]["name"]: s for s in await c.items(f"/api/v1/namespaces/{NS}/services")}
    assert services["traffic-detect"]["spec"]["clusterIP"] == "None"  # headless: DNS lists replicas
    assert services["traffic-detect"]["metadata"]["ownerReferences"][0]["uid"] == wf["metadata"]["uid"]

    # The Deployment controller finishes: the timer turns the workflow Ready.
    await c.finish_rollouts()

    async def ready() -> Any:
        obj = await c.get(_wf_path("traffic"))
        return obj if _condition(obj, "Ready").get("status") == "True" else None

    wf = await c.eventually("Ready=True", ready)
    assert wf["status"]["phase"] == "Running"

    # kubectl-style tables from the CRDs' printer columns.
    crds = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml")}
    print()
    print(printer.table(crds["workflows.faastube.io.yaml"], await c.items(_wf_path())))
    print(printer.table(crds["gpunodes.faastube.io.yaml"], await c.items(f"/apis/{WF}/gpunodes")))


    # A spec change (the API server would bump the generation) re-places and rolls.
    old_hash = detect["spec"]["template"]["metadata"]["annotations"]["faastube.io/spec-hash"]
    new = _workflow("traffic")
    new["spec"]["functions"][1]["replicas"] = 2
    new["spec"]["functions"].pop(2)
    new["spec"]["edges"].pop(1)
    await c.patch(_wf_path("traffic"), {"spec": new["spec"]})

    async def rolled() -> Any:
        dep = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-detect")
        gone = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-classify")
        gone = gone or await c.get(f"/api/v1/namespaces/{NS}/services/traffic-classify")
        obj = await c.get(_wf_path("traffic"))
        return (dep and dep["spec"]["replicas"] == 2 and gone is None
                and obj["status"].get("observedGeneration") == 2 and (dep, obj))

    detect, wf = await c.eventually("the update to roll out", rolled)
    assert detect["spec"]["template"]["metadata"]["annotations"]["faastube.io/spec-hash"] != old_hash
    assert set(wf["status"]["placement"]) == {"decode", "detect"}
    assert wf["status"]["phase"] == "Deploying"

    # The GPU under `detect` turns unhealthy: the workflow is re-placed elsewhere.
    lost = wf["status"]["placement"]["detect"]["gpu"]
    node = _gpunode("node-a", unhealthy=(lost,))
    await c.patch(f"/apis/{WF}/gpunodes/node-a", {"status": node["status"]})

    async def moved() -> Any:
        obj = await c.get(_wf_path("traffic"))
        where = obj["status"]["placement"]["detect"]
        return where.get("gpu") not in (None, lost) and obj

    wf = await c.eventually("re-placement off the unhealthy GPU", moved)
    detect = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-detect")
    limits = detect["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Only the new GPU: the old one's limit went with the replaced container list.
    assert limits == {f"faastube.io/gpu-{wf['status']['placement']['detect']['gpu']}": 1, "memory": "8Gi"}

    async with c.session.get(c.metrics_url) as resp:  # type: ignore[attr-defined]
        text = await resp.text()
    assert 'faastube_operator_reconciliations_total{result="success"}' in text
    assert "faastube_operator_placement_cost_seconds_count" in text
    async with c.session.get(c.liveness_url) as resp:  # type: ignore[attr-defined]
        assert resp.status == 200

    # Deletion: the finalizer holds the object until the children are gone.
    status, _ = await c.request("DELETE", _wf_path("traffic"))
    assert status == 200

    async def cleaned() -> Any:
        left = await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments")
        services = await c.items(f"/api/v1/namespaces/{NS}/services")
        obj = await c.get(_wf_path("traffic"))
        return not left and not services and obj is None

    await c.eventually("the workflow and its children to be deleted", cleaned)
    assert c.proc.returncode is None  # type: ignore[attr-defined]


async def test_operator_marks_an_invalid_workflow_degraded_and_keeps_running(
        cluster: Cluster) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", _gpunode("node-a"))
    bad = _workflow("loop")
    bad["spec"]["edges"].append({"from": "classify", "to": "decode", "size": "1MB"})
    await c.create(_wf_path(), bad)

    async def degraded() -> Any:
        obj = await c.get(_wf_path("loop"))
        return obj if _condition(obj, "Degraded").get("status") == "True" else None

    wf = await c.eventually("Degraded=True on the invalid workflow", degraded)
    cond = _condition(wf, "Degraded")
    assert cond["reason"] == "InvalidSpec"
    assert "decode -> detect -> classify -> decode" in cond["message"]
    assert wf["status"]["phase"] == "Invalid"
    assert _condition(wf, "Ready")["status"] == "False"
    assert await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments") == []

    async def warned() -> Any:
        # kopf names events by generateName, which kmock does not expand (so a second
        # event conflicts there): read what the operator posted rather than what was stored.
        return [r for r in list(c.emulator)
                if r.method == "POST" and str(r.url.path).endswith("/events")
                and (r.data or {}).get("reason") == "InvalidSpec"
                and (r.data or {}).get("type") == "Warning"]

    await c.eventually("an InvalidSpec event", warned)

    # Not a crash loop: the same operator still serves a valid workflow.
    await c.create(_wf_path(), _workflow("fine"))

    async def placed() -> Any:
        obj = await c.get(_wf_path("fine"))
        return ((obj or {}).get("status") or {}).get("placement")

    await c.eventually("the valid workflow to be placed", placed)
    # Fixing the spec clears Degraded.
    good = _workflow("loop")
    await c.patch(_wf_path("loop"), {"spec": {"edges": good["spec"]["edges"]}})

    async def fixed() -> Any:
        obj = await c.get(_wf_path("loop"))
        return obj if _condition(obj, "Degraded").get("status") == "False" else None

    wf = await c.eventually("Degraded=False after the fix", fixed)
    assert wf["status"]["phase"] == "Deploying"
    assert c.proc.returncode is None  # type: ignore[attr-defined]
