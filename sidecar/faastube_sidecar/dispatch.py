"""Dispatch: a validated request to the data-plane method that serves it.

Most requests are answered without awaiting anything (metadata, zero-copy gets):
`dispatch` returns their reply directly, so the server writes it in the same
callback that read the request. Only a hello (attestation), a get that needs a
copy and a get of a ref whose publish is still on its way return an awaitable.
Notifies (requests that want no reply) are limited to ops that return nothing a
client needs: publish, release, free, unmap and bye.

Exceptions become error replies here and only here: services raise faastube
errors, this layer turns them into wire codes and counts them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from faastube import errors, protocol
from faastube.protocol import Op

from faastube_sidecar.dataplane import DataPlane, Reply, Session
from faastube_sidecar.identity import Attestor, Identity, PeerProcess
from faastube_sidecar.metrics import SidecarMetrics

logger = logging.getLogger(__name__)

Result = tuple[protocol.Kind, dict[str, Any], list[int]]

# Ops a client may send without waiting for their reply.
NOTIFY_OPS = frozenset({Op.PUBLISH, Op.RELEASE, Op.FREE, Op.UNMAP, Op.BYE})


class Dispatcher:
    def __init__(self, dataplane: DataPlane, attestor: Attestor, metrics: SidecarMetrics) -> None:
        self.dataplane = dataplane
        self.attestor = attestor
        self.metrics = metrics
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        dp = dataplane
        self._sync: dict[Op, Callable[[Session, Mapping[str, Any]], Reply]] = {
            Op.ARENA: dp.arena, Op.PUBLISH: dp.publish, Op.RELEASE: dp.release, Op.FREE: dp.free,
            Op.STAT: dp.stat, Op.UNMAP: dp.unmap, Op.PING: dp.ping, Op.STATS: dp.stats_body, Op.BYE: dp.bye,
        }

    def dispatch(self, session: Session, peer: PeerProcess | None,
                 body: Mapping[str, Any], *, notify: bool = False) -> Result | Awaitable[Result]:
        """Serve one decoded request body; never raises for a bad request."""
        # Notifies (publishes, ended reads) are the hot path and nobody waits for them: counted, not timed.
        start = 0.0 if notify else time.perf_counter()
        op_label = "invalid"
        try:
            op, fields = protocol.parse_request(body)
            op_label = op.value
            if notify and op not in NOTIFY_OPS:
                raise errors.ProtocolError(f"{op.value} needs a reply: send it as a request, not a notify")
            if op is Op.HELLO:
                return self._finish_async(op_label, start, self._hello(session, peer, fields))
            if op is Op.GET:
                if "ended" in fields or "ended_uncounted" in fields:
                    self.dataplane.end_reads(session, fields.get("ended", ()), fields.get("ended_uncounted", ()))
                reply = self.dataplane.get_local(session, fields)
                if reply is None:
                    return self._finish_async(op_label, start, self.dataplane.get(session, fields))
            else:
                reply = self._sync[op](session, fields)
                if notify:
                    # A notify's reply is never sent: notices it picked up wait for the next reply.
                    self.dataplane.keep_notices(session, reply[0])
        except Exception as e:  # noqa: BLE001 - turned into an error reply
            return self._fail(op_label, start, e)
        return self._ok(op_label, start, reply)

    async def _finish_async(self, op_label: str, start: float, pending: Awaitable[Reply]) -> Result:
        try:
            reply = await pending
        except Exception as e:  # noqa: BLE001 - turned into an error reply
            return self._fail(op_label, start, e)
        return self._ok(op_label, start, reply)

    def _ok(self, op_label: str, start: float, reply: Reply) -> Result:
        self._count(op_label, "ok", start)
        return protocol.Kind.REPLY, reply[0], reply[1]

    def _fail(self, op_label: str, start: float, exc: Exception) -> Result:
        if isinstance(exc, errors.FaastubeError):
            logger.debug("%s refused: %s", op_label, exc)
            self._count(op_label, protocol.code_for(exc).name.lower(), start)
            return protocol.Kind.ERROR, error_body(exc), []
        # One bad request must not take the daemon down: log it, answer, go on.
        logger.error("%s failed", op_label, exc_info=exc)
        self._count(op_label, "internal", start)
        return protocol.Kind.ERROR, error_body(errors.InternalError(
            f"{op_label}: internal error ({type(exc).__name__}); see the sidecar's log")), []

    def _count(self, op_label: str, result: str, start: float) -> None:
        # Label lookups take a lock and hash a tuple: cache the children (bounded: ops x results).
        key = (op_label, result)
        children = self._children.get(key)
        if children is None:
            children = (self.metrics.request_seconds.labels(op_label), self.metrics.requests.labels(op_label, result))
            self._children[key] = children
        if start:
            children[0].observe(time.perf_counter() - start)
        children[1].inc()

    async def _hello(self, session: Session, peer: PeerProcess | None, body: Mapping[str, Any]) -> Reply:
        if body["version"] != protocol.VERSION:
            raise errors.ProtocolError(f"hello: the client speaks protocol {body['version']}, this sidecar "
                                       f"{protocol.VERSION}: use the faastube client of the sidecar's release")
        claimed = None
        if body.get("namespace") or body.get("workflow") or body.get("function"):
            # Empty fields are filled by the attestor (local default, or the attested pod).
            claimed = Identity(namespace=body.get("namespace") or "", workflow=body.get("workflow") or "",
                               function=body.get("function") or "")
        if peer is None:
            raise errors.PermissionDenied("hello: the peer's credentials can't be read from the socket")
        identity = await self.attestor.attest(peer, claimed)
        return self.dataplane.hello(session, identity, body)


def error_body(exc: errors.FaastubeError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": int(protocol.code_for(exc)), "message": str(exc)}
    if isinstance(exc, errors.RefNotFound):
        body["ref"] = exc.ref
        body["detail"] = exc.detail
    return body
