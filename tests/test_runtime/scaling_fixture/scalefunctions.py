"""Handlers for the autoscaling tests: each call takes $SCALETEST_SLEEP_S, so calls pile up."""

from __future__ import annotations

import os
import time

import numpy as np
from faastube.sdk import function


def _sleep() -> None:
    time.sleep(float(os.environ.get("SCALETEST_SLEEP_S", "0.2")))


@function
def work(x: np.ndarray) -> np.ndarray:
    _sleep()
    return x + 1


@function
def first(x: np.ndarray) -> np.ndarray:
    return x * 2


@function
def second(x: np.ndarray) -> np.ndarray:
    return x + 3
