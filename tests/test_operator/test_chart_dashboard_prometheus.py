"""The Grafana dashboard's sidecar panels against a real Prometheus scraping a real sidecar.

A sidecar process (host backend) serves a few puts and gets; Prometheus scrapes its
/metrics every second with the ``node`` label the chart's PodMonitor adds; then every
dashboard query over sidecar metrics is run through Prometheus' HTTP API, with Grafana's
variables substituted as Grafana would. The queries must all evaluate, and the panels
that have data after such traffic (pools, per-workflow reservations, requests, transfers)
must return series. (Per-function bytes count the sidecar's own copies, which the host
backend never makes: that panel is only checked to evaluate.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from faastube import client as ftc
from ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus (Debian: prometheus) not installed")

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "faastube" / "dashboards" / "faastube.json"
VARIABLES = {"$__rate_interval": "1m", "$node": "node-a", "$workflow": ".*", "$slo": "0.5"}
GATEWAY_OR_OPERATOR = ("faastube_gateway_", "faastube_operator_")


def _query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def prometheus(tmp_path: Path, make_sidecar):
    metrics_port, web_port = free_port(), free_port()
    sidecar = make_sidecar("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "faastube-sidecar", "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"node": "node-a"}}]}],
    }))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{web_port}"
    try:
        yield sidecar, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_for(base: str, expr: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _query(base, expr)["data"]["result"]:
                return
        except OSError:
            pass  # Prometheus is still starting
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr} after {timeout_s}s")


def test_every_sidecar_panel_query_evaluates_and_the_busy_ones_have_data(prometheus) -> None:
    sidecar, base = prometheus
    with ftc.connect(sidecar.socket_path, namespace="team-a", workflow="traffic",
                     function="decode") as client:
        for _ in range(3):
            ref = client.put(np.ones(100_000))
            client.get(ref)
        # rate() needs two scrapes after the traffic.
        _wait_for(base, 'faastube_pool_reserved_bytes{node="node-a", gpu="host"} > 0')
        _wait_for(base, 'count_over_time(faastube_transfer_bytes_total{node="node-a"}[1m]) >= 3')

    dashboard = json.loads(DASHBOARD.read_text())
    results: dict[str, list[Any]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if any(prefix in expr for prefix in GATEWAY_OR_OPERATOR):
                continue  # other processes' metrics
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            answer = _query(base, expr)
            assert answer["status"] == "success", (panel["title"], expr, answer)
            results[f"{panel['title']} / {target['legendFormat']}"] = answer["data"]["result"]

    def series(title: str) -> list[Any]:
        found = [r for key, r in results.items() if key.startswith(title)]
        assert found, title
        return [s for r in found for s in r]

    reserved = series("Reserved from the device")
    assert {s["metric"]["gpu"] for s in reserved} == {"host"} and reserved[0]["metric"]["node"] == "node-a"
    assert series("Given to objects") and series("Reserved / limit")
    ops = {s["metric"]["op"] for s in series("Requests by op and result")}
    assert {"hello", "arena", "publish", "get"} <= ops
    assert series("Request latency p99 by op")
    assert series("Transfer throughput by path")
    # The per-workflow pool series keep the workflow's own namespace (honor_labels, as the
    # chart's PodMonitor sets it) next to the node label.
    held = [s for s in series("Each workflow's reservation") if "workflow" in s["metric"]]
    assert held and held[0]["metric"] == {"node": "node-a", "gpu": "host", "namespace": "team-a",
                                          "workflow": "traffic"}
