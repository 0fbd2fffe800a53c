"""Handlers for the gateway tests. ``left_arm`` misbehaves by the request's first value:

100 fails every time, 200 sleeps past the call timeout, 300 fails on the first attempt only
(remembered in $GWTEST_STATE_DIR, since retries may land in another process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from faastube.sdk import function


@function
def split(x: np.ndarray) -> np.ndarray:
    return x + 1


@function
def left_arm(x: np.ndarray) -> np.ndarray:
    tag = int(x.flat[0])
    if tag == 100:
        raise RuntimeError("always fails")
    if tag == 200:
        time.sleep(float(os.environ.get("GWTEST_SLEEP_S", "1.0")))
    if tag == 300:
        marker = Path(os.environ["GWTEST_STATE_DIR"]) / f"failed-{os.getpid()}-{x.flat[1]}"
        if not marker.exists():
            marker.touch()
            raise RuntimeError("fails once")
    return x * 2


@function(framework="numpy")
def right_arm(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"join": x * 3}


@function
def join(left_arm: np.ndarray, right_arm: np.ndarray) -> np.ndarray:
    return left_arm + right_arm
