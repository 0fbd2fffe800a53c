"""Dispatch: a validated request to the data-plane method that serves it.

Exceptions become error replies here and only here: services raise faastube
errors, this layer turns them into wire codes and counts them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Mapping

from faastube import errors, protocol
from faastube.protocol import Op
from faastube_sidecar.dataplane import DataPlane, Reply, Session
from faastube_sidecar.identity import Attestor, Identity, PeerCredentials
from faastube_sidecar.metrics import SidecarMetrics

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, dataplane: DataPlane, attestor: Attestor, metrics: SidecarMetrics) -> None:
        self.dataplane = dataplane
        self.attestor = attestor
        self.metrics = metrics
        dp = dataplane
        self._sync: dict[Op, Callable[[Session, Mapping[str, Any]], Reply]] = {
            Op.ALLOC: dp.alloc, Op.SEAL: dp.seal, Op.RELEASE: dp.release, Op.FREE: dp.free,
            Op.STAT: dp.stat, Op.UNMAP: dp.unmap, Op.PING: dp.ping, Op.STATS: dp.stats_body,
        }
        self._async: dict[Op, Callable[[Session, Mapping[str, Any]], Awaitable[Reply]]] = {Op.GET: dp.get}

    async def handle(self, session: Session, peer: PeerCredentials | None,
                     body: Mapping[str, Any]) -> tuple[protocol.Kind, dict[str, Any], list[int]]:
        """Serve one decoded request body; never raises for a bad request."""
        start = time.perf_counter()
        op_label = "invalid"
        try:
            op = protocol.validate_request(body)
            op_label = op.value
            if op is Op.HELLO:
                reply, fds = await self._hello(session, peer, body)
            elif op in self._async:
                reply, fds = await self._async[op](session, body)
            else:
                reply, fds = self._sync[op](session, body)
            result = "ok"
            kind = protocol.Kind.REPLY
        except errors.FaastubeError as e:
            code = protocol.code_for(e)
            result = code.name.lower()
            kind, reply, fds = protocol.Kind.ERROR, error_body(e), []
            logger.debug("%s refused: %s", op_label, e)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the daemon down
            logger.exception("%s failed", op_label)
            result = "internal"
            kind, reply, fds = protocol.Kind.ERROR, error_body(errors.InternalError(
                f"{op_label}: internal error ({type(e).__name__}); see the sidecar's log")), []
        self.metrics.request_seconds.labels(op_label).observe(time.perf_counter() - start)
        self.metrics.requests.labels(op_label, result).inc()
        return kind, reply, fds

    async def _hello(self, session: Session, peer: PeerCredentials | None, body: Mapping[str, Any]) -> Reply:
        if body["version"] != protocol.VERSION:
            raise errors.ProtocolError(f"hello: client speaks protocol {body['version']}, sidecar {protocol.VERSION}")
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
