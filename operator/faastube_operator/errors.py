"""Errors of the operator, split by what the caller (a kopf handler) should do.

Handlers translate them at the edge: ``RetryableError`` subclasses become
``kopf.TemporaryError`` (try again later), ``InvalidRequest`` subclasses become
``kopf.PermanentError`` after the problem is written into the object's status.
"""

from __future__ import annotations

from faastube.errors import FaastubeError, InvalidRequest, RetryableError


class OperatorError(FaastubeError):
    """Base of every error raised by faastube_operator."""


class KubeApiError(OperatorError):
    """The Kubernetes API refused a request; ``status`` is its HTTP code."""

    def __init__(self, message: str, *, status: int, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


class KubeUnavailable(KubeApiError, RetryableError):
    """The API server could not be reached or answered 5xx/429: retry later."""


class KubeConflict(KubeApiError, RetryableError):
    """The object changed or already exists (HTTP 409): re-read and retry."""


class ClusterStateInvalid(OperatorError, InvalidRequest):
    """A GpuNode object in the cluster cannot be read as a topology."""
