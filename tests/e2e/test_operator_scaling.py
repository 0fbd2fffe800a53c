"""The operator scaling function Deployments, with real processes against the emulator.

The operator (``faastube operator``) runs against the API server emulator
(``kube_emulator.py``), and asks gateways for ``GET /scale`` at the URL its
``--gateway-url-template`` names: a real ``faastube gateway`` process, started with the
command and environment the operator wrote into the gateway's Deployment (only the port
moved to a free loopback one and the autoscaler's windows shortened), or scripted
stand-ins where the test needs to say what a gateway decides. What happened is read
from the outside: the Deployments' replicas and managed fields, the emulator's request
log, the events, the operator's /metrics and its log.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("kopf")
import numpy as np
from kube_emulator import (
    NS,
    ROOT,
    WF,
    Cluster,
    OperatorProcess,
    free_port,
    wf_path,
)

pytestmark = pytest.mark.timeout(180)
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
FAST = ("--autoscaling-interval-s", "0.3")
# Generous: two cores shared with other work can slow every process here many times over.
DEADLINE_S = 90.0


def scaled_workflow(name: str, *, work: dict[str, Any], slo: str = "1s") -> dict[str, Any]:
    """A CPU-only workflow (placed without GpuNodes): a fixed ``decode``, then ``work``."""
    return {"apiVersion": WF, "kind": "Workflow", "metadata": {"name": name, "namespace": NS},
            "spec": {"slo": slo,
                     "functions": [{"name": "decode", "handler": "functions:decode", "image": "example/fn:1"},
                                   {"name": "work", "handler": "functions:work", "image": "example/fn:1",
                                    **work}],
                     "edges": [{"from": "decode", "to": "work", "size": "1MB"}]}}


class ScriptedGateway:
    """A stand-in gateway: ``GET /scale`` answers what the test sets; counts the asks."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] = {}
        self.asked = 0
        self.port = free_port()
        self._runner: aiohttp.web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def decide(self, **desired: int) -> None:
        self.answer = {function: {"desired": n, "current": 1, "concurrency": float(n),
                                  "panicConcurrency": float(n), "panicking": False, "reason": "stable",
                                  "minReplicas": 0, "maxReplicas": 9} for function, n in desired.items()}

    async def __aenter__(self) -> ScriptedGateway:
        async def scale(_request: aiohttp.web.Request) -> aiohttp.web.Response:
            self.asked += 1
            return aiohttp.web.json_response(self.answer)

        app = aiohttp.web.Application()
        app.router.add_get("/scale", scale)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _deployment(c: Cluster, name: str) -> dict[str, Any] | None:
    return await c.get(f"{DEPLOYMENTS}/{name}")


def _replicas_of(c: Cluster, name: str, want: int) -> Callable[[], Any]:
    async def check() -> Any:
        dep = await _deployment(c, name)
        return dep if dep is not None and dep["spec"].get("replicas") == want else None
    return check


def _replicas_owners(dep: dict[str, Any]) -> set[str]:
    return {e["manager"] for e in dep["metadata"].get("managedFields") or []
            if "f:replicas" in (e.get("fieldsV1") or {}).get("f:spec", {})}


def _applies(c: Cluster, name: str, *, manager: str) -> list[dict[str, Any]]:
    """The server-side applies of Deployment ``name`` by ``manager`` so far, as sent."""
    out = []
    for r in list(c.emulator):
        if (getattr(r.resource, "plural", None) == "deployments" and r.url.path.endswith(f"/{name}")
                and str(r.method).upper().endswith("PATCH") and (r.params or {}).get("fieldManager") == manager
                and "apply-patch" in {k.lower(): v for k, v in (r.headers or {}).items()}.get("content-type", "")):
            out.append(json.loads(r.text))
    return out


async def _events(c: Cluster, *reasons: str) -> list[dict[str, Any]]:
    return [e for e in await c.items(f"/api/v1/namespaces/{NS}/events") if e.get("reason") in reasons]


async def _metric(c: Cluster, operator: OperatorProcess, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with c.session.get(operator.metrics_url) as resp:
        text = await resp.text()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def _until(c: Cluster, what: str, check: Callable[[], Any]) -> Any:
    return await c.eventually(what, check, timeout_s=DEADLINE_S)


async def _value(value: Any) -> Any:
    return value


async def _deployed(c: Cluster, name: str) -> None:
    """Wait for the operator's children, play the Deployment controller, wait for Running."""
    async def children() -> Any:
        return len(await c.items(DEPLOYMENTS)) >= 3 or None

    await _until(c, "the workflow's Deployments", children)

    async def running() -> Any:
        await c.finish_rollouts()
        obj = await c.get(wf_path(name))
        return ((obj or {}).get("status") or {}).get("phase") == "Running" or None

    await _until(c, "the workflow to run", running)


# --- (a) the reconciliation leaves replicas alone ---------------------------------------------


async def test_a_reconciliation_no_longer_resets_the_replicas_another_scaler_set(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    # The operator's own loop is off: the test plays the other scaler (an HPA, KEDA).
    operators.append(await OperatorProcess(c, "operator", "--no-autoscaling").start())
    await c.create(wf_path(), scaled_workflow("sw", work={"minReplicas": 1, "replicas": 2, "maxReplicas": 6}))
    await _deployed(c, "sw")
    work = await _until(c, "work at its starting count", _replicas_of(c, "sw-work", 2))
    # Created with its starting count, which the autoscaler's manager holds from then on.
    assert _replicas_owners(work) == {"faastube-operator", "faastube-autoscaler"}
    assert [a["spec"] for a in _applies(c, "sw-work", manager="faastube-autoscaler")] == [{"replicas": 2}]

    # Another scaler sets 5 (as an HPA does, through an update of its own); someone also
    # scales the fixed function, whose count the Workflow decides.
    await c.patch(f"{DEPLOYMENTS}/sw-work", {"spec": {"replicas": 5}})
    await c.patch(f"{DEPLOYMENTS}/sw-decode", {"spec": {"replicas": 3}})
    applies_before = len(_applies(c, "sw-work", manager="faastube-operator"))
    template = ((await _deployment(c, "sw-work")) or {})["spec"]["template"]
    await c.patch(wf_path("sw"), {"spec": {"slo": "2s"}})  # a new spec: every function rolls

    async def rolled() -> Any:
        dep = await _deployment(c, "sw-work")
        return dep if dep is not None and dep["spec"]["template"] != template else None

    work = await _until(c, "the new template", rolled)
    assert work["spec"]["replicas"] == 5  # the other scaler's count stands
    decode = await _until(c, "the fixed function set back", _replicas_of(c, "sw-decode", 1))
    assert decode["spec"]["replicas"] == 1
    sent = _applies(c, "sw-work", manager="faastube-operator")[applies_before:]
    assert sent and all("replicas" not in body["spec"] for body in sent)  # never sent at all
    assert len(_applies(c, "sw-work", manager="faastube-autoscaler")) == 1  # no hand-over again

    # A bound that changes brings the count within it, at once.
    await c.patch(wf_path("sw"), {"spec": {"functions": [
        {"name": "decode", "handler": "functions:decode", "image": "example/fn:1"},
        {"name": "work", "handler": "functions:work", "image": "example/fn:1", "minReplicas": 1,
         "replicas": 2, "maxReplicas": 4}]}})
    await _until(c, "the count within the new bounds", _replicas_of(c, "sw-work", 4))


# --- (b) scaling from a real gateway's decisions ----------------------------------------------


def _gateway_process(c: Cluster, gateway: dict[str, Any], *, port: int, socket_path: str,
                     log_path: Path) -> subprocess.Popen[bytes]:
    """``faastube gateway`` as its pod runs it (command and env from the Deployment), on a
    loopback port, with the autoscaler's windows shortened so that the test takes seconds."""
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    command = list(container["command"])
    assert command[:2] == ["faastube", "gateway"], command
    at = command.index("--port")
    command[at + 1] = str(port)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update({"FAASTUBE_SOCKET": socket_path, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    fast = ["--host", "127.0.0.1", "--scale-interval", "0.2", "--stable-window", "3", "--panic-window", "1",
            "--scale-down-delay", "0", "--scale-to-zero-grace", "0.5", "--resolve-interval", "0.5",
            "--call-timeout", "3", "--retries", "0", "--request-timeout", "5"]
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "faastube.cli", *command[1:], *fast], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


async def _scale(c: Cluster, url: str) -> dict[str, Any] | None:
    try:
        async with c.session.get(f"{url}/scale") as resp:
            return dict(await resp.json()) if resp.status == 200 else None
    except aiohttp.ClientError:
        return None


async def _invoke(url: str) -> int:
    body = io.BytesIO()
    np.save(body, np.arange(16, dtype=np.float32))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/invoke", data=body.getvalue(),
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            await resp.read()
            return resp.status


async def test_the_operator_scales_from_zero_and_back_on_a_real_gateways_decisions(
        cluster: Cluster, operators: list[OperatorProcess], sidecar: Any, tmp_path: Path) -> None:
    c = cluster
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    operator = await OperatorProcess(c, "operator", *FAST, "--gateway-url-template", url).start()
    operators.append(operator)
    # One function, `work`, starting at zero and allowed back there. No worker process
    # serves it: its pods would come from the Deployment controller, which the emulator
    # does not run, so every call waits and times out, which is all the gateway needs to
    # decide from.
    body = {"apiVersion": WF, "kind": "Workflow", "metadata": {"name": "sz", "namespace": NS},
            "spec": {"slo": "1s", "functions": [{"name": "work", "handler": "functions:work",
                                                 "image": "example/fn:1", "minReplicas": 0,
                                                 "replicas": 0, "maxReplicas": 3}]}}
    await c.create(wf_path(), body)

    async def two() -> Any:
        return len(await c.items(DEPLOYMENTS)) >= 2 or None

    await _until(c, "the workflow's Deployments", two)

    async def running() -> Any:
        await c.finish_rollouts()
        obj = await c.get(wf_path("sz"))
        return ((obj or {}).get("status") or {}).get("phase") == "Running" or None

    await _until(c, "the workflow to run (work at zero counts as available)", running)
    assert ((await _deployment(c, "sz-work")) or {})["spec"]["replicas"] == 0

    gateway = await _deployment(c, "sz-gateway")
    assert gateway is not None
    proc = _gateway_process(c, gateway, port=port, socket_path=str(sidecar.socket_path),
                            log_path=tmp_path / "gateway.log")
    requests: list[asyncio.Task[int]] = []
    try:
        async def settled() -> Any:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            answer = await _scale(c, url)
            return answer if answer and answer["work"]["reason"] != "no-data" else None

        answer = await _until(c, "the gateway's first decision", settled)
        assert answer["work"]["desired"] == 0 and answer["work"]["current"] == 0
        # The operator asks it every round and leaves the Deployment at zero.
        rounds = await _metric(c, operator, "faastube_operator_autoscaling_round_duration_seconds_count")

        async def more_rounds() -> Any:
            now = await _metric(c, operator, "faastube_operator_autoscaling_round_duration_seconds_count")
            return now >= rounds + 5 or None

        await _until(c, "five more scaling rounds", more_rounds)
        # (It was asked in vain before its process started: the emulator's gateway pod was
        # "available" first. From here on, every ask is answered.)
        failed = await _metric(c, operator, "faastube_operator_gateway_scrape_failures_total")
        assert ((await _deployment(c, "sz-work")) or {})["spec"]["replicas"] == 0
        assert _applies(c, "sz-work", manager="faastube-autoscaler") == [{
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "sz-work", "namespace": NS}, "spec": {"replicas": 0}}]  # the hand-over

        # A request arrives: its call waits in the gateway, which wants one replica at once.
        requests.append(asyncio.create_task(_invoke(url)))
        work = await _until(c, "the operator to scale work from zero to one",
                                  _replicas_of(c, "sz-work", 1))
        assert "faastube-autoscaler" in _replicas_owners(work)
        assert (await _scale(c, url) or {})["work"]["desired"] >= 1
        (up,) = await _until(c, "a ScaledUp event", lambda: _events(c, "ScaledUp"))
        assert up["involvedObject"]["name"] == "sz" and up["message"].startswith("work: 0 -> 1 replicas")

        # Three more wait at once: the gateway panics to what waits, clamped to maxReplicas 3.
        requests.extend(asyncio.create_task(_invoke(url)) for _ in range(3))
        await _until(c, "the operator to follow the burst to three", _replicas_of(c, "sz-work", 3))
        assert await _metric(c, operator, "faastube_operator_scale_actions_total",
                             direction="up", result="applied") >= 2

        # Nothing serves them: the calls time out (504), the load is gone, and after the
        # gateway's windows the function goes back to zero.
        statuses = await asyncio.wait_for(asyncio.gather(*requests), timeout=60)
        assert statuses == [504] * 4, statuses
        await _until(c, "the operator to scale work back to zero", _replicas_of(c, "sz-work", 0))
        assert await _metric(c, operator, "faastube_operator_scale_actions_total",
                             direction="down", result="applied") >= 1
        assert await _metric(c, operator, "faastube_operator_gateway_scrape_failures_total") == failed
        workflow = await c.get(wf_path("sz"))
        assert ((workflow or {}).get("status") or {}).get("phase") == "Running"  # Ready throughout
    finally:
        for task in requests:
            task.cancel()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- (c) a standby never scales -----------------------------------------------------------------


async def test_a_standby_replica_never_asks_a_gateway_nor_scales_until_it_takes_over(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    async with ScriptedGateway() as seen_by_first, ScriptedGateway() as seen_by_second:
        seen_by_first.decide(decode=1, work=3)
        seen_by_second.decide(decode=1, work=5)
        peering = ("--peering", "faastube", "--peering-lifetime-s", "5", *FAST)
        first = await OperatorProcess(c, "first", *peering, "--peering-priority", "200",
                                      "--gateway-url-template", seen_by_first.url).start()
        operators.append(first)
        await _until(c, "the first replica to act",
                           lambda: _value("this replica is the active one" in first.log()))
        second = await OperatorProcess(c, "second", *peering, "--peering-priority", "100",
                                       "--gateway-url-template", seen_by_second.url).start()
        operators.append(second)
        await _until(c, "the second replica's scaling loop to stand by",
                           lambda: _value("scaling loop standing by" in second.log()))

        await c.create(wf_path(), scaled_workflow("hb", work={"minReplicas": 1, "maxReplicas": 6}))
        await _deployed(c, "hb")
        await _until(c, "the active replica to scale work to 3", _replicas_of(c, "hb-work", 3))
        asked = seen_by_first.asked
        await _until(c, "ten more rounds of the active replica",
                           lambda: _value(seen_by_first.asked >= asked + 10))
        # The standby ran its loop all along (it logged standing by) and asked nobody.
        assert seen_by_second.asked == 0
        assert ((await _deployment(c, "hb-work")) or {})["spec"]["replicas"] == 3
        for direction in ("up", "down"):
            assert await _metric(c, second, "faastube_operator_scale_actions_total", direction=direction) == 0

        # The active replica leaves (a rolling update): the standby takes over the scaling.
        assert await first.stop() == 0
        await _until(c, "the former standby to scale work to 5", _replicas_of(c, "hb-work", 5))
        assert seen_by_second.asked > 0
        assert await _metric(c, second, "faastube_operator_scale_actions_total",
                             direction="up", result="applied") == 1


# --- (d) an unreachable gateway changes nothing -----------------------------------------------


async def test_a_gateway_that_does_not_answer_changes_nothing_and_is_warned_about_once(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    operator = await OperatorProcess(c, "operator", *FAST, "--gateway-url-template", closed).start()
    operators.append(operator)
    await c.create(wf_path(), scaled_workflow("dead", work={"minReplicas": 1, "replicas": 2, "maxReplicas": 4}))
    await _deployed(c, "dead")
    started = time.monotonic()

    async def failures() -> Any:
        count = await _metric(c, operator, "faastube_operator_gateway_scrape_failures_total",
                              reason="unreachable")
        return count if count >= 8 else None

    await _until(c, "eight failed asks", failures)
    assert ((await _deployment(c, "dead-work")) or {})["spec"]["replicas"] == 2
    assert len(_applies(c, "dead-work", manager="faastube-autoscaler")) == 1  # the hand-over only
    assert await _metric(c, operator, "faastube_operator_scale_actions_total") == 0
    # Told at once, then at most once a minute (the warning interval), however many failed.
    at_most = 1 + int((time.monotonic() - started) // 60)
    assert 1 <= operator.log().count("no scaling decision from the gateway") <= at_most
    warnings = await _events(c, "GatewayScaleUnavailable")
    assert 1 <= len(warnings) <= at_most
    assert warnings[0]["type"] == "Warning" and "replicas kept" in warnings[0]["message"]
    assert await _events(c, "ScaledUp", "ScaledDown") == []
