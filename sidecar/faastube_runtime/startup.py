"""Connecting to the node's sidecar at start-up, waiting for it if it is not up yet.

In a cluster a function pod may start before the node's sidecar (a DaemonSet)
has created its socket; waiting a little beats a crash loop's growing back-off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from faastube import errors as ft_errors

logger = logging.getLogger(__name__)


def connect_sidecar(socket_path: str, *, namespace: str | None, workflow: str, function: str,
                    startup_timeout_s: float) -> Any:
    """A ``faastube`` client; ``Unavailable`` once ``startup_timeout_s`` passed (0: try once).

    The namespace is part of the identity the sidecar checks data access against.
    """
    from faastube import client as ft_client

    deadline = time.monotonic() + startup_timeout_s
    delay_s = 0.05
    while True:
        try:
            return ft_client.connect(socket_path, namespace=namespace, workflow=workflow,
                                     function=function)
        except ft_errors.Unavailable as e:
            if time.monotonic() + delay_s > deadline:
                raise
            logger.info("waiting for the sidecar at %s: %s", socket_path, e)
        time.sleep(delay_s)
        delay_s = min(1.0, delay_s * 2)
