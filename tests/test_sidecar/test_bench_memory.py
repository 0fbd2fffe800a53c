"""`faastube bench memory --smoke`: the whole benchmark on the host backend, two simulated GPUs.

Checks that every part runs through real sidecars and clients and reports what the issue
asks for; no speed is asserted (CPU machines and shared cores say nothing about GPUs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from faastube_bench import memory


def test_the_smoke_run_reports_memory_and_pressure_per_policy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "bench", "memory", "--smoke",
         "--out", str(tmp_path), "--workflows", "image,driving", "--policies", "static,elastic+eviction",
         "--pressure-modes", "host-centric,lru,elastic+eviction"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "memory.json").read_text())
    assert set(data["memory"]["bursty"]) == {"static", "elastic+eviction"}
    for run in data["memory"]["bursty"].values():
        assert run["requests"] > 0 and run["ok"] + run["failed"] + run["unfinished"] == run["requests"]
        assert run["samples"] and run["reserved_avg_bytes"] > 0 and run["live_avg_bytes"] > 0
        assert run["sidecar"]["policy"] == run["mode"]
    (level,) = data["pressure"]
    pressure = data["pressure"][level]
    assert set(pressure) == {"host-centric", "lru", "elastic+eviction"}
    assert pressure["host-centric"]["reserved_avg_bytes"] == 0, "host-centric passing keeps nothing on GPUs"
    assert pressure["elastic+eviction"]["sidecar"]["caps"]["gpu:0"] < memory.Settings.__dataclass_fields__[
        "simulated_gpu_bytes"].default, "under pressure the cap is below the simulated GPU"
    goals = [t["goal"] for t in data["targets"]]
    assert any("reserves <=" in g for g in goals) and any("no request fails" in g for g in goals)
    assert (tmp_path / "memory.png").exists()
    out = done.stdout
    assert "[MET ]" in out or "[MISS]" in out
    assert out.rstrip().splitlines()[-1].startswith("latency from arrival"), "the table comes last"


def test_time_averages_weight_each_sample_by_how_long_it_held() -> None:
    samples = [(0.0, 10, 1), (1.0, 30, 1), (4.0, 0, 1)]
    assert memory._time_average(samples, 1) == (10 * 1 + 30 * 3) / 4
    assert memory._quantile([1.0, 2.0, 3.0], 0.99) == 3.0 and memory._quantile([], 0.5) is None


def test_the_stages_follow_the_workflow_and_scale() -> None:
    from faastube_spec.workflow import load_workflow

    wf = load_workflow(memory.REPO_EXAMPLES / "traffic" / "workflow.yaml")
    stages = {s.name: s for s in memory.stages_of(wf, scale=0.5, compute_scale=1.0, cpu_replicas=3)}
    assert stages["decode"].replicas == 3 and not stages["decode"].gpu and stages["decode"].inputs == ()
    assert stages["detection"].replicas == 1 and stages["detection"].out_bytes == 182009856 // 2
    assert stages["recognition"].out_bytes == 0 and stages["recognition"].readers == ()
