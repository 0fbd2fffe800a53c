"""Errors of the workflow runtime, split by what the caller (an HTTP client) should do.

Each maps to one HTTP status at the gateway's edge (``http_status``): fix the
request (400, 413, 415), send it again faster (408), retry later (503, 504), or
give up on this request (502).
"""

from __future__ import annotations

from faastube import errors


class RuntimeFailure(errors.FaastubeError):
    """Base of every error the workflow runtime raises."""

    http_status = 500


class BadInput(RuntimeFailure, errors.InvalidRequest):
    """The request body or its parameters are wrong (HTTP 400)."""

    http_status = 400


class BodyTooLarge(BadInput):
    """The body is, or says it is, larger than the gateway accepts (HTTP 413)."""

    http_status = 413


class UnsupportedBody(BadInput):
    """The body's ``Content-Type`` or ``Content-Encoding`` is not one the gateway reads (HTTP 415)."""

    http_status = 415


class BodyTimedOut(RuntimeFailure, errors.RetryableError):
    """The body stopped arriving, or took too long (HTTP 408); the connection is closed."""

    http_status = 408


class Overloaded(RuntimeFailure, errors.RetryableError):
    """Too many requests in flight; retry later (HTTP 503)."""

    http_status = 503


class NotReady(RuntimeFailure, errors.RetryableError):
    """A worker that is not warm yet (HTTP 503); the gateway tries again or another replica."""

    http_status = 503


class RequestTimedOut(RuntimeFailure, errors.RetryableError):
    """The request or one of its function calls ran past its timeout (HTTP 504)."""

    http_status = 504


class FunctionFailed(RuntimeFailure):
    """A function call failed on every allowed attempt (HTTP 502)."""

    http_status = 502

    def __init__(self, function: str, attempts: int, cause: str) -> None:
        self.function = function
        self.attempts = attempts
        self.cause = cause
        super().__init__(f"function {function!r} failed after {attempts} attempt(s): {cause}")


class CallFailed(RuntimeFailure):
    """One call of a function failed; ``retryable`` says whether another attempt may succeed."""

    http_status = 502

    def __init__(self, message: str, *, retryable: bool, input_lost: bool = False) -> None:
        self.retryable = retryable
        self.input_lost = input_lost    # an input's node is gone: only starting over can help
        super().__init__(message)


class InputLost(FunctionFailed, errors.RetryableError):
    """A call's input died with the node that held it: the request starts over (HTTP 503
    when it can't, so the client may retry it)."""

    http_status = 503


class StartupFailed(RuntimeFailure):
    """A local-mode component (sidecar, worker, gateway) did not start; see the message."""
