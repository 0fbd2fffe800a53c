"""``faastube run``: SLO attainment (and failing on it), "-" for no latency, a busy port."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from faastube_runtime import report
from faastube_runtime.loadgen import RequestResult


def result(index: int, latency_s: float, status: int = 200) -> RequestResult:
    return RequestResult(index=index, status=status, latency_s=latency_s, breakdown=None,
                         error=None if status == 200 else "boom")


def test_attainment_counts_answered_requests_within_the_slo_and_failures_as_missed() -> None:
    slo = report.SloAttainment.of([result(0, 0.1), result(1, 0.3), result(2, 0.6), result(3, 0.1, status=500)],
                                  slo_s=0.5)
    assert (slo.within, slo.requests, slo.percent) == (2, 4, 50.0)
    line = report.format_slo(slo)
    assert line.startswith("SLO 500 ms: 2/4 requests within (50.0%); p99 ")
    assert line.endswith("over the SLO")


def test_a_run_within_the_slo_says_so() -> None:
    line = report.format_slo(report.SloAttainment.of([result(0, 0.01), result(1, 0.02)], slo_s=0.5))
    assert "2/2 requests within (100.0%)" in line and line.endswith("within the SLO")


def test_when_every_request_fails_the_table_prints_dashes_not_nan() -> None:
    results = [result(0, 0.1, status=500), result(1, 0.1, status=0)]
    table = report.format_table(report.summarize(results, duration_s=1.0))
    assert "nan" not in table
    assert table.splitlines()[1].split()[-3:] == ["-", "-", "-"]
    slo_line = report.format_slo(report.SloAttainment.of(results, slo_s=0.5))
    assert "nan" not in slo_line and "0/2 requests within (0.0%); p99 - (no request answered)" in slo_line


WORKFLOW = """\
apiVersion: faastube.io/v1alpha1
kind: Workflow
metadata: {name: slow}
spec:
  slo: 50ms
  functions:
    - {name: nap, handler: "functions:nap"}
  edges: []
"""

FUNCTIONS = """\
import time
import numpy as np

def make_input():
    return np.zeros(4, np.float32)

def nap(x):
    time.sleep(0.15)
    return x
"""


def run_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "functions.py").write_text(textwrap.dedent(FUNCTIONS))
    (tmp_path / "workflow.yaml").write_text(WORKFLOW)
    return subprocess.run([sys.executable, "-m", "faastube.cli", "run", str(tmp_path / "workflow.yaml"),
                           "--requests", "2", "--backend", "host", "--concurrency", "1", *extra],
                          capture_output=True, text=True, timeout=90, env=dict(os.environ), check=False)


def test_a_run_past_its_slo_prints_attainment_and_exits_3_with_fail_on_slo(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--fail-on-slo")
    out = done.stdout + done.stderr
    assert "2/2 ok" in out
    assert "SLO 50 ms: 0/2 requests within (0.0%)" in out and "over the SLO" in out
    assert done.returncode == 3, out
    assert "SLO attainment 0.0% is below --fail-on-slo 100%" in done.stderr


def test_fail_on_slo_0_lets_a_slow_run_exit_0(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--fail-on-slo", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0/2 requests within" in done.stdout


def test_a_port_in_use_is_one_line_and_exit_2_not_a_traceback(tmp_path: Path) -> None:
    import socket
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = run_cli(tmp_path, "--port", str(port))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"faastube run: --port: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in lines[0]
