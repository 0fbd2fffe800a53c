"""Every example runs end to end through ``faastube run`` on the host backend (no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["traffic", "driving", "video", "image"])
def test_the_example_serves_requests_locally(name: str) -> None:
    env = {**os.environ, "FAASTUBE_EXAMPLE_BACKEND": "numpy", "FAASTUBE_EXAMPLE_SCALE": "0.05"}
    done = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(EXAMPLES / name / "workflow.yaml"),
         "--requests", "3", "--backend", "host", "--arrival", "bursty", "--rate", "20", "--seed", "1"],
        capture_output=True, text=True, timeout=90, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 ok" in done.stdout + done.stderr
