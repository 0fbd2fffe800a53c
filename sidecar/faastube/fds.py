"""File descriptors received or handed over: closed once, whatever happens."""

from __future__ import annotations

import os
from collections.abc import Iterable


def close_all(fds: Iterable[int]) -> None:
    """Close every descriptor, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
