"""The sidecar's Unix-socket server: accept, read frames, dispatch, reply, clean up.

Each connection handles its requests in order (the client waits for each reply,
and reading pauses while an awaited request runs), so per-connection backpressure
is built in; the number of connections is bounded. A frame whose header can't be trusted closes
that one connection; a well-framed but bad request gets an error reply. When a
connection ends, however it ends, everything its client held is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from faastube import errors, protocol
from faastube.fds import close_all

from faastube_sidecar.dataplane import DataPlane, Session
from faastube_sidecar.dispatch import Dispatcher, Result, error_body
from faastube_sidecar.framing import FrameConnection
from faastube_sidecar.identity import PeerCredentials, peer_credentials
from faastube_sidecar.metrics import SidecarMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket_path: Path
    max_clients: int = 1024
    max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES
    sweep_interval_s: float = 0.5
    shutdown_timeout_s: float = 5.0


class SidecarServer:
    def __init__(self, config: ServerConfig, dispatcher: Dispatcher, metrics: SidecarMetrics) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.dataplane: DataPlane = dispatcher.dataplane
        self.metrics = metrics
        self._listener: socket.socket | None = None
        self._connections: set[FrameConnection] = set()
        self._stopping = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def bind(self) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        # Bind and listen under a temporary name, then rename into place: a client that sees the
        # socket file can connect at once (no window between bind and listen).
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(staging))
            # Any local process may connect; who it is gets attested at hello, not by file mode.
            os.chmod(staging, 0o666)
            listener.listen(min(self.config.max_clients, socket.SOMAXCONN))
            listener.setblocking(False)
            os.rename(staging, path)
        except OSError:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            raise
        self._listener = listener
        logger.info("listening on %s (backend %s)", path, self.dataplane.backend.name)

    async def serve(self) -> None:
        """Serve until `stop()`; then close every connection and remove the socket."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(self._new_connection, sock=self._listener,
                                               backlog=min(self.config.max_clients, socket.SOMAXCONN))
        sweeper = asyncio.create_task(self._sweep_forever(), name="faastube-sweeper")
        try:
            await self._stopping.wait()
        finally:
            sweeper.cancel()
            server.close()
            for conn in list(self._connections):
                conn.close()
            # Let connection_lost callbacks run so every session is given back.
            deadline = loop.time() + self.config.shutdown_timeout_s
            while self._connections and loop.time() < deadline:
                await asyncio.sleep(0.01)
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
            logger.info("stopped")

    def stop(self) -> None:
        self._stopping.set()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                expired = self.dataplane.sweep()
                if expired:
                    self.metrics.objects_expired.inc(expired)
            except Exception:
                logger.exception("sweep failed")

    # --- connections --------------------------------------------------------------------------

    def _new_connection(self) -> FrameConnection:
        # asyncio calls this once per accepted socket, before connection_made.
        return _Accepted(self)

    def _attach(self, conn: FrameConnection) -> bool:
        if len(self._connections) >= self.config.max_clients:
            logger.warning("refusing a client: %d connections open", len(self._connections))
            self.metrics.frames_rejected.labels("too_many_clients").inc()
            return False
        session = self.dataplane.open_session()
        try:
            peer: PeerCredentials | None = peer_credentials(conn.sock)
        except OSError:
            peer = None
        conn.state = _ConnectionState(session, peer)
        self._connections.add(conn)
        self.metrics.connections.inc()
        return True

    def _closed(self, conn: FrameConnection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        self.metrics.connections.dec()
        self.dataplane.close_session(conn.state.session)

    def _bad_header(self, conn: FrameConnection, exc: errors.ProtocolError) -> None:
        self.metrics.frames_rejected.labels("bad_header").inc()
        conn.send(protocol.Kind.ERROR, 0, error_body(exc))

    def _frame(self, conn: FrameConnection, header: protocol.Header, raw: bytes) -> Awaitable[None] | None:
        notify = header.kind is protocol.Kind.NOTIFY
        if header.kind is not protocol.Kind.REQUEST and not notify:
            self.metrics.frames_rejected.labels("not_a_request").inc()
            conn.send(protocol.Kind.ERROR, header.request_id, error_body(
                errors.ProtocolError(f"expected a request frame, got {header.kind.name.lower()}")))
            return None
        try:
            body = protocol.decode_body(raw)
        except errors.ProtocolError as e:
            self.metrics.frames_rejected.labels("bad_body").inc()
            conn.send(protocol.Kind.ERROR, header.request_id, error_body(e))
            return None
        state: _ConnectionState = conn.state
        result = self.dispatcher.dispatch(state.session, state.peer, body, notify=notify)
        if isinstance(result, tuple):
            if notify and result[0] is not protocol.Kind.ERROR:
                close_all(result[2])     # a notify is answered only when it fails
            else:
                conn.send(result[0], header.request_id, result[1], result[2])
            return None
        return self._reply_later(conn, header.request_id, result)

    @staticmethod
    async def _reply_later(conn: FrameConnection, request_id: int, pending: Awaitable[Result]) -> None:
        kind, reply, fds = await pending
        conn.send(kind, request_id, reply, fds)


@dataclass(eq=False)
class _ConnectionState:
    session: Session
    peer: PeerCredentials | None


class _Accepted(FrameConnection):
    """A FrameConnection bound to the server that accepted it."""

    def __init__(self, server: SidecarServer) -> None:
        self._server = server
        super().__init__(None, server._frame, on_bad_header=server._bad_header, on_closed=server._closed,  # type: ignore[arg-type]
                         max_body_bytes=server.config.max_body_bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio only lends a restricted view of its socket; sendmsg (fd passing) and
        # SO_PEERCRED go through our own duplicate of the descriptor.
        self.sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        super().connection_made(transport)
        if not self._server._attach(self):
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.sock.close()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead sidecar; refuse to steal a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.InvalidRequest(f"--socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise errors.InvalidRequest(f"--socket {path}: another sidecar is already listening there")
