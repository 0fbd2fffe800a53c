"""Handlers for the tests over several local nodes. ``slow`` sleeps $NODESTEST_SLOW_S when
the request's first value is 7 (time for a test to kill a node while ``far``'s output
waits there for ``join``)."""

from __future__ import annotations

import os
import time

import numpy as np
from faastube.sdk import function


@function
def split(x: np.ndarray) -> np.ndarray:
    return x + 1


@function
def far(x: np.ndarray) -> np.ndarray:
    return x * 2


@function
def slow(x: np.ndarray) -> np.ndarray:
    if int(x.flat[0]) == 8:  # 7 + 1 from split
        time.sleep(float(os.environ.get("NODESTEST_SLOW_S", "2.0")))
    return x * 3


@function
def join(far: np.ndarray, slow: np.ndarray) -> np.ndarray:
    return far + slow
