"""Handlers for the warm-up tests; each call and hook step is appended to $WARM_LOG.

``second``'s warmup hook waits for the file $WARM_GATE (when set), sleeps $WARM_HOOK_SLEEP_S,
and raises when $WARM_FAIL is ``hook``; ``second`` itself raises when $WARM_FAIL is ``call``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from faastube.sdk import WarmupContext, function


def _log(line: str) -> None:
    path = os.environ.get("WARM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _call(name: str, x: np.ndarray) -> None:
    _log(f"call {name} {list(x.shape)} {'data' if x.any() else 'zeros'}")


def load(context: WarmupContext) -> None:
    _log(f"hook {context.function} {context.device} {context.framework}")
    if os.environ.get("WARM_FAIL") == "hook":
        raise RuntimeError("no model here")
    gate = os.environ.get("WARM_GATE")
    while gate and not Path(gate).exists():
        time.sleep(0.02)
    time.sleep(float(os.environ.get("WARM_HOOK_SLEEP_S", "0")))
    _log(f"hook done {context.function}")


@function
def first(x: np.ndarray) -> np.ndarray:
    _call("first", x)
    return x + 1


@function(warmup=load)
def second(x: np.ndarray) -> np.ndarray:
    _call("second", x)
    if os.environ.get("WARM_FAIL") == "call":
        raise ValueError("bad weights")
    return x * 2


@function
def third(x: np.ndarray) -> np.ndarray:
    _call("third", x)
    return x - 1
