"""Handlers for the handler-error tests. ``embed`` misbehaves by the request's first value:

1 fails an assertion (deterministic: not retried), 2 returns a shape its out-edge does not
declare, 3 raises RuntimeError (retried). Every attempt of ``embed`` and ``classify`` leaves a
file in $ERRTEST_STATE_DIR, so the tests count attempts across processes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from faastube.sdk import function


def _attempt(name: str) -> None:
    (Path(os.environ["ERRTEST_STATE_DIR"]) / f"{name}-{uuid.uuid4().hex}").touch()


def make_input() -> np.ndarray:
    return np.zeros(4, dtype=np.float32)


@function
def pre(x: np.ndarray) -> np.ndarray:
    return x


@function
def embed(x: np.ndarray) -> np.ndarray:
    tag = int(x.flat[0])
    if tag < 0:  # the warm-up call (no input shape declared, so none is made) or a probe
        return np.zeros((2, 8), dtype=np.float32)
    _attempt("embed")
    assert tag != 1, "embeddings must not be computed for tag 1"  # EMBED-ASSERT-LINE
    if tag == 2:
        return np.zeros((3, 8), dtype=np.float32)
    if tag == 3:
        raise RuntimeError("a transient failure")
    return np.ones((2, 8), dtype=np.float32) * tag


@function
def classify(x: np.ndarray) -> np.ndarray:
    if x.any():  # not the warm-up call, which is made on zeros
        _attempt("classify")
    return x.sum(axis=1)
