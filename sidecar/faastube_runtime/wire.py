"""The gateway <-> worker messages: JSON over HTTP on a Unix socket.

Only refs and timings travel here, never array data. Both directions are
validated: the worker checks each call before touching the sidecar, the gateway
checks each reply before trusting the refs in it. Errors name the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypedDict

from faastube_runtime import errors

MAX_REF_CHARS = 256
MAX_ID_CHARS = 128
CALL_PATH = "/call"
HEALTH_PATH = "/healthz"
FORGET_PATH = "/forget"


class CallBody(TypedDict):
    request_id: str
    attempt: int
    final: bool  # no retry follows: a failed call need not keep its inputs open
    inputs: dict[str, str]  # predecessor name (or "$input") -> ref
    timeout_s: float


class TimingsBody(TypedDict):
    get_s: float
    compute_s: float
    put_s: float
    wait_s: float


class ReplyBody(TypedDict):
    outputs: dict[str, str]  # reader name -> ref
    refs: list[str]
    timings: TimingsBody
    # Calls in the handler call that produced these outputs (its compute_s is shared); a reply
    # without it (an older worker) is read as 1.
    batch_size: int


class ErrorBody(TypedDict):
    error: str
    message: str
    retryable: bool


def _string(value: Any, path: str, *, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise errors.BadInput(f"{path}: must be a non-empty string of at most {limit} characters, "
                              f"got {value!r:.80}")
    return value


def _number(value: Any, path: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise errors.BadInput(f"{path}: must be a finite number, got {value!r:.80}")
    if value < 0 or (positive and value == 0):
        raise errors.BadInput(f"{path}: must be {'positive' if positive else 'non-negative'}, got {value}")
    return float(value)


def _ref_map(value: Any, path: str, *, expected: set[str] | None) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise errors.BadInput(f"{path}: must be an object of name -> ref, got {type(value).__name__}")
    out = {_string(k, f"{path} key", limit=MAX_ID_CHARS): _string(v, f"{path}.{k}", limit=MAX_REF_CHARS)
           for k, v in value.items()}
    if expected is not None and set(out) != expected:
        raise errors.BadInput(f"{path}: expected entries for {sorted(expected)}, got {sorted(out)}")
    return out


def _object(body: Any, allowed: set[str], required: set[str], what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise errors.BadInput(f"{what} must be a JSON object, got {type(body).__name__}")
    unknown = set(body) - allowed
    if unknown:
        raise errors.BadInput(f"{what}: unknown field(s) {sorted(unknown)}")
    missing = required - set(body)
    if missing:
        raise errors.BadInput(f"{what}: missing field(s) {sorted(missing)}")
    return body


def parse_call(body: Any, *, expected_inputs: set[str]) -> CallBody:
    fields = {"request_id", "attempt", "final", "inputs", "timeout_s"}
    raw = _object(body, fields, fields, "call")
    attempt = raw["attempt"]
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= 100:
        raise errors.BadInput(f"attempt: must be an integer from 1 to 100, got {attempt!r:.40}")
    if not isinstance(raw["final"], bool):
        raise errors.BadInput(f"final: must be true or false, got {raw['final']!r:.40}")
    return CallBody(request_id=_string(raw["request_id"], "request_id", limit=MAX_ID_CHARS),
                    attempt=attempt, final=raw["final"],
                    inputs=_ref_map(raw["inputs"], "inputs", expected=expected_inputs),
                    timeout_s=_number(raw["timeout_s"], "timeout_s", positive=True))


def parse_forget(body: Any) -> str:
    raw = _object(body, {"request_id"}, {"request_id"}, "forget")
    return _string(raw["request_id"], "request_id", limit=MAX_ID_CHARS)


MAX_BATCH_SIZE = 1 << 20


def parse_reply(body: Any, *, expected_readers: set[str]) -> ReplyBody:
    raw = _object(body, {"outputs", "refs", "timings", "batch_size"}, {"outputs", "refs", "timings"}, "reply")
    batch_size = raw.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise errors.BadInput(f"batch_size: must be an integer from 1 to {MAX_BATCH_SIZE}, got {batch_size!r:.40}")
    outputs = _ref_map(raw["outputs"], "outputs", expected=expected_readers)
    refs = raw["refs"]
    if not isinstance(refs, list) or not all(isinstance(r, str) and 0 < len(r) <= MAX_REF_CHARS
                                             for r in refs):
        raise errors.BadInput(f"refs: must be a list of refs, got {refs!r:.80}")
    if set(outputs.values()) - set(refs):
        raise errors.BadInput("refs: must list every ref named in outputs")
    t = _object(raw["timings"], {"get_s", "compute_s", "put_s", "wait_s"},
                {"get_s", "compute_s", "put_s", "wait_s"}, "timings")
    return ReplyBody(outputs=outputs, refs=list(refs),
                     timings=TimingsBody(get_s=_number(t["get_s"], "timings.get_s"),
                                         compute_s=_number(t["compute_s"], "timings.compute_s"),
                                         put_s=_number(t["put_s"], "timings.put_s"),
                                         wait_s=_number(t["wait_s"], "timings.wait_s")),
                     batch_size=batch_size)


def parse_error(body: Any) -> ErrorBody:
    if (isinstance(body, Mapping) and isinstance(body.get("error"), str)
            and isinstance(body.get("message"), str) and isinstance(body.get("retryable"), bool)):
        return ErrorBody(error=body["error"], message=body["message"][:2000], retryable=body["retryable"])
    return ErrorBody(error="Unknown", message=f"malformed error reply {body!r:.200}", retryable=True)
