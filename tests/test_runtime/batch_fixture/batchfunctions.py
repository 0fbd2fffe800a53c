"""Handlers for the gateway batching test: row-wise, so a batch computes what each request would."""

from __future__ import annotations

import numpy as np
from faastube.sdk import function


@function
def scale(x: np.ndarray) -> np.ndarray:
    return x * 10


@function
def shift(x: np.ndarray) -> np.ndarray:
    return x + 1
