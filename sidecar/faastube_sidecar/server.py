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
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from faastube import errors, protocol
from faastube.fds import close_all

from faastube_sidecar.dataplane import DataPlane, Session
from faastube_sidecar.dispatch import Dispatcher, Result, error_body
from faastube_sidecar.framing import FrameConnection
from faastube_sidecar.identity import PeerCredentials, PeerProcess, peer_credentials
from faastube_sidecar.metrics import SidecarMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket_path: Path
    max_clients: int = 8192
    max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES
    sweep_interval_s: float = 0.5
    shutdown_timeout_s: float = 5.0
    hello_timeout_s: float = 5.0             # a connection that has not said hello by then is closed
    frame_timeout_s: float = 10.0            # so is one that leaves half a frame waiting this long
    max_waiting_per_process: int = 64        # connections of one process not past hello yet
    max_reply_backlog_bytes: int = 4 << 20   # replies a peer leaves unread before it is cut off
    socket_mode: int = 0o660                 # who may connect: the sidecar's user and group
    socket_group: int | None = None          # the group that may connect (None: the sidecar's)


class SidecarServer:
    def __init__(self, config: ServerConfig, dispatcher: Dispatcher, metrics: SidecarMetrics) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.dataplane: DataPlane = dispatcher.dataplane
        self.metrics = metrics
        self._listener: socket.socket | None = None
        self._connections: set[FrameConnection] = set()
        self._waiting_by_pid: dict[int, int] = {}
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
            # Only the sidecar's user and the configured group may connect; who each one is gets
            # attested at hello.
            if self.config.socket_group is not None:
                os.chown(staging, -1, self.config.socket_group)
            os.chmod(staging, self.config.socket_mode)
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
                self._cut_off_stalled()
                self.dataplane.refresh_snapshot()
            except Exception:
                logger.exception("sweep failed")

    def _cut_off_stalled(self) -> None:
        """Connections that never said hello, or left half a frame waiting, are closed."""
        now = time.monotonic()
        for conn in list(self._connections):
            state: _ConnectionState = conn.state
            if state.session.identity is None and now - conn.opened_at > self.config.hello_timeout_s:
                self._refuse(conn, "no_hello", errors.Unavailable(
                    f"no hello within {self.config.hello_timeout_s:g}s of connecting: closed"))
            elif conn.stalled_since is not None and now - conn.stalled_since > self.config.frame_timeout_s:
                self._refuse(conn, "stalled_frame", errors.ProtocolError(
                    f"half a frame waited {self.config.frame_timeout_s:g}s for the rest: closed"))

    def _refuse(self, conn: FrameConnection, reason: str, exc: errors.FaastubeError) -> None:
        """Tell the peer why (an error frame with id 0), then hang up."""
        self.metrics.frames_rejected.labels(reason).inc()
        logger.debug("closing a connection: %s", exc)
        conn.send(protocol.Kind.ERROR, 0, error_body(exc))
        conn.close_after(0.5)

    # --- connections --------------------------------------------------------------------------

    def _new_connection(self) -> FrameConnection:
        # asyncio calls this once per accepted socket, before connection_made.
        return _Accepted(self)

    def _attach(self, conn: FrameConnection) -> bool:
        try:
            creds: PeerCredentials | None = peer_credentials(conn.sock)
        except OSError:
            creds = None
        if len(self._connections) >= self.config.max_clients:
            self._refuse(conn, "too_many_clients", errors.Unavailable(
                f"the sidecar has {len(self._connections)} connections open, its limit (--max-clients): "
                "retry later"))
            return False
        if creds is not None:
            waiting = self._waiting_by_pid.get(creds.pid, 0)
            if waiting >= self.config.max_waiting_per_process:
                self._refuse(conn, "too_many_waiting", errors.Unavailable(
                    f"process {creds.pid} already has {waiting} connections that have not said hello "
                    f"(limit {self.config.max_waiting_per_process})"))
                return False
            self._waiting_by_pid[creds.pid] = waiting + 1
        peer = self.dispatcher.attestor.observe(creds, conn.sock) if creds is not None else None
        session = self.dataplane.open_session()
        conn.state = _ConnectionState(session, peer, creds.pid if creds is not None else None)
        self._connections.add(conn)
        self.metrics.connections.inc()
        return True

    def _hello_done(self, conn: FrameConnection) -> None:
        state: _ConnectionState = conn.state
        if state.waiting_pid is not None:
            left = self._waiting_by_pid.get(state.waiting_pid, 0) - 1
            if left > 0:
                self._waiting_by_pid[state.waiting_pid] = left
            else:
                self._waiting_by_pid.pop(state.waiting_pid, None)
            state.waiting_pid = None

    def _closed(self, conn: FrameConnection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        self._hello_done(conn)
        self.metrics.connections.dec()
        self.dataplane.close_session(conn.state.session)

    def _bad_header(self, conn: FrameConnection, request_id: int, exc: errors.ProtocolError) -> None:
        self.metrics.frames_rejected.labels("bad_header" if request_id == 0 else "unservable").inc()
        conn.send(protocol.Kind.ERROR, request_id, error_body(exc))

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
        if state.waiting_pid is not None and state.session.identity is not None:
            self._hello_done(conn)
        if isinstance(result, tuple):
            if notify and result[0] is not protocol.Kind.ERROR:
                close_all(result[2])     # a notify is answered only when it fails
            else:
                conn.send(result[0], header.request_id, result[1], result[2])
            return None
        return self._reply_later(conn, header.request_id, result)

    async def _reply_later(self, conn: FrameConnection, request_id: int, pending: Awaitable[Result]) -> None:
        kind, reply, fds = await pending
        if conn.state.waiting_pid is not None and conn.state.session.identity is not None:
            self._hello_done(conn)
        conn.send(kind, request_id, reply, fds)


@dataclass(eq=False)
class _ConnectionState:
    session: Session
    peer: PeerProcess | None
    waiting_pid: int | None = None      # counted among its process's connections waiting for hello


class _Accepted(FrameConnection):
    """A FrameConnection bound to the server that accepted it."""

    def __init__(self, server: SidecarServer) -> None:
        self._server = server
        super().__init__(None, server._frame, on_bad_header=server._bad_header, on_closed=server._closed,  # type: ignore[arg-type]
                         max_body_bytes=server.config.max_body_bytes,
                         max_pending_bytes=server.config.max_reply_backlog_bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio only lends a restricted view of its socket; sendmsg (fd passing) and
        # SO_PEERCRED go through our own duplicate of the descriptor.
        self.sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        super().connection_made(transport)
        self._server._attach(self)

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
