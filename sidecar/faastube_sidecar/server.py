"""The sidecar's Unix-socket server: accept, read frames, dispatch, reply, clean up.

Each connection is served by one task that handles its requests in order (the
client waits for each reply), so per-connection backpressure is built in; the
number of connections is bounded. A frame whose header can't be trusted closes
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
from dataclasses import dataclass
from pathlib import Path

from faastube import errors, protocol
from faastube_sidecar.dataplane import DataPlane
from faastube_sidecar.dispatch import Dispatcher, error_body
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def bind(self) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            # Any local process may connect; who it is gets attested at hello, not by file mode.
            os.chmod(path, 0o666)
            listener.listen(min(self.config.max_clients, socket.SOMAXCONN))
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        logger.info("listening on %s (backend %s)", path, self.dataplane.backend.name)

    async def serve(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        sweeper = asyncio.create_task(self._sweep_forever(), name="faastube-sweeper")
        stop = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(self._listener))
                done, _ = await asyncio.wait({accept, stop}, return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await accept
                    break
                conn, _ = accept.result()
                if len(self._tasks) >= self.config.max_clients:
                    logger.warning("refusing a client: %d connections open", len(self._tasks))
                    self.metrics.frames_rejected.labels("too_many_clients").inc()
                    conn.close()
                    continue
                task = asyncio.create_task(self._serve_connection(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            sweeper.cancel()
            stop.cancel()
            await self._close_connections()
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
            logger.info("stopped")

    def stop(self) -> None:
        self._stopping.set()

    async def _close_connections(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.shutdown_timeout_s)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                expired = self.dataplane.sweep()
                if expired:
                    self.metrics.objects_expired.inc(expired)
            except Exception:  # noqa: BLE001 - housekeeping must keep running
                logger.exception("sweep failed")

    # --- one connection -----------------------------------------------------------------------

    async def _serve_connection(self, sock: socket.socket) -> None:
        conn = FrameConnection(sock, max_body_bytes=self.config.max_body_bytes)
        session = self.dataplane.open_session()
        peer: PeerCredentials | None
        try:
            peer = peer_credentials(sock)
        except OSError:
            peer = None
        self.metrics.connections.inc()
        try:
            while True:
                try:
                    frame = await conn.read_frame()
                except errors.ProtocolError as e:
                    # The stream can't be split into frames any more: say why, then hang up.
                    self.metrics.frames_rejected.labels("bad_header").inc()
                    with contextlib.suppress(OSError):
                        await conn.send(protocol.Kind.ERROR, 0, error_body(e))
                    return
                if frame is None:
                    return
                header, raw = frame
                if header.kind is not protocol.Kind.REQUEST:
                    self.metrics.frames_rejected.labels("not_a_request").inc()
                    await conn.send(protocol.Kind.ERROR, header.request_id, error_body(
                        errors.ProtocolError(f"expected a request frame, got {header.kind.name.lower()}")))
                    continue
                try:
                    body = protocol.decode_body(raw)
                except errors.ProtocolError as e:
                    self.metrics.frames_rejected.labels("bad_body").inc()
                    await conn.send(protocol.Kind.ERROR, header.request_id, error_body(e))
                    continue
                kind, reply, fds = await self.dispatcher.handle(session, peer, body)
                await conn.send(kind, header.request_id, reply, fds)
        except (ConnectionError, BrokenPipeError) as e:
            logger.debug("session %d: connection lost: %s", session.id, e)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the others
            logger.exception("session %d failed", session.id)
        finally:
            self.metrics.connections.dec()
            self.dataplane.close_session(session)
            conn.close()


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
