"""gRPC between sidecars: ``Open`` and ``Close`` of lent reads, each call signed (``auth``).

Bodies are the JSON of ``messages`` (a two-call control plane; the bytes move over NIXL),
so there is no generated code. Errors cross as status codes whose meaning matches
``faastube.errors``: the reader's sidecar raises the same class its client would get
from a local sidecar.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from faastube import errors

from faastube_sidecar.network.auth import PeerAuth, PeerAuthError
from faastube_sidecar.network.messages import CloseRead, Done, Lent, OpenRead, encode
from faastube_sidecar.network.service import Lender

logger = logging.getLogger(__name__)
SERVICE = "faastube.peer.v1.Peer"
OPEN, CLOSE = "Open", "Close"
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (PeerAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.RefNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RetryableError, grpc.StatusCode.UNAVAILABLE),
)


def _message(e: Exception) -> str:
    if isinstance(e, errors.RefNotFound):
        return f"{e.ref}\n{e.detail}"
    return str(e)


class PeerServer:
    """Serves this node's lends to authenticated peers on ``host:port``."""

    def __init__(self, lender: Lender, auth: PeerAuth, *, host: str, port: int) -> None:
        self._lender = lender
        self._auth = auth
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 20)])
        handlers = {OPEN: self._unary(OPEN, self._open), CLOSE: self._unary(CLOSE, self._close)}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise errors.InvalidRequest(f"--peer-port {port} on {host}: cannot listen there (in use?)")

    def _unary(self, method: str, serve: Callable[[bytes, str], Awaitable[bytes]]) -> grpc.RpcMethodHandler:
        async def handle(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            try:
                peer = self._auth.verify(method, body, metadata, now_s=time.time())
                return await serve(body, peer)
            except Exception as e:  # noqa: BLE001 - every error becomes a status the peer understands
                code = next((c for kind, c in _CODES if isinstance(e, kind)), grpc.StatusCode.INTERNAL)
                if code is grpc.StatusCode.INTERNAL:
                    logger.exception("peer call %s failed", method)
                elif code is grpc.StatusCode.UNAUTHENTICATED:
                    logger.warning("peer call %s refused: %s", method, e)
                await context.abort(code, _message(e))
                raise AssertionError("unreachable") from None
        return grpc.unary_unary_rpc_method_handler(handle)

    async def _open(self, body: bytes, peer: str) -> bytes:
        return encode(await self._lender.open(OpenRead.decode(body), peer=peer))

    async def _close(self, body: bytes, peer: str) -> bytes:
        self._lender.close(CloseRead.decode(body), peer=peer)
        return b"{}"

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace_s: float = 1.0) -> None:
        await self._server.stop(grace_s)


class PeerClient:
    """Calls one peer's sidecar (``host:port``), signing each call."""

    def __init__(self, node: str, address: str, auth: PeerAuth, *, timeout_s: float = 10.0) -> None:
        self.node = node
        self.address = address
        self._auth = auth
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._calls = {m: self._channel.unary_unary(f"/{SERVICE}/{m}") for m in (OPEN, CLOSE)}

    async def _call(self, method: str, body: bytes, timeout_s: float | None = None) -> bytes:
        signed = self._auth.sign(method, body, now_s=time.time())
        try:
            return await self._calls[method](body, metadata=signed.metadata(), timeout=timeout_s or self._timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._error(method, e) from None

    def _error(self, method: str, e: grpc.aio.AioRpcError) -> errors.FaastubeError:
        code, detail = e.code(), e.details() or ""
        where = f"node {self.node}'s sidecar ({self.address})"
        if code == grpc.StatusCode.NOT_FOUND:
            ref, _, why = detail.partition("\n")
            return errors.RefNotFound(ref, f"{why} (on {where})")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return errors.PermissionDenied(f"{detail} (said {where})")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return errors.PermissionDenied(f"{where} refused this sidecar: {detail}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return errors.InvalidRequest(f"{where}: {detail}")
        if code == grpc.StatusCode.INTERNAL:
            return errors.InternalError(f"{where} failed on {method}: {detail}")
        return errors.Unavailable(f"{where} did not answer {method} ({code.name}: {detail}); retry")

    async def open(self, request: OpenRead, *, timeout_s: float | None = None) -> Lent:
        return Lent.decode(await self._call(OPEN, encode(request), timeout_s))

    async def close(self, request: CloseRead) -> None:
        Done.decode(await self._call(CLOSE, encode(request)))

    async def aclose(self) -> None:
        await self._channel.close()
