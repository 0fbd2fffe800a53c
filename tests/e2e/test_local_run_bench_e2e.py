"""``faastube bench e2e`` on this machine, cut to one workflow and tiny budgets.

On a CPU-only machine both passing modes go through host memory, so this checks the
mechanics (two runtimes, rate search, JSON, plot, table), not the ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (REPO / "examples" / "driving" / "workflow.yaml").exists(),
                    reason="examples/driving not present")
def test_bench_e2e_writes_json_with_ratios_and_prints_a_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "bench", "e2e", "--quick",
         "--workflows", "driving", "--arrivals", "periodic", "--requests", "5", "--budget-s", "4",
         "--backend", "host", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "e2e.json").read_text())
    wf = data["workflows"]["driving"]
    assert set(wf["modes"]) == {"host-centric", "tube"}
    fixed = wf["modes"]["tube"]["arrivals"]["periodic"]["fixed_rate"]
    assert fixed["ok"] == 5 and fixed["p99_s"] > 0
    assert set(wf["ratios"]["periodic"]) == {"p99_tube_over_host", "max_rate_tube_over_host"}
    assert "ratio = tube / host-centric" in proc.stdout.splitlines()[-1]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "e2e.png").stat().st_size > 0
