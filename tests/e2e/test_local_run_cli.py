"""``faastube run`` end to end: sidecar, workers and gateway as real processes, host backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "driving"

pytestmark = pytest.mark.slow


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.skipif(not (EXAMPLE / "workflow.yaml").exists(), reason="examples/driving not present")
def test_faastube_run_serves_requests_prints_a_table_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "driving-copy"
    shutil.copytree(EXAMPLE, workdir, ignore=shutil.ignore_patterns("__pycache__"))
    scratch = Path(tempfile.mkdtemp(prefix="ftrun", dir="/tmp"))  # short: socket paths are limited
    out = tmp_path / "summary.json"
    env = {**os.environ, "TMPDIR": str(scratch), "FAASTUBE_EXAMPLE_BACKEND": "numpy"}
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(workdir / "workflow.yaml"), "--requests", "5",
         "--concurrency", "2", "--arrival", "periodic", "--rate", "20", "--backend", "host",
         "--json", str(out)],
        capture_output=True, text=True, check=False, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "p50" in proc.stdout and "p99" in proc.stdout and "data passing" in proc.stdout
    assert "5/5 ok" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["ok"] == 5 and summary["requests"] == 5
    stages = summary["stages"]
    assert stages["compute_s"]["p50_s"] > 0 and stages["data_passing_s"]["p50_s"] > 0
    assert list(scratch.iterdir()) == []  # the socket directory is gone
    scratch.rmdir()
    assert processes_mentioning(str(workdir)) == []  # no worker outlived the run


def test_faastube_run_rejects_bad_flags_naming_them(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(EXAMPLE / "workflow.yaml"), "--concurrency", "0",
         "--rate", "-1"], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2
    assert "--concurrency: must be at least 1" in proc.stderr and "--rate: must be positive" in proc.stderr


def test_faastube_run_reports_an_invalid_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "wf.yaml"
    bad.write_text("apiVersion: faastube.io/v1alpha1\nkind: Workflow\nmetadata: {name: x}\n"
                   "spec: {slo: 1s, functions: [{name: a, handler: 'm:a', replicas: 0}], edges: []}\n")
    proc = subprocess.run([sys.executable, "-m", "faastube.cli", "run", str(bad)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2 and "spec.functions[0].replicas" in proc.stderr


SCALING = REPO / "tests" / "test_runtime" / "scaling_fixture"


@pytest.mark.parametrize("autoscale", [True, False], ids=["autoscaled", "no-autoscale"])
def test_faastube_run_reports_how_far_each_function_scaled(tmp_path: Path, autoscale: bool) -> None:
    out = tmp_path / "summary.json"
    env = {**os.environ, "SCALETEST_SLEEP_S": "0.1"}
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(SCALING / "busy.yaml"), "--requests", "30",
         "--concurrency", "6", "--arrival", "periodic", "--rate", "200", "--backend", "host",
         "--input", str(_npy(tmp_path)), "--stable-window", "2", "--panic-window", "0.5",
         "--scale-interval", "0.1", "--json", str(out), *([] if autoscale else ["--no-autoscale"])],
        capture_output=True, text=True, check=False, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "30/30 ok" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("work "))
    summary = json.loads(out.read_text())
    work = summary["replicas"]["work"]
    assert summary["autoscale"] is autoscale and work["initial"] == 1
    if autoscale:
        # Six requests in flight for a replica meant for one: panic asks for maxReplicas at once
        # (how many workers are ready before the 30 requests end depends on the machine's load;
        # the scale-down delay of 30 s keeps them all until the end).
        assert "autoscaler: work wants 3 replica(s)" in proc.stderr
        ups = work["scaleUps"]
        assert f"1..3; {ups} up, 0 down" in row
        assert work["most"] == work["final"] == 1 + ups
        assert proc.stderr.count("scaled work up to") == ups
    else:
        assert "not scaled (--no-autoscale)" in row and work["most"] == work["final"] == 1
        assert work["scaleUps"] == 0


def _npy(tmp_path: Path) -> Path:
    import numpy as np

    path = tmp_path / "in.npy"
    np.save(path, np.zeros(4))
    return path


def test_faastube_run_rejects_bad_autoscaling_flags_naming_them() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(SCALING / "busy.yaml"), "--stable-window", "0",
         "--panic-threshold", "1", "--scale-interval", "-1"],
        capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2
    assert "--stable-window: must be a positive number of seconds" in proc.stderr
    assert "--panic-threshold: must be a number above 1" in proc.stderr
    assert "--scale-interval: must be a positive number of seconds" in proc.stderr
