"""The cluster entrypoints for real: ``faastube worker`` and ``faastube gateway`` processes
configured the way the operator configures their pods, against a real sidecar.

Each worker gets exactly the environment ``manifests.function_deployment`` writes into its
container (the Downward API's node name filled in as the kubelet would) and the container's
command, with only the listen address moved to a free loopback port (pods share a port on
different IPs; processes on one machine cannot). Besides that, the process environment
holds only what the function image would provide: ``PATH``, the handler module on
``PYTHONPATH`` and the example's own knobs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
from faastube import client as ft_client
from faastube_operator import manifests
from faastube_operator.settings import OperatorSettings
from faastube_placement import Where
from faastube_runtime import cli as run_cli
from faastube_runtime import gateway_cli
from faastube_runtime.gateway import BREAKDOWN_HEADER
from faastube_spec.workflow import load_workflow
from ports import free_port

pytestmark = [pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "traffic"
NODE = "node-test"
NAMESPACE = "e2e"
IMAGE_ENV = {"FAASTUBE_EXAMPLE_BACKEND": "numpy", "FAASTUBE_EXAMPLE_SCALE": "0.05"}
READY_TIMEOUT_S = 120.0  # workers warm up on the edges' full shapes first: tens of seconds on a loaded CPU


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's env as the kubelet gives it (fieldRef spec.nodeName -> the node)."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, item
            env[item["name"]] = NODE
    return env


def image_env() -> dict[str, str]:
    """What the image provides: the interpreter, the handler module, the example's knobs."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(EXAMPLE),
            **IMAGE_ENV}


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert command[0] == "faastube", command  # the image's entrypoint; run it from this venv
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "faastube.cli", *command[1:]], env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self, name: str) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextmanager
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


async def wait_healthy(http: aiohttp.ClientSession, url: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        proc = procs.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{procs.log(name)}")
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not healthy at {url}:\n{procs.log(name)}")
        await asyncio.sleep(0.05)


def pool_usage(socket_path: Path) -> tuple[int, int]:
    with ft_client.connect(str(socket_path), workflow="probe", function="probe") as c:
        stats = c.stats()
    return int(stats["objects"]), sum(int(p["used_bytes"]) for p in stats["pools"])


async def back_to(baseline: tuple[int, int], socket_path: Path) -> tuple[int, int]:
    deadline = time.monotonic() + 5.0
    while (now := pool_usage(socket_path)) != baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return now


def children(settings: OperatorSettings) -> dict[str, dict[str, Any]]:
    """What the operator would create for the example, all on one node."""
    workflow = load_workflow(EXAMPLE / "workflow.yaml")
    spec = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())["spec"]
    placed = {fn.name: Where(NODE) for fn in workflow.functions}
    objs = manifests.workflow_children(workflow, namespace=NAMESPACE, spec=spec, placement=placed,
                                       settings=settings)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def container_of(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return dict(container)


def example_request(monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    for key, value in IMAGE_ENV.items():
        monkeypatch.setenv(key, value)
    return run_cli.request_input(load_workflow(EXAMPLE / "workflow.yaml"), None)


def expected_output(monkeypatch: pytest.MonkeyPatch, request: np.ndarray) -> np.ndarray:
    """The traffic chain computed in this process with the same handlers."""
    for key, value in IMAGE_ENV.items():
        monkeypatch.setenv(key, value)
    workflow = load_workflow(EXAMPLE / "workflow.yaml")
    module = run_cli._import_beside(workflow, "functions")
    value: Any = request
    for name in workflow.topological_order():
        value = getattr(module, workflow.function(name).handler_function)(value)
    return np.asarray(value)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def start_workers(procs: Processes, http: aiohttp.ClientSession, objs: dict[str, dict[str, Any]],
                        *, hosts: dict[str, list[str]], port_of: Any) -> dict[str, list[str]]:
    """One ``faastube worker`` per (function, host); returns function -> endpoint URLs."""
    endpoints: dict[str, list[str]] = {}
    starting = []
    for key, obj in objs.items():
        if not key.startswith("Deployment/") or key.endswith("-gateway"):
            continue
        container = container_of(obj)
        function = obj["spec"]["template"]["metadata"]["labels"]["faastube.io/function"]
        command = container["command"]
        assert command[:3] == ["faastube", "worker", "--listen"] and len(command) == 4, command
        probe = container["readinessProbe"]["httpGet"]["path"]
        for i, host in enumerate(hosts.get(function, ["127.0.0.1"])):
            port = port_of(function, host)
            name = f"fn-{function}-{i}"
            procs.start(name, [*command[:3], f"tcp://{host}:{port}"], {**image_env(), **pod_env(container)})
            endpoints.setdefault(function, []).append(f"http://{host}:{port}")
            starting.append(wait_healthy(http, f"http://{host}:{port}{probe}", procs, name))
    await asyncio.gather(*starting)
    return endpoints


async def invoke(http: aiohttp.ClientSession, url: str, request: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    body = io.BytesIO()
    np.save(body, request)
    async with http.post(f"{url}/invoke", data=body.getvalue()) as response:
        payload = await response.read()
        assert response.status == 200, payload[:2000]
        breakdown = json.loads(response.headers[BREAKDOWN_HEADER])
    return np.load(io.BytesIO(payload), allow_pickle=False), breakdown


async def test_workers_and_gateway_configured_as_the_operator_does_serve_a_request(
        sidecar: Any, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    socket_path = Path(sidecar.socket_path)
    settings = OperatorSettings(socket_dir=str(socket_path.parent), socket_name=socket_path.name)
    objs = children(settings)
    ports: dict[str, int] = {}
    with processes(tmp_path) as procs:
        endpoints = await start_workers(procs, http, objs, hosts={},
                                        port_of=lambda f, h: ports.setdefault(f, free_port(h)))
        assert len(endpoints) == 5  # decode, preprocess, detection, postprocess, recognition

        gateway = container_of(objs["Deployment/traffic-gateway"])
        assert gateway["command"][:2] == ["faastube", "gateway"]
        gateway_port = free_port()
        flags = [f"--function-endpoint={f}={url}" for f, urls in endpoints.items() for url in urls]
        procs.start("gateway", ["faastube", "gateway", "--host", "127.0.0.1", "--port", str(gateway_port),
                                *flags], {**image_env(), **pod_env(gateway)})
        url = f"http://127.0.0.1:{gateway_port}"
        await wait_healthy(http, f"{url}/healthz", procs, "gateway")

        baseline = pool_usage(socket_path)
        request = example_request(monkeypatch)
        expected = expected_output(monkeypatch, request)
        for _ in range(2):  # the second request reuses kept-alive connections
            output, breakdown = await invoke(http, url, request)
            np.testing.assert_allclose(output, expected, rtol=1e-5)
            assert breakdown["total_s"] > 0 and breakdown["compute_s"] > 0
            assert await back_to(baseline, socket_path) == baseline

        assert procs.stop("gateway") == 0  # SIGTERM: a clean shutdown
        for name in [n for n in procs.procs if n.startswith("fn-")]:
            assert procs.stop(name) == 0, procs.log(name)
    assert sidecar.alive()


class FixedResolver:
    """DNS as the cluster would answer: a name -> the IPs of the ready pods behind it."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, host: str) -> list[str]:
        self.asked.append(host)
        return list(self.answers.get(host, []))


async def test_the_gateway_follows_replicas_that_dns_lists_and_drops_ones_it_stops_listing(
        sidecar: Any, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The --function-service path with the gateway's own flags from the manifest.

    Two replicas of ``detection`` listen on the same port at 127.0.0.1 and 127.0.0.2, as
    two pods would at their IPs; the resolver answers what cluster DNS would.
    """
    socket_path = Path(sidecar.socket_path)
    port = free_port()
    settings = OperatorSettings(socket_dir=str(socket_path.parent), socket_name=socket_path.name,
                                worker_port=port)
    objs = children(settings)
    detection_hosts = ["127.0.0.1", "127.0.0.2"]
    with processes(tmp_path) as procs:
        endpoints = await start_workers(procs, http, objs, hosts={"detection": detection_hosts},
                                        port_of=lambda f, h: port if f == "detection" else free_port(h))
        gateway = container_of(objs["Deployment/traffic-gateway"])
        services = [a for a in gateway["command"] if a.startswith("--function-service=")]
        assert len(services) == 5
        # The manifest's DNS flag for detection; the other workers listen on ports of their
        # own here, so the gateway gets their endpoints instead.
        detection_flag = next(a for a in services if a.startswith("--function-service=detection="))
        detection_host = detection_flag.split("=", 2)[2].rsplit(":", 1)[0]
        assert detection_host == f"traffic-detection.{NAMESPACE}.svc"
        resolver = FixedResolver({detection_host: detection_hosts})
        gateway_port = free_port()
        args = [detection_flag, "--host", "127.0.0.1", "--port", str(gateway_port),
                "--resolve-interval", "0.1", "--scale-interval", "0.1",
                *(f"--function-endpoint={f}={u}" for f, urls in endpoints.items() if f != "detection"
                  for u in urls)]
        gw_settings = gateway_cli.build_settings(_parse_gateway(args), pod_env(gateway))
        assert [t.host for t in gw_settings.services] == [detection_host]
        stop = asyncio.Event()
        serving = asyncio.create_task(gateway_cli.serve(gw_settings, resolver=resolver, stop=stop))
        try:
            url = f"http://127.0.0.1:{gateway_port}"
            await _until(lambda: _healthy(http, url), "the in-process gateway")
            request = example_request(monkeypatch)
            baseline = pool_usage(socket_path)
            # detection batches (maxSize 4): a replica takes 4 calls at once, so 8 in flight
            # need both (a replica's slots go back behind the other's, first in first out).
            await asyncio.gather(*(invoke(http, url, request) for _ in range(8)))
            served = [await _calls(http, f"http://{h}:{port}") for h in detection_hosts]
            assert all(n > 0 for n in served) and sum(served) == 8, served  # both replicas worked
            await _until(lambda: _scale_current(http, url, "detection", 2), "/scale to count both replicas")

            # DNS stops listing 127.0.0.2 (its pod is not ready any more): no calls go there.
            resolver.answers[detection_host] = ["127.0.0.1"]
            asked = len(resolver.asked)
            await _until(lambda: _asked_again(resolver, asked), "a new lookup")
            await asyncio.gather(*(invoke(http, url, request) for _ in range(3)))
            after = [await _calls(http, f"http://{h}:{port}") for h in detection_hosts]
            assert after == [served[0] + 3, served[1]], (served, after)
            await _until(lambda: _scale_current(http, url, "detection", 1), "/scale to count one replica")
            assert await back_to(baseline, socket_path) == baseline
        finally:
            stop.set()
            await serving


def _parse_gateway(args: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    return parser.parse_args(args)


async def _healthy(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/healthz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def _scale_current(http: aiohttp.ClientSession, url: str, function: str, count: int) -> bool:
    """Whether the gateway's ``GET /scale`` says ``count`` replicas of ``function`` serve."""
    async with http.get(f"{url}/scale") as response:
        body = await response.json()
    return bool(response.status == 200 and body[function]["current"] == count)


async def _asked_again(resolver: FixedResolver, count: int) -> bool:
    return len(resolver.asked) > count + 1  # one full round after the change


async def _calls(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/healthz") as response:
        return int((await response.json())["calls"])


async def _until(check: Any, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
