"""``faastube bench e2e`` on this machine, cut to one workflow and tiny budgets.

On a CPU-only machine both passing modes go through host memory, so this checks the
mechanics (four runtimes, rate search, common-rate points, JSON, plot, table), not
the ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from faastube_bench.e2e import SCALING_FIELDS, runtime_variant
from faastube_spec.workflow import load_workflow, parse_workflow

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_todays_runtime_is_the_workflow_without_scaling_and_with_one_replica() -> None:
    workflow = parse_workflow({
        "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
        "spec": {"slo": "1s", "functions": [
            {"name": "a", "handler": "m:a", "minReplicas": 0, "maxReplicas": 4, "targetConcurrency": 2},
            {"name": "b", "handler": "m:b", "replicas": 3}],
            "edges": [{"from": "a", "to": "b", "size": 8}]}})
    today = runtime_variant(workflow, "today")
    assert [(f.name, f.replicas, f.autoscaled) for f in today.functions] == [("a", 1, False), ("b", 1, False)]
    assert runtime_variant(workflow, "scaled") is workflow
    assert "minReplicas" in SCALING_FIELDS and "batch" in SCALING_FIELDS


@pytest.mark.skipif(not (REPO / "examples" / "driving" / "workflow.yaml").exists(),
                    reason="examples/driving not present")
def test_bench_e2e_compares_four_configurations_and_prints_a_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "bench", "e2e", "--quick",
         "--workflows", "driving", "--arrivals", "periodic", "--requests", "4", "--budget-s", "16",
         "--backend", "host", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "e2e.json").read_text())
    wf = data["workflows"]["driving"]
    names = {f.name for f in load_workflow(REPO / "examples" / "driving" / "workflow.yaml").functions}
    assert set(wf["runtimes"]) == {"today", "scaled"}
    for runtime in ("today", "scaled"):
        assert set(wf["runtimes"][runtime]) == {"tube", "host-centric"}
        for config in wf["runtimes"][runtime].values():
            assert config["first_request_s"] > 0 and config["warm_p50_s"] > 0
            periodic = config["arrivals"]["periodic"]
            assert periodic["search"], "at least one rate was measured"
            assert all(point["requests"] >= 4 for point in periodic["search"])
            assert set(config["replicas"]) == names
    assert {"max_rate_scaled_over_today_tube", "p99_scaled_over_today_at_today_max_tube",
            "max_rate_tube_over_host_scaled"} <= set(wf["ratios"]["periodic"])
    assert proc.stdout.splitlines()[-1].startswith("today: 1 replica, no batching")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "e2e.png").stat().st_size > 0


def test_a_search_never_sends_more_requests_than_its_remaining_time_holds() -> None:
    import time

    from faastube_bench.e2e import Session, Settings

    settings = Settings(min_requests=5, max_requests=600, point_s=10.0, warmup=1, precision=1.2,
                        budget_s=60.0, concurrency=8)
    session = Session(runtime=None, body=b"", settings=settings, slo_s=1.0)
    assert session._count(10.0) == 100  # no search running: point_s worth
    session.deadline = time.monotonic() + 3.0
    assert session._count(10.0) <= 30  # 3 s left at 10/s
    session.deadline = time.monotonic() - 1.0
    assert session._count(10.0) == 5  # out of time: the least a point measures
