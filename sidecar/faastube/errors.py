"""Errors of the faastube client, split by what the caller should do.

Every error a sidecar reports travels as a wire code (see ``protocol.ErrorCode``)
and is raised on the client as the matching class below, so callers can catch
by intent: retry later (``RetryableError``), fix the request (``InvalidRequest``),
or give up on that object (``RefNotFound``).
"""

from __future__ import annotations


class FaastubeError(Exception):
    """Base of every error raised by faastube."""


class RetryableError(FaastubeError):
    """The request may succeed later without changes (resources, restarts)."""


class OutOfPoolMemory(RetryableError):
    """The pool cannot hold the requested bytes now; free objects or retry later."""


class Unavailable(RetryableError):
    """The sidecar cannot be reached or went away mid-request."""


class InvalidRequest(FaastubeError):
    """The request itself is wrong: fix it before retrying."""


class ProtocolError(InvalidRequest):
    """A frame or message violates the wire protocol."""


class RefNotFound(FaastubeError):
    """The ref names no live object: unknown, freed, consumed or expired."""

    def __init__(self, ref: str, detail: str = "") -> None:
        self.ref = ref
        self.detail = detail
        super().__init__(f"object {ref!r} not found" + (f": {detail}" if detail else ""))


class PermissionDenied(FaastubeError):
    """The caller's identity may not touch this object."""


class ObjectNotReady(RetryableError):
    """The object exists but has not been sealed yet."""


class InternalError(FaastubeError):
    """The sidecar failed in a way the caller cannot fix; see its logs."""
