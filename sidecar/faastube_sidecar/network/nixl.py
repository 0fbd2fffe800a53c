"""The one module that talks to NIXL (the ``nixl_cu13`` wheel; its UCX backend moves the bytes).

An ``Agent`` lends spans (registered only while lent, so a peer can read nothing else)
and reads spans other agents lent it. NIXL's calls are synchronous and cheap (a
registration is ~6 us, a read is posted, then polled); the event loop registers and
the network engine's thread reads, so every call holds the agent's lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from faastube.errors import FaastubeError

from faastube_sidecar.network.messages import MemType

logger = logging.getLogger(__name__)
DEFAULT_UCX_TLS = "tcp,sm,self,cuda_copy,cuda_ipc"   # RDMA transports join where the NICs have them


class NixlUnavailable(FaastubeError):
    """NIXL can't be loaded or its backend can't start here: fix the install or transports."""


class ReadFailed(FaastubeError):
    """A NIXL read ended in error (the peer went away, or its memory is gone)."""


@dataclass(frozen=True)
class Span:
    address: int
    nbytes: int
    device: int
    mem: MemType


def _module() -> Any:
    try:
        import nixl_cu13
    except ImportError as e:
        raise NixlUnavailable("cross-node passing needs NIXL (`make setup` installs nixl-cu13; images carry it): "
                              f"{e}") from e
    return nixl_cu13


class Agent:
    def __init__(self, name: str, *, backend: str = "UCX", ucx_tls: str | None = None) -> None:
        # UCX reads its transports from the environment when the backend starts; an empty
        # UCX_TLS makes the backend fail to start, so there is always a value.
        os.environ["UCX_TLS"] = ucx_tls or os.environ.get("UCX_TLS") or DEFAULT_UCX_TLS
        nixl = _module()
        try:
            # No NIXL progress thread: it spins (a whole core per sidecar, idle or not). The
            # reader progresses its side by polling its reads; a lender, whose side UCX
            # over TCP must progress too, runs a ``ProgressPump`` while it has spans lent.
            config = nixl.nixl_agent_config(enable_prog_thread=False, backends=[backend])
            self._agent = nixl.nixl_agent(name, config)
        except Exception as e:  # noqa: BLE001 - the binding raises its own types; say what was asked
            raise NixlUnavailable(f"NIXL agent {name!r} with backend {backend} (UCX_TLS={os.environ['UCX_TLS']}): "
                                  f"{e}") from e
        self.name = name
        self._remotes: set[str] = set()
        self._lock = threading.Lock()

    # --- lending ------------------------------------------------------------------------------

    def register(self, span: Span) -> Any:
        with self._lock:
            return self._agent.register_memory([(span.address, span.nbytes, span.device, "")], span.mem)

    def deregister(self, registration: Any) -> None:
        with self._lock:
            self._agent.deregister_memory(registration)

    def metadata_for(self, registration: Any, *, with_connection: bool) -> bytes:
        """What a peer needs to read this registration (and to connect, the first time)."""
        with self._lock:
            if with_connection:
                return bytes(self._agent.get_agent_metadata())
            return bytes(self._agent.get_partial_agent_metadata(registration, False))

    # --- reading ------------------------------------------------------------------------------

    def learn(self, metadata: bytes) -> str:
        """Load a peer's metadata (its connection, or spans it newly lent); returns its agent name."""
        with self._lock:
            name = self._agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._remotes.add(name)
        return name

    def forget(self, remote: str) -> None:
        if remote in self._remotes:
            self._remotes.discard(remote)
            try:
                with self._lock:
                    self._agent.remove_remote_agent(remote)
            except Exception as e:  # noqa: BLE001 - forgetting a dead peer must not fail the caller
                logger.debug("forgetting NIXL agent %s: %s", remote, e)

    def read(self, local: Span, remote: Span, remote_agent: str) -> Any:
        """Post a read of `remote` into `local` (same size); poll the handle with ``state``."""
        import numpy as np

        with self._lock:
            mine = self._agent.get_xfer_descs(np.array([[local.address, local.nbytes, local.device]]), local.mem)
            theirs = self._agent.get_xfer_descs(np.array([[remote.address, remote.nbytes, remote.device]]),
                                                remote.mem)
            try:
                handle = self._agent.initialize_xfer("READ", mine, theirs, remote_agent)
            except Exception as e:  # noqa: BLE001
                raise ReadFailed(f"NIXL could not prepare a read from {remote_agent}: {e}") from e
            why: Exception | None = None
            try:
                state = self._agent.transfer(handle)
            except Exception as e:  # noqa: BLE001
                state, why = "ERR", e
            if state == "ERR":
                self._agent.release_xfer_handle(handle)
                raise ReadFailed(f"NIXL refused a read from {remote_agent}" + (f": {why}" if why else ""))
        return handle

    def state(self, handle: Any) -> str:
        """'PROC' while in flight, then 'DONE' or 'ERR' (the handle is released then)."""
        with self._lock:
            try:
                state = self._agent.check_xfer_state(handle)
            except Exception as e:  # noqa: BLE001
                logger.debug("NIXL read state: %s", e)
                state = "ERR"
            if state != "PROC":
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception as e:  # noqa: BLE001
                    logger.debug("releasing a NIXL read: %s", e)
        return str(state)

    def progress(self) -> None:
        """Let the backend make progress (serve peers' reads of our spans, finish handshakes)."""
        with self._lock:
            self._agent.get_new_notifs()

    def close(self, registrations: Sequence[Any] = ()) -> None:
        for registration in registrations:
            try:
                self.deregister(registration)
            except Exception as e:  # noqa: BLE001
                logger.debug("deregistering at close: %s", e)
        for remote in list(self._remotes):
            self.forget(remote)


class ProgressPump:
    """Progresses an agent from a thread while anything is held: the owner's side of reads
    over transports that need it (UCX over TCP emulates remote reads with messages). Idle
    (nothing lent) it sleeps, so an idle sidecar costs no CPU."""

    def __init__(self, agent: Agent, *, interval_s: float = 50e-6) -> None:
        self._agent = agent
        self._interval_s = interval_s
        self._held = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="faastube-nixl-progress", daemon=True)
        self._thread.start()

    def hold(self) -> None:
        with self._cond:
            self._held += 1
            self._cond.notify()

    def release(self) -> None:
        with self._cond:
            self._held = max(0, self._held - 1)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self._agent.progress()
            except Exception as e:  # noqa: BLE001 - a failing progress call must not end the pump
                logger.warning("NIXL progress: %s", e)
            time.sleep(self._interval_s)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5.0)
