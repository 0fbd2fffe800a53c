"""A free TCP port for a test's servers (sidecar metrics, peer services, gateways, emulators)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
