"""``faastube bench network``: a get across two "nodes" against raw NIXL and host-centric passing.

Two sidecars on one machine play two nodes (``node-a``, ``node-b``): each serves
cross-node reads (peer service, NIXL agent with the UCX backend), and with ``--backend
cuda`` each has a GPU of its own (``CUDA_VISIBLE_DEVICES``). One worker process per
node plays a function there; the parent drives them over pipes. Per size, the three
ways of moving the same array from node A to node B run interleaved, one pass each in
turn, so drift on a shared machine hits them alike:

- **tube**: A puts a fresh array (``consumers=1``) and waits until its sidecar has it;
  B times ``get(ref)`` until the data is usable on its side (its stream synchronized
  on a GPU): B's sidecar asks A's to lend it, reads it with NIXL into B's pool, and
  answers. The put is not timed.
- **raw-nixl** (the floor): the two workers' own NIXL agents, same backend and UCX
  transports, buffers registered and metadata exchanged beforehand (over the pipes);
  B times descriptors, ``initialize_xfer("READ")``, ``transfer`` and polling
  ``check_xfer_state`` until DONE.
- **host-centric**: what one writes by hand without a data plane: B asks over a TCP
  connection (opened beforehand), A serializes the array (``tobytes()``; from a GPU,
  ``cupy.asnumpy`` first) and sends it with a small header, B receives it and rebuilds
  it with ``np.frombuffer`` (``cupy.asarray`` onto its GPU). B times from the request
  to the rebuilt array.

Each pass checks a marker byte the producer changed for it, after the clock stops.
Writes ``network-<machine>.json`` and ``network-<machine>.png`` (throughput vs size)
under ``--out``; prints the issue's targets as ``[MET ]``/``[MISS]`` and a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import re
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from faastube_spec import units

from faastube_bench import sidecars

logger = logging.getLogger(__name__)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TUBE, RAW, HOST_CENTRIC = "tube", "raw-nixl", "host-centric"
METHODS = (TUBE, RAW, HOST_CENTRIC)
NODES = ("node-a", "node-b")
WORKFLOW = "bench-network"
DEFAULT_SIZES = tuple(MiB << i for i in range(11))          # 1 MiB .. 1 GiB, powers of 2
QUICK_SIZES = (64 * KiB, MiB)
HOST_TLS = "tcp"
CUDA_TLS = "tcp,sm,self,cuda_copy,cuda_ipc"                   # the sidecar's default (nixl.DEFAULT_UCX_TLS)
COMMAND_TIMEOUT_S = 300.0
TIMING = {
    "clock": "time.perf_counter (CLOCK_MONOTONIC) in node B's worker; median and p90 over --repeat passes per "
             "size after --warmup untimed ones; the three methods interleaved pass by pass",
    TUBE: "B: get(ref) of a ref put on A (fresh each pass, consumers=1) until the data is usable on B (its stream "
          "synchronized on a GPU): sidecar B opens a lend on sidecar A (gRPC, signed), reads it with NIXL into B's "
          "pool, replies; untimed: A's put and a ping to its sidecar before, B's release after",
    RAW: "B: get_xfer_descs (both sides), initialize_xfer('READ'), transfer, poll check_xfer_state (sched_yield "
         "between polls) until DONE, "
         "release_xfer_handle; agents of the workers (same backend and UCX_TLS), buffers registered and metadata "
         "exchanged before timing; one READ per pass, the same buffers every pass",
    HOST_CENTRIC: "B: send a request byte on a TCP connection opened before timing; A: tobytes() (cupy.asnumpy "
                  "first from a GPU), sendall(header + bytes); B: recv_into a buffer, np.frombuffer (cupy.asarray "
                  "onto its GPU and synchronize), clock stops",
}


class BenchError(Exception):
    """The benchmark can't run as asked (a flag, a missing dependency, no GPUs), or a pass failed:
    one line for the user."""


class WorkerLost(BenchError):
    """A node's worker hung or died: the run can't go on."""


@dataclasses.dataclass(frozen=True)
class Targets:
    """Issue 13's targets."""

    raw_share: float = 0.90                 # tube throughput >= this x raw NIXL's ...
    raw_share_from_bytes: int = 64 * MiB    # ... at sizes of at least this
    small_bytes: int = MiB                  # at this size ...
    small_extra_s: float = 200e-6           # ... tube latency <= raw's + this
    host_centric_size_bytes: int = 128 * MiB
    host_centric_gain: float = 5.0          # tube throughput >= this x host-centric's at that size


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str                    # host | cuda
    sizes: tuple[int, ...]
    repeat: int
    warmup: int
    ucx_tls: str
    gpus: tuple[int, int]           # CUDA ordinals of node A and node B (cuda backend)
    quick: bool
    methods: tuple[str, ...] = METHODS


# --- the workers: one per node --------------------------------------------------------------------

class _Memory:
    """Host arrays with NumPy, or arrays on this process's one visible GPU with CuPy."""

    def __init__(self, backend: str) -> None:
        import numpy as np

        self.np = np
        self.cuda = backend == "cuda"
        self.cp: Any = None
        if self.cuda:
            import cupy

            self.cp = cupy
            cupy.cuda.Device(0).use()

    def empty(self, nbytes: int) -> Any:
        return (self.cp if self.cuda else self.np).empty((nbytes,), dtype=self.np.uint8)

    def address(self, array: Any) -> int:
        return int(array.data.ptr) if self.cuda else int(array.ctypes.data)

    @property
    def nixl_mem(self) -> str:
        return "VRAM" if self.cuda else "DRAM"

    def sync(self) -> None:
        if self.cuda:
            self.cp.cuda.get_current_stream().synchronize()

    def mark(self, array: Any, value: int) -> None:
        array[0] = value
        array[-1] = value
        self.sync()

    def marker(self, array: Any) -> tuple[int, int]:
        return int(array[0]), int(array[-1])


class NodeWorker:
    """A function on one node: a faastube client of that node's sidecar, a NIXL agent of its own,
    and a TCP endpoint for host-centric passing. A produces (node A), B consumes and times."""

    def __init__(self, *, node: str, socket_path: str, backend: str) -> None:
        import faastube
        from nixl_cu13 import nixl_agent, nixl_agent_config

        self.node = node
        self.mem = _Memory(backend)
        self.client = faastube.connect(socket_path, workflow=WORKFLOW, function=f"fn-{node}", timeout_s=120)
        self.device: int | str = 0 if self.mem.cuda else "cpu"
        # No NIXL progress thread (it spins a core for the whole run, slowing every method on a
        # small machine): B progresses its read by polling it, A is pumped only while B reads
        # raw (``pump``), as the sidecar's lender does while it has spans lent.
        self.agent = nixl_agent(f"bench-{node}-{os.getpid()}",
                                nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._pumping = threading.Event()
        self._pump_thread: threading.Thread | None = None
        self.array: Any = None
        self.registration: Any = None
        self.remote: tuple[str, int, int, str] | None = None        # agent, address, device, mem
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._server: threading.Thread | None = None
        self._lock = threading.Lock()                               # the array vs the host-centric server

    # --- both ---------------------------------------------------------------------------------

    def prepare(self, size: int) -> dict[str, Any]:
        """This node's buffer of `size` bytes (the source on A, the destination on B), registered with NIXL."""
        with self._lock:
            self._drop_buffer()
            self.array = self.mem.empty(size)
            if self.mem.cuda:
                self.array.fill(7)
            else:
                self.array[:] = 7                    # touched: no page faults inside a timed pass
            self.mem.sync()
            self.registration = self.agent.register_memory(
                [(self.mem.address(self.array), size, 0, "")], self.mem.nixl_mem)
        return {"metadata": bytes(self.agent.get_agent_metadata()), "address": self.mem.address(self.array),
                "device": 0, "mem": self.mem.nixl_mem}

    def _drop_buffer(self) -> None:
        if self.registration is not None:
            self.agent.deregister_memory(self.registration)
            self.registration = None
        self.array = None

    def close(self) -> None:
        for s in (self._conn, self._listener):
            if s is not None:
                s.close()
        with self._lock:
            self._drop_buffer()
        self.client.close()

    # --- node A: the producer -----------------------------------------------------------------

    def put(self, seq: int) -> str:
        with self._lock:
            self.mem.mark(self.array, seq % 251)
            ref = self.client.put(self.array, consumers=1)
            self.mem.sync()
        self.client.ping()               # the publish went before it: A's sidecar holds the object now
        return ref

    def mark(self, seq: int, *, pump: bool = False) -> None:
        with self._lock:
            self.mem.mark(self.array, seq % 251)
        self.pump(on=pump)

    def pump(self, *, on: bool) -> None:
        """Progress this agent from a thread while on (the owner's side of a raw read over TCP)."""
        if not on:
            self._pumping.clear()
            return
        if self._pump_thread is None:
            self._pump_thread = threading.Thread(target=self._pump_loop, name="nixl-progress", daemon=True)
            self._pump_thread.start()
        self._pumping.set()

    def _pump_loop(self) -> None:
        while True:
            self._pumping.wait()
            self.agent.get_new_notifs()
            os.sched_yield()

    def listen(self) -> int:
        listener = self._listener = socket.create_server(("127.0.0.1", 0))
        self._server = threading.Thread(target=self._serve, name="host-centric", daemon=True)
        self._server.start()
        return int(listener.getsockname()[1])

    def _serve(self) -> None:
        listener = self._listener
        if listener is None:
            return
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while conn.recv(1):
                with self._lock:
                    host = self.mem.cp.asnumpy(self.array) if self.mem.cuda else self.array
                    payload = host.tobytes()
                    header = json.dumps({"dtype": str(host.dtype), "shape": list(host.shape)}).encode()
                conn.sendall(struct.pack("!IQ", len(header), len(payload)) + header)
                conn.sendall(payload)

    # --- node B: the consumer, which times ----------------------------------------------------

    def connect(self, *, metadata: bytes, address: int, device: int, mem: str, port: int | None = None) -> None:
        name = self.agent.add_remote_agent(metadata)
        self.remote = (name.decode() if isinstance(name, bytes) else str(name), address, device, mem)
        if port is not None and self._conn is None:
            self._conn = socket.create_connection(("127.0.0.1", port))
            self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def tube(self, ref: str, seq: int) -> float:
        started = time.perf_counter()
        got = self.client.get(ref, device=self.device)
        self.mem.sync()
        elapsed = time.perf_counter() - started
        self._check(TUBE, got, seq)
        del got
        self.client.release(ref)
        return elapsed

    def raw(self, seq: int) -> float:
        np = self.mem.np
        if self.remote is None:
            raise RuntimeError("raw: connect to node A's agent first")
        agent, (remote, address, device, mem) = self.agent, self.remote
        size = int(self.array.nbytes)
        started = time.perf_counter()
        mine = agent.get_xfer_descs(np.array([[self.mem.address(self.array), size, 0]]), self.mem.nixl_mem)
        theirs = agent.get_xfer_descs(np.array([[address, size, device]]), mem)
        handle = agent.initialize_xfer("READ", mine, theirs, remote)
        state = agent.transfer(handle)
        while state == "PROC":
            os.sched_yield()             # busy, but A's progress pump gets a core
            state = agent.check_xfer_state(handle)
        elapsed = time.perf_counter() - started
        agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"raw NIXL read ended in {state}")
        self._check(RAW, self.array, seq)
        return elapsed

    def host_centric(self, seq: int) -> float:
        np, conn = self.mem.np, self._conn
        if conn is None:
            raise RuntimeError("host-centric: connect to node A first")
        started = time.perf_counter()
        conn.sendall(b"g")
        head = _recv_exactly(conn, struct.calcsize("!IQ"))
        header_len, size = struct.unpack("!IQ", head)
        header = json.loads(_recv_exactly(conn, header_len))
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = conn.recv_into(view[got:])
            if not n:
                raise RuntimeError("node A closed the host-centric connection mid-array")
            got += n
        array = np.frombuffer(buf, dtype=header["dtype"]).reshape(header["shape"])
        if self.mem.cuda:
            array = self.mem.cp.asarray(array)
            self.mem.sync()
        elapsed = time.perf_counter() - started
        self._check(HOST_CENTRIC, array, seq)
        return elapsed

    def _check(self, method: str, array: Any, seq: int) -> None:
        seen = self.mem.marker(array)
        if seen != (seq % 251, seq % 251):
            raise RuntimeError(f"{method}: pass {seq} read markers {seen}, expected {seq % 251} (stale or torn data)")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise RuntimeError("the host-centric connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def worker_main(conn: Connection, node: str, socket_path: str, backend: str, gpu: int, ucx_tls: str) -> None:
    """A node's worker process: runs the parent's commands until told to stop."""
    if backend == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)     # before anything touches CUDA
    os.environ["UCX_TLS"] = ucx_tls
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    worker: NodeWorker | None = None
    try:
        worker = NodeWorker(node=node, socket_path=socket_path, backend=backend)
        conn.send(("ok", os.getpid()))
        while True:
            command, kwargs = conn.recv()
            if command == "stop":
                break
            try:
                conn.send(("ok", getattr(worker, command)(**kwargs)))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
                conn.send(("error", f"{node} {command}: {type(e).__name__}: {e}"))
    except Exception as e:  # noqa: BLE001 - the worker could not start: say why
        conn.send(("error", f"{node} worker: {type(e).__name__}: {e}"))
    finally:
        if worker is not None:
            worker.close()


class _Worker:
    def __init__(self, node: str, socket_path: Path, settings: Settings, gpu: int) -> None:
        ctx = mp.get_context("spawn")
        self.node = node
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, name=f"bench-{node}",
                                args=(child, node, str(socket_path), settings.backend, gpu, settings.ucx_tls),
                                daemon=True)
        self.proc.start()
        child.close()
        self.pid = self._reply("start", 120.0)

    def call(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S, **kwargs: Any) -> Any:
        self._conn.send((command, kwargs))
        return self._reply(command, timeout_s)

    def _reply(self, command: str, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise WorkerLost(f"{self.node}'s worker did not answer {command} within {timeout_s:g}s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise WorkerLost(f"{self.node}'s worker died during {command} (exit {self.proc.exitcode})") from None
        if status != "ok":
            raise BenchError(value)
        return value

    def stop(self) -> None:
        try:
            self._conn.send(("stop", {}))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --- the two sidecars ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sidecar_flags(node: str, *, settings: Settings, ports: dict[str, int], secret_file: Path) -> list[str]:
    pool = f"{max(8 * GiB, 6 * max(settings.sizes))}"
    where = (["--gpu-pool-max", pool, "--gpu-quota", pool] if settings.backend == "cuda"
             else ["--host-pool-max", pool, "--host-quota", pool])
    peers = [f"--peer={other}=127.0.0.1:{port}" for other, port in ports.items() if other != node]
    return [*where, "--node-name", node, "--peer-port", str(ports[node]), "--peer-host", "127.0.0.1",
            "--peer-secret-file", str(secret_file), "--ucx-tls", settings.ucx_tls, *peers]


@contextmanager
def two_sidecars(settings: Settings, workdir: Path) -> Iterator[dict[str, Path]]:
    secret = workdir / "peer-secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    ports = {node: _free_port() for node in NODES}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sockets: dict[str, Path] = {}
    logs = []
    try:
        for node, gpu in zip(NODES, settings.gpus):
            sock = sockets[node] = workdir / node / "faastube.sock"
            sock.parent.mkdir(parents=True)
            env = dict(os.environ)
            if settings.backend == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            log = open(workdir / f"{node}.log", "wb")
            logs.append(log)
            procs[node] = sidecars.start(sock, sidecar_flags(node, settings=settings, ports=ports, secret_file=secret),
                                         backend=settings.backend, log=log, env=env)
        for node, proc in procs.items():
            try:
                sidecars.wait_ready(proc, sockets[node], log_path=workdir / f"{node}.log")
            except sidecars.SidecarFailed as e:
                raise BenchError(str(e)) from None
        yield sockets
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            sidecars.stop(proc)
        for log in logs:
            log.close()


# --- the run --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Measured:
    samples: dict[int, dict[str, list[float]]]      # size -> method -> seconds per timed pass
    failures: list[dict[str, Any]]                  # sizes that could not be measured, and why


def measure(settings: Settings, *, log: Callable[[str], None] = print) -> Measured:
    """Every size, every method. A pass that fails drops its size (recorded with the error) and the
    run goes on with the next size; a worker that hangs or dies ends the run with what it has."""
    out = Measured({}, [])
    with tempfile.TemporaryDirectory(prefix="ft-net-", dir="/tmp") as tmp, \
            two_sidecars(settings, Path(tmp)) as sockets:
        workers: list[_Worker] = []
        try:
            for node, gpu in zip(NODES, settings.gpus):
                workers.append(_Worker(node, sockets[node], settings, gpu))
            a, b = workers
            port = a.call("listen")
            seq = 0
            for size in settings.sizes:
                samples: dict[str, list[float]] = {m: [] for m in settings.methods}
                method = "prepare"
                try:
                    source = a.call("prepare", size=size)
                    b.call("prepare", size=size)
                    b.call("connect", port=port, **source)
                    for i in range(settings.warmup + settings.repeat):
                        for method in settings.methods:
                            seq += 1
                            if method == TUBE:
                                ref = a.call("put", seq=seq)
                                took = b.call("tube", ref=ref, seq=seq)
                            else:
                                a.call("mark", seq=seq, pump=method == RAW)
                                took = b.call("raw" if method == RAW else "host_centric", seq=seq)
                                if method == RAW:
                                    a.call("pump", on=False)
                            if i >= settings.warmup:
                                samples[method].append(float(took))
                except BenchError as e:
                    out.failures.append({"size_bytes": size, "method": method, "error": str(e),
                                         "passes_done": {m: len(v) for m, v in samples.items()}})
                    log(f"  {_size_label(size):>8}  FAILED in {method}: {e}")
                    if isinstance(e, WorkerLost):
                        break
                    continue
                out.samples[size] = samples
                log("  " + _size_label(size).rjust(8) + "  " + "  ".join(
                    f"{m} {statistics.median(v) * 1e3:8.3f} ms" for m, v in samples.items()))
        finally:
            for worker in workers:
                worker.stop()
    return out


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


def summarize(samples: dict[int, dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for size, methods in samples.items():
        row: dict[str, Any] = {"size_bytes": size}
        for method, values in methods.items():
            median = statistics.median(values)
            row[method] = {"median_s": median, "p90_s": quantile(values, 0.9), "min_s": min(values),
                           "throughput_bytes_per_s": size / median, "samples_s": values}
        tube, raw, host = row.get(TUBE), row.get(RAW), row.get(HOST_CENTRIC)
        if tube and raw:
            row["tube_over_raw"] = tube["throughput_bytes_per_s"] / raw["throughput_bytes_per_s"]
            row["tube_minus_raw_s"] = tube["median_s"] - raw["median_s"]
        if tube and host:
            row["tube_over_host_centric"] = tube["throughput_bytes_per_s"] / host["throughput_bytes_per_s"]
        rows.append(row)
    return rows


def evaluate(rows: Sequence[dict[str, Any]], targets: Targets) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(goal: str, met: bool | None, measured: str) -> None:
        out.append({"goal": goal, "met": met, "measured": measured})

    big = [r for r in rows if r["size_bytes"] >= targets.raw_share_from_bytes and "tube_over_raw" in r]
    goal = (f"get across nodes >= {targets.raw_share:.0%} of raw NIXL throughput at >= "
            f"{_size_label(targets.raw_share_from_bytes)}")
    if big:
        worst = min(big, key=lambda r: r["tube_over_raw"])
        add(goal, all(r["tube_over_raw"] >= targets.raw_share for r in big),
            ", ".join(f"{_size_label(r['size_bytes'])} {r['tube_over_raw']:.0%}" for r in big)
            + f" (lowest at {_size_label(worst['size_bytes'])})")
    else:
        add(goal, None, f"no size >= {_size_label(targets.raw_share_from_bytes)} measured")
    small = next((r for r in rows if r["size_bytes"] == targets.small_bytes and "tube_minus_raw_s" in r), None)
    goal = f"at {_size_label(targets.small_bytes)}, <= {targets.small_extra_s * 1e6:.0f} us more than raw NIXL"
    if small is None:
        add(goal, None, f"{_size_label(targets.small_bytes)} not measured")
    else:
        add(goal, small["tube_minus_raw_s"] <= targets.small_extra_s,
            f"get {small[TUBE]['median_s'] * 1e6:.0f} us, raw {small[RAW]['median_s'] * 1e6:.0f} us: "
            f"{small['tube_minus_raw_s'] * 1e6:+.0f} us")
    mid = next((r for r in rows if r["size_bytes"] == targets.host_centric_size_bytes
                and "tube_over_host_centric" in r), None)
    goal = (f">= {targets.host_centric_gain:g}x host-centric throughput at "
            f"{_size_label(targets.host_centric_size_bytes)}")
    if mid is None:
        add(goal, None, f"{_size_label(targets.host_centric_size_bytes)} not measured")
    else:
        add(goal, mid["tube_over_host_centric"] >= targets.host_centric_gain,
            f"get {_gbps(mid[TUBE])}, host-centric {_gbps(mid[HOST_CENTRIC])}: "
            f"{mid['tube_over_host_centric']:.2f}x")
    return out


def _gbps(cell: dict[str, Any]) -> str:
    return f"{cell['throughput_bytes_per_s'] / 1e9:.2f} GB/s"


def _size_label(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


# --- the report -----------------------------------------------------------------------------------

def machine(settings: Settings) -> dict[str, Any]:
    """What the numbers were measured on, for the JSON and the file name."""
    cpus = os.cpu_count() or 0
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    vm = bool(re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M))
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), 0)
    info: dict[str, Any] = {"cpus": cpus, "cpu_model": model, "virtual_machine": vm, "memory_bytes": mem_kib * KiB,
                            "platform": platform.platform(), "python": platform.python_version(),
                            "ucx_tls": settings.ucx_tls,
                            "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}}
    for dist in ("nixl-cu13", "numpy", "cupy-cuda13x", "cupy-cuda12x"):
        try:
            import importlib.metadata

            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    transport = f"NIXL UCX backend, UCX_TLS={settings.ucx_tls}, between two processes of one machine"
    if settings.backend == "cuda":
        from faastube_bench.dataplane import nvidia_smi

        smi = nvidia_smi()
        info["nvidia_smi"] = smi
        names = [r["name"] for r in smi] or ["unknown GPU"]
        info["card"] = f"{len(smi)}x {names[0]}"
        info["description"] = (f"{info['card']} ({cpus} CPUs); node A on GPU {settings.gpus[0]}, node B on GPU "
                               f"{settings.gpus[1]}, GPU memory (VRAM); {transport}")
        short = re.sub(r"[^a-z0-9]+", "", names[0].lower().replace("nvidia", "").split()[0]
                       if names[0].lower().replace("nvidia", "").split() else "gpu")
        info["tag"] = f"{len(smi)}x{short}"
    else:
        info["card"] = "no GPU (host backend)"
        info["description"] = (f"{cpus}-core CPU {'VM' if vm else 'machine'} ({model}), no GPU, host memory (DRAM) "
                               f"in both nodes' pools; {transport} (TCP over loopback), other work may share "
                               f"the cores")
        info["tag"] = f"cpu{cpus}"
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def build_report(settings: Settings, measured: Measured, *, machine_info: dict[str, Any],
                 wall_s: float) -> dict[str, Any]:
    rows = summarize(measured.samples)
    return {"benchmark": "faastube bench network", "schema": 1, "card": machine_info["card"],
            "machine": machine_info, "settings": dataclasses.asdict(settings), "timing": TIMING,
            "sizes": rows, "failures": measured.failures, "targets": evaluate(rows, Targets()), "wall_s": wall_s}


def goal_lines(data: dict[str, Any]) -> list[str]:
    return [f"[{'N/A ' if t['met'] is None else 'MET ' if t['met'] else 'MISS'}] {t['goal']}: {t['measured']}"
            for t in data["targets"]]


def table(data: dict[str, Any]) -> str:
    methods = [m for m in METHODS if m in data["settings"]["methods"]]
    head = f"{'size':>9}" + "".join(f"{m + ' p50/p90 ms':>26}{'GB/s':>7}" for m in methods)
    head += f"{'get/raw':>9}{'get-raw us':>11}{'get/host':>9}"
    lines = [f"card: {data['card']}  ({data['machine']['description']})", head]
    for row in data["sizes"]:
        line = f"{_size_label(row['size_bytes']):>9}"
        for m in methods:
            cell = row[m]
            line += (f"{cell['median_s'] * 1e3:>17.3f}/{cell['p90_s'] * 1e3:<8.3f}"
                     f"{cell['throughput_bytes_per_s'] / 1e9:>7.2f}")
        line += f"{row['tube_over_raw']:>9.2f}" if "tube_over_raw" in row else f"{'-':>9}"
        line += f"{row['tube_minus_raw_s'] * 1e6:>+11.0f}" if "tube_minus_raw_s" in row else f"{'-':>11}"
        line += f"{row['tube_over_host_centric']:>9.2f}" if "tube_over_host_centric" in row else f"{'-':>9}"
        lines.append(line)
    for failure in data.get("failures", []):
        lines.append(f"{_size_label(failure['size_bytes']):>9}  FAILED in {failure['method']}: {failure['error']}")
    lines.append("tube: get of a ref put on the other node (faastube); raw-nixl: one NIXL READ between two agents; "
                 "host-centric: serialize, TCP, rebuild; GB/s = size / median")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install faastube[bench]): no %s", path.name)
        return None
    rows = data["sizes"]
    labels = {TUBE: "faastube get across nodes", RAW: "raw NIXL READ (floor)", HOST_CENTRIC: "host-centric (TCP)"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = [r["size_bytes"] for r in rows]
    for method in (m for m in METHODS if m in data["settings"]["methods"]):
        left.plot(sizes, [r[method]["throughput_bytes_per_s"] / 1e9 for r in rows], marker="o", label=labels[method])
        right.plot(sizes, [r[method]["median_s"] * 1e3 for r in rows], marker="o", label=labels[method])
        right.fill_between(sizes, [r[method]["median_s"] * 1e3 for r in rows],
                           [r[method]["p90_s"] * 1e3 for r in rows], alpha=0.2)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [_size_label(s).replace(" ", "") for s in sizes], rotation=45, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    left.set_ylabel("throughput (GB/s, size / median)")
    right.set_ylabel("latency (ms, median; band to p90)")
    left.set_title("node A -> node B: throughput", fontsize=9)
    right.set_title("node A -> node B: latency", fontsize=9)
    fig.suptitle("\n".join(textwrap.wrap(f"faastube bench network, {data['card']}: {data['machine']['description']}",
                                         160)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the CLI --------------------------------------------------------------------------------------

def parse_sizes(text: str) -> tuple[int, ...]:
    """``1Mi,4Mi,64Mi`` or a range of powers of two ``1Mi..1Gi`` (or both, comma-separated)."""
    sizes: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low_text, dots, high_text = part.partition("..")
        try:
            low = units.parse_size(low_text)
            high = units.parse_size(high_text) if dots else low
        except units.UnitError as e:
            raise BenchError(f"--sizes {part!r}: {e}") from None
        if not 0 < low <= high <= 4 * GiB:
            raise BenchError(f"--sizes {part!r}: sizes must be between 1 byte and 4Gi, smallest first")
        while low <= high:
            sizes.add(low)
            low *= 2
    if not sizes:
        raise BenchError("--sizes: no size given")
    return tuple(sorted(sizes))


def _gpu_count() -> int:
    from faastube_bench.dataplane import gpu_count

    return gpu_count()


def settings_from(args: argparse.Namespace, *, gpu_count: Callable[[], int] = _gpu_count) -> Settings:
    try:
        import nixl_cu13  # noqa: F401
    except ImportError as e:
        raise BenchError(f"NIXL is not installed here ({e}); `make setup` installs nixl-cu13") from None
    gpus = 0 if args.backend == "host" else gpu_count()
    backend = args.backend if args.backend != "auto" else ("cuda" if gpus >= 2 else "host")
    pair = (0, 1)
    if args.gpus is not None:
        try:
            pair = tuple(int(g) for g in args.gpus.split(","))  # type: ignore[assignment]
        except ValueError:
            raise BenchError(f"--gpus {args.gpus!r}: two CUDA ordinals, node A's and node B's (e.g. 0,1)") from None
        if len(pair) != 2 or min(pair) < 0:
            raise BenchError(f"--gpus {args.gpus!r}: two CUDA ordinals, node A's and node B's (e.g. 0,1)")
        if backend != "cuda":
            raise BenchError("--gpus needs --backend cuda")
    if backend == "cuda":
        if gpus == 0:
            raise BenchError("--backend cuda: no GPU is visible here (CuPy sees none); run --backend host")
        if max(pair) >= gpus:
            raise BenchError(f"--backend cuda: each node needs a GPU of its own (--gpus {pair[0]},{pair[1]}), "
                             f"but {gpus} GPU(s) are visible; pass --gpus 0,0 to share one, or run --backend host")
    if args.repeat is not None and args.repeat < 1:
        raise BenchError(f"--repeat must be >= 1, got {args.repeat}")
    if args.warmup is not None and args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    methods = METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or TUBE not in methods:
            raise BenchError(f"--methods {args.methods!r}: {TUBE} and any of {', '.join(METHODS[1:])}")
    quick = bool(args.quick)
    return Settings(
        backend=backend,
        sizes=parse_sizes(args.sizes) if args.sizes else (QUICK_SIZES if quick else DEFAULT_SIZES),
        repeat=args.repeat if args.repeat is not None else (3 if quick else 10),
        warmup=args.warmup if args.warmup is not None else 1,
        ucx_tls=args.ucx_tls or (CUDA_TLS if backend == "cuda" else HOST_TLS),
        gpus=pair,  # type: ignore[arg-type]
        quick=quick, methods=methods)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto",
                        help="cuda: each node's sidecar and worker on a GPU of its own (VRAM); host: host memory "
                             "(auto: cuda with 2+ GPUs)")
    parser.add_argument("--gpus", metavar="A,B", help="CUDA ordinals of node A and node B (default 0,1)")
    parser.add_argument("--sizes", metavar="LIST",
                        help="sizes, comma-separated, or ranges of powers of two (default 1Mi..1Gi; quick 64Ki,1Mi)")
    parser.add_argument("--repeat", type=int, metavar="N", help="timed passes per size and method (default 10; "
                        "quick 3)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed passes first (default 1)")
    parser.add_argument("--quick", action="store_true", help="CI-sized: small sizes, few passes")
    parser.add_argument("--ucx-tls", metavar="LIST",
                        help=f"UCX transports of the sidecars and of raw NIXL alike (default {HOST_TLS} on host, "
                             f"{CUDA_TLS} on cuda)")
    parser.add_argument("--methods", metavar="LIST", help=f"default {','.join(METHODS)} ({TUBE} always runs)")
    parser.add_argument("--tag", help="names the outputs network-TAG.json/png (default: the machine, e.g. cpu2, "
                                      "2xh200)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot-only", type=Path, metavar="JSON",
                        help="redraw the PNG and reprint targets and table from a saved JSON; run nothing")


def run(args: argparse.Namespace) -> int:
    if args.plot_only is not None:
        try:
            data = json.loads(args.plot_only.read_text())
        except (OSError, ValueError) as e:
            print(f"faastube bench network: --plot-only: cannot read {args.plot_only}: {e}", file=sys.stderr)
            return 2
        png = plot(data, args.plot_only.with_suffix(".png"))
        print(f"wrote {png}" if png else "wrote nothing (matplotlib missing)")
    else:
        try:
            settings = settings_from(args)
        except BenchError as e:
            print(f"faastube bench network: {e}", file=sys.stderr)
            return 2
        info = machine(settings)
        tag = args.tag or info["tag"]
        print(f"faastube bench network: {settings.backend} backend, UCX_TLS={settings.ucx_tls}, sizes "
              f"{' '.join(_size_label(s) for s in settings.sizes)}, {settings.repeat} passes each")
        started = time.monotonic()
        info["load_average_before"] = list(os.getloadavg())
        try:
            measured = measure(settings)
        except BenchError as e:
            print(f"faastube bench network: {e}", file=sys.stderr)
            return 1
        info["load_average_after"] = list(os.getloadavg())      # 1/5/15 min: how shared the cores were
        info["description"] += (f"; load average {info['load_average_before'][0]:.1f} at the start, "
                                f"{info['load_average_after'][0]:.1f} at the end, on {os.cpu_count()} CPUs")
        data = build_report(settings, measured, machine_info=info, wall_s=time.monotonic() - started)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"network-{tag}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        png = None if args.no_plot else plot(data, path.with_suffix(".png"))
        print("wrote " + ", ".join(str(p) for p in (path, png) if p is not None) + f" ({data['wall_s']:.0f} s)")
    for line in goal_lines(data):
        print(line)
    print(table(data))
    return 1 if data["failures"] else 0
