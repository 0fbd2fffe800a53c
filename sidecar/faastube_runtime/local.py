"""Local mode: a sidecar, one process per function replica, and the gateway, on this machine.

``LocalRuntime`` owns every process it starts: children get their own session (so
Ctrl-C reaches only us and we stop them in order: gateway, workers, sidecar) and
a parent-death signal (so even a killed parent leaves no orphans). All sockets
live in one temporary directory, removed on stop.

With ``LocalOptions.nodes`` > 1 the run has that many "nodes": a sidecar each, with its own
socket directory, serving cross-node reads to the others over NIXL (a shared secret in
the run's directory, peer ports picked free); each function's workers connect to the
sidecar of the node ``nodes.place_on_local_nodes`` chose for it, and the gateway (on the
first node) reaches every replica wherever it runs.

Autoscaled functions (``minReplicas``/``maxReplicas``) start with ``replicas`` workers;
the gateway's ``ScaleMonitor`` decides and a ``local_scaling.ReplicaController`` starts
and stops worker processes to follow it (``LocalOptions.autoscale``; off, every function
keeps its starting count, at least one).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import aiohttp
import yaml
from aiohttp import web
from faastube import errors as ft_errors
from faastube import sdk
from faastube_autoscale import AutoscaleSettings
from faastube_spec import topology
from faastube_spec.topology import NodeTopology
from faastube_spec.workflow import GATEWAY_FUNCTION, Workflow, dump_workflow

from faastube_runtime import dag, errors, nodes, scaling, wire
from faastube_runtime.addresses import Address
from faastube_runtime.gateway import ClientStore, Gateway, GatewayConfig, make_runner
from faastube_runtime.invoker import Replica, WorkerPool
from faastube_runtime.local_scaling import FunctionScaling, ReplicaController
from faastube_runtime.metrics import GatewayMetrics
from faastube_runtime.nodes import NodePlacement

logger = logging.getLogger(__name__)

Backend = Literal["host", "cuda", "auto"]
STOP_TIMEOUT_S = 5.0
# The function name `faastube run` suggests to clients of one's own (any name but the gateway's works).
CLIENT_FUNCTION = "client"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class LocalOptions:
    backend: Backend = "auto"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    passing: sdk.Passing = "tube"
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    startup_timeout_s: float = 60.0  # for each child to answer at all
    warmup_timeout_s: float = 600.0  # then for each worker to be warm (a model may take minutes to load)
    child_log_level: str = "WARNING"
    sidecar_args: tuple[str, ...] = ()
    # Worker processes follow the autoscaler (functions with minReplicas/maxReplicas); off,
    # each function keeps its starting count (at least one): the fixed-replica baseline.
    autoscale: bool = True
    autoscale_settings: AutoscaleSettings = field(default_factory=AutoscaleSettings)
    scale_interval_s: float = scaling.DEFAULT_INTERVAL_S
    # "Nodes" on this machine: one sidecar each, passing across them over NIXL (see ``nodes``).
    nodes: int = 1
    node_placement: NodePlacement = "spread"


def gpu_count() -> int:
    """Visible CUDA devices; 0 without CuPy or a driver."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "no GPU" here
        return 0


def resolve_backend(backend: Backend) -> Literal["host", "cuda"]:
    if backend == "auto":
        return "cuda" if gpu_count() > 0 else "host"
    if backend == "cuda" and gpu_count() == 0:
        raise errors.StartupFailed("--backend cuda: no CUDA device visible (or CuPy is not installed)")
    return backend


def assign_devices(workflow: Workflow, *, gpus: int, node: NodeTopology | None = None,
                   cuda_of: Mapping[int, int] | None = None) -> dict[tuple[str, int], int | None]:
    """CUDA ordinal per (function, replica number); CPU functions get none.

    Every replica number a function may run gets one (up to its ``reserved_replicas``:
    ``maxReplicas`` when it autoscales), so replicas started later land where placement
    reserved room for them.

    With this machine's topology (`node`, NVML indices mapped to CUDA ordinals by `cuda_of`),
    GPU functions are placed as the operator places them on a cluster node: functions that
    pass much data share a GPU (zero-copy) or sit on NVLinked GPUs. Without it, or if
    placement fails, they are spread round-robin over the `gpus` GPUs.
    """
    gpu_of: dict[str, int | None] = {}
    if gpus > 0 and node is not None and any(spec.gpu for spec in workflow.functions):
        from faastube_placement import PlacementError, place

        try:
            placement = place(workflow, topology.ClusterTopology(nodes=(node,)))
        except PlacementError as e:
            logger.warning("placing %s on this machine failed (%s); GPU functions go round-robin",
                           workflow.name, e)
        else:
            for name, where in placement.assignments.items():
                gpu_of[name] = None if where.gpu is None else (cuda_of or {}).get(where.gpu, where.gpu)
            logger.info("placed %s on this machine: %s", workflow.name,
                        ", ".join(f"{n}->gpu{g}" for n, g in sorted(gpu_of.items()) if g is not None))
    assignment: dict[tuple[str, int], int | None] = {}
    next_gpu = 0
    for spec in workflow.functions:
        for replica in range(spec.reserved_replicas):
            if not spec.gpu or gpus <= 0:
                assignment[(spec.name, replica)] = None
            elif gpu_of.get(spec.name) is not None:
                assignment[(spec.name, replica)] = gpu_of[spec.name]
            else:
                assignment[(spec.name, replica)] = next_gpu % gpus
                next_gpu += 1
    return assignment


def local_node() -> tuple[NodeTopology | None, dict[int, int]]:
    """This machine's GPU topology (NVML) and its GPU index -> CUDA ordinal map; (None, {}) if unknown."""
    try:
        import cupy
        from faastube_sidecar.backends.cuda import normalize_bus_id
        from faastube_sidecar.discovery import discover_local_node

        node = discover_local_node()
        ordinals = {normalize_bus_id(cupy.cuda.Device(i).pci_bus_id): i
                    for i in range(cupy.cuda.runtime.getDeviceCount())}
        cuda_of = {g.index: ordinals[normalize_bus_id(g.pcie_bus_id)] for g in node.gpus
                   if normalize_bus_id(g.pcie_bus_id) in ordinals}
        if len(cuda_of) != len(node.gpus):
            raise ValueError("NVML and CUDA see different GPUs")
        return node, cuda_of
    except Exception as e:  # noqa: BLE001 - placement then falls back to round-robin, said in the log
        logger.warning("cannot read this machine's GPU topology (%s): GPU functions go round-robin", e)
        return None, {}


def _socket_parent() -> str:
    """Where the socket directory goes: $TMPDIR unless that is too deep for socket paths."""
    base = tempfile.gettempdir()
    return base if len(base) <= 64 else "/tmp"


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when this process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: Address | None = None  # a worker's


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another process may take it before we do: rare, and
    then a sidecar fails to start, saying so in its log)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_secret(path: Path) -> Path:
    """A fresh shared secret for the run's sidecars, readable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def port_in_use_message(host: str, port: int, error: OSError) -> str:
    """One line for a gateway port that cannot be listened on (usually: already in use)."""
    return (f"--port: cannot listen on {host}:{port}: {error.strerror or error}; "
            "is another server (another faastube run?) on it? choose another --port, or 0 for any free one")


def check_port_free(host: str, port: int) -> None:
    """Raise ``BadInput`` now if ``host:port`` cannot be listened on, before minutes of warm-up.

    Binds as the gateway will (address reuse on); the gateway's own bind stays the authority."""
    if port == 0:
        return
    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        raise errors.BadInput(port_in_use_message(host, port, e)) from e


class LocalRuntime:
    """``async with LocalRuntime(workflow, options) as rt:`` then POST to ``rt.url``."""

    def __init__(self, workflow: Workflow, options: LocalOptions | None = None) -> None:
        if workflow.source_path is None:
            raise errors.StartupFailed("local mode needs a workflow loaded from a file "
                                       "(workers load it and its handlers by path)")
        self.workflow = workflow
        self.options = options if options is not None else LocalOptions()
        self.plan = dag.plan_workflow(workflow)
        self.backend: Literal["host", "cuda"] = "host"
        self.socket_dir = Path()
        self.workflow_file = Path()
        self.sidecar_socket = ""  # the first node's: the gateway's, and what clients of one's own use
        self.nodes: tuple[nodes.LocalNode, ...] = ()
        self.sidecar_sockets: dict[str, str] = {}  # node -> its sidecar's socket
        self.placed: dict[str, nodes.Placed] = {}  # function -> its node and device (several nodes)
        self._node_clients: dict[str, Any] = {}  # node -> the gateway's client there (several nodes)
        self.gateway: Gateway | None = None
        self.url = ""
        self._children: list[_Child] = []
        self._devices: dict[tuple[str, int], int | None] = {}
        self._serials: dict[str, int] = {}  # per function: the next worker's number (names, sockets)
        self._monitor: scaling.ScaleMonitor | None = None
        self._controller: ReplicaController | None = None
        self._pool: WorkerPool | None = None
        self._store: ClientStore | None = None
        self._runner: web.AppRunner | None = None
        self._client: Any = None
        # function -> each replica's warm-up as its /healthz reported it (WarmupReport.as_dict)
        self.warmup: dict[str, list[dict[str, Any]]] = {}
        # Keep the children's logs (sidecar.log, fn-<function>-<n>.log) at stop: set by a caller
        # whose run failed; also set when the run ends with an error or a child exited abnormally.
        self.keep_logs = False
        self.logs_kept: Path | None = None  # where they were kept

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            self.keep_logs = True
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and not issubclass(exc_type, (KeyboardInterrupt, asyncio.CancelledError)):
            self.keep_logs = True
        await self.stop()

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self.backend = resolve_backend(self.options.backend)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="faastube-run-", dir=_socket_parent()))
        # Workers run the workflow this runtime was given, which may differ from its file (the
        # benchmark strips batching and scaling from it): they read it from here, and look
        # for handlers next to the original.
        self.workflow_file = self.socket_dir / "workflow.yaml"
        self.workflow_file.write_text(yaml.safe_dump(dump_workflow(self.workflow), sort_keys=False))
        gpus = gpu_count() if self.backend == "cuda" else 0
        if self.options.nodes == 1:
            self.sidecar_socket = str(self.socket_dir / "sidecar.sock")
            self._spawn("sidecar", self._sidecar_command(self.sidecar_socket))
            self._client = await self._connect_sidecar("sidecar", self.sidecar_socket)
        else:
            self.nodes = nodes.split_gpus(self.options.nodes, gpus)
            self._start_node_sidecars()
            for node in self.nodes:
                self._node_clients[node.name] = await self._connect_sidecar(
                    f"sidecar-{node.name}", self.sidecar_sockets[node.name])
            self._client = self._node_clients[self.nodes[0].name]
            self.sidecar_socket = self.sidecar_sockets[self.nodes[0].name]
        replicas = self._spawn_workers(gpus)
        # Nothing is sent before every worker is warm (its handler's setup and warm-up call ran).
        await asyncio.gather(*(self._wait_worker(r) for rs in replicas.values() for r in rs))
        self._store = ClientStore(self._client, others={n: c for n, c in self._node_clients.items()
                                                        if c is not self._client})
        # A function that starts scaled to zero has no worker yet: its first call waits for one.
        self._pool = WorkerPool(self.plan, replicas, discard=self._store.discard,
                                require_all=all(replicas.get(f.name) for f in self.workflow.functions))
        await self._pool.__aenter__()
        metrics = GatewayMetrics.create()
        self._monitor = scaling.ScaleMonitor(self.workflow, self._pool, settings=self.options.autoscale_settings,
                                             interval_s=self.options.scale_interval_s, metrics=metrics)
        if self.options.autoscale:
            self._controller = ReplicaController(self.workflow, self._pool, self)
            self._monitor.subscribe(self._controller.apply)
        await self._monitor.__aenter__()
        self.gateway = Gateway(self.workflow.name, self.plan, self._pool, self._store,
                               config=self.options.gateway, metrics=metrics, scale=self._monitor)
        self._runner = make_runner(self.gateway)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        try:
            await site.start()
        except OSError as e:
            raise errors.BadInput(port_in_use_message(self.options.host, self.options.port, e)) from e
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.options.host}:{port}"
        logger.info("workflow %s: gateway on %s, %d worker(s), %s backend, %s passing", self.workflow.name,
                    self.url, sum(len(r) for r in replicas.values()), self.backend, self.options.passing)

    def _sidecar_command(self, socket_path: str, *extra: str) -> list[str]:
        return ["-m", "faastube.cli", "--log-level", self.options.child_log_level, "sidecar",
                "--socket", socket_path, "--backend", self.backend, *extra, *self.options.sidecar_args]

    def _start_node_sidecars(self) -> None:
        """One sidecar per node, each in its own socket directory, all knowing each other."""
        secret = write_secret(self.socket_dir / "peer-secret")
        ports = {node.name: free_port() for node in self.nodes}
        # UCX over TCP moves host memory between processes anywhere; GPU nodes keep the
        # sidecar's default transports (CUDA ones included).
        transports = ("--ucx-tls", "tcp") if self.backend == "host" else ()
        for node in self.nodes:
            directory = self.socket_dir / node.name
            directory.mkdir()
            self.sidecar_sockets[node.name] = str(directory / "sidecar.sock")
            peers = [f"--peer={other}=127.0.0.1:{port}" for other, port in ports.items() if other != node.name]
            self._spawn(f"sidecar-{node.name}", self._sidecar_command(
                self.sidecar_sockets[node.name], "--node-name", node.name, "--peer-port", str(ports[node.name]),
                "--peer-host", "127.0.0.1", "--peer-secret-file", str(secret), *transports, *peers),
                env=self._node_env(node))

    def _node_env(self, node: nodes.LocalNode) -> dict[str, str] | None:
        """The environment of a node's processes: only its GPUs visible (None: ours, unchanged)."""
        if not node.cuda_ordinals:
            return None
        return {**os.environ, "CUDA_VISIBLE_DEVICES": nodes.cuda_visible_devices(
            node, os.environ.get("CUDA_VISIBLE_DEVICES"))}

    def _spawn(self, name: str, args: list[str], *, env: Mapping[str, str] | None = None) -> _Child:
        log_path = self.socket_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                       # runs only prctl(2) in the child; no locks taken
                                       preexec_fn=_die_with_parent)  # noqa: PLW1509
        child = _Child(name=name, process=process, log_path=log_path)
        self._children.append(child)
        return child

    def _spawn_workers(self, gpus: int) -> dict[str, list[Replica]]:
        node, cuda_of = local_node() if gpus else (None, {})
        if self.nodes:
            self.placed = nodes.place_on_local_nodes(self.workflow, self.nodes, mode=self.options.node_placement,
                                                     machine=node, cuda_of=cuda_of)
            self._devices = {(spec.name, r): self.placed[spec.name].device for spec in self.workflow.functions
                             for r in range(spec.reserved_replicas)}
        else:
            self._devices = assign_devices(self.workflow, gpus=gpus, node=node, cuda_of=cuda_of)
        replicas: dict[str, list[Replica]] = {}
        for spec in self.workflow.functions:
            # Without autoscaling nothing would start a function's first worker later.
            count = spec.replicas if self.options.autoscale else max(1, spec.replicas)
            replicas[spec.name] = [self._spawn_worker(spec.name) for _ in range(count)]
        return replicas

    def _spawn_worker(self, function: str) -> Replica:
        """Start one worker process of ``function`` (not yet ready: see ``_wait_worker``)."""
        spec = self.workflow.function(function)
        number = self.workflow.functions.index(spec)
        serial = self._serials.get(function, 0)
        self._serials[function] = serial + 1
        # short names: a Unix socket path must fit in 108 bytes
        placed = self.placed.get(function)
        home = next((n for n in self.nodes if placed is not None and n.name == placed.node), None)
        directory = self.socket_dir if home is None else self.socket_dir / home.name
        sidecar = self.sidecar_socket if home is None else self.sidecar_sockets[home.name]
        path = str(directory / f"w{number}-{serial}.sock")
        args = ["-m", "faastube_runtime.worker", "--log-level", self.options.child_log_level,
                "--workflow", str(self.workflow_file), "--handlers-dir", str(self.workflow.base_dir),
                "--function", function,
                "--listen", path, "--sidecar", sidecar, "--passing", self.options.passing]
        # the GPU placement chose for the function (replica numbers cycle over its reservation)
        device = self._devices.get((function, serial % spec.reserved_replicas))
        if device is not None:
            args += ["--device", str(device)]
        address = Address.unix(path)
        self._spawn(f"fn-{function}-{serial}", args, env=None if home is None else self._node_env(home)
                    ).address = address
        return Replica(function, serial, address)

    # --- autoscaling (local_scaling.Launcher) --------------------------------------------------

    async def start_replica(self, function: str) -> Address:
        """Start a worker of ``function``; its address once ``/healthz`` answers 200."""
        replica = self._spawn_worker(function)
        try:
            await self._wait_worker(replica)
        except BaseException:
            await self.stop_replica(function, replica.address)
            raise
        return replica.address

    async def stop_replica(self, function: str, address: Address) -> None:
        """Stop the worker process at ``address`` (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``)."""
        children = [c for c in self._children if c.address == address]
        self._children = [c for c in self._children if c.address != address]
        await asyncio.to_thread(_stop_children, children)

    def worker_pids(self, function: str) -> list[int]:
        """Process ids of ``function``'s worker processes that are running (started and not stopped)."""
        prefix = f"fn-{function}-"
        return [c.process.pid for c in self._children
                if c.name.startswith(prefix) and c.name[len(prefix):].isdigit() and c.process.poll() is None]

    def sidecar_pid(self, node: str | None = None) -> int:
        """The process id of a node's sidecar (the only one's when there is one node)."""
        name = "sidecar" if node is None else f"sidecar-{node}"
        for child in self._children:
            if child.name == name:
                return child.process.pid
        raise KeyError(f"no sidecar {name!r} in this run")

    def scaling_report(self) -> dict[str, FunctionScaling]:
        """Per function: workers at the start and at the end, fewest and most, scale events."""
        if self._controller is not None:
            return self._controller.report()
        counts = {f.name: len(self._pool.replicas(f.name)) if self._pool else 0 for f in self.workflow.functions}
        return {name: FunctionScaling(initial=n, final=n, fewest=n, most=n, scale_ups=0, scale_downs=0,
                                      failed_starts=0) for name, n in counts.items()}

    def _check_alive(self, name: str) -> None:
        for child in self._children:
            if child.name == name and child.process.poll() is not None:
                raise errors.StartupFailed(f"{name} exited with status {child.process.returncode} "
                                           f"during startup; its log ends:\n{_log_tail(child.log_path, 2000)}")

    async def _until_ready(self, name: str, probe: Any, *, timeout_s: float | None = None) -> Any:
        """Probe with backoff until it answers, the child dies, or the timeout (default: the
        startup timeout) passes."""
        timeout_s = self.options.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay_s = 0.01
        while True:
            self._check_alive(name)
            try:
                return await probe()
            except (OSError, aiohttp.ClientError, ft_errors.Unavailable) as e:
                last: BaseException = e
            if time.monotonic() > deadline:
                raise errors.StartupFailed(f"{name} did not become ready in {timeout_s:.0f}s: {last}")
            await asyncio.sleep(delay_s)
            delay_s = min(0.2, delay_s * 2)

    async def _connect_sidecar(self, name: str, socket_path: str) -> Any:
        from faastube import client as ft_client

        async def probe() -> Any:
            if not os.path.exists(socket_path):
                raise FileNotFoundError(socket_path)
            # a short timeout per try: the socket may exist before the sidecar answers
            probe_client = await asyncio.to_thread(ft_client.connect, socket_path,
                                                   workflow=self.workflow.name, function=GATEWAY_FUNCTION,
                                                   timeout_s=2.0)
            probe_client.close()

        await self._until_ready(name, probe)
        return ft_client.connect(socket_path, workflow=self.workflow.name, function=GATEWAY_FUNCTION)

    async def _wait_worker(self, replica: Replica) -> None:
        """Until the worker answers (the startup timeout), then until it is warm (the warm-up timeout)."""

        async def health() -> tuple[int, Any]:
            if not os.path.exists(replica.address.path):
                raise FileNotFoundError(replica.address.path)
            connector = aiohttp.UnixConnector(path=replica.address.path)
            async with (aiohttp.ClientSession(connector=connector) as s,
                        s.get(f"http://worker{wire.HEALTH_PATH}") as response):
                return response.status, await response.json(content_type=None)

        async def warm() -> Any:
            status, body = await health()
            if status != 200:
                raise aiohttp.ClientError(f"healthz answered {status}: {body.get('phase', body)}")
            return body

        name = f"fn-{replica.function}-{replica.index}"
        await self._until_ready(name, health)
        body = await self._until_ready(name, warm, timeout_s=self.options.warmup_timeout_s)
        self.warmup.setdefault(replica.function, []).append(body.get("warmup") or {})

    # --- stop ----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until calls the gateway gave up on have ended and their outputs are freed."""
        if self._pool is not None:
            await self._pool.drain()

    def pool_stats(self, node: str | None = None) -> Any:
        """The sidecar's pool statistics (for checks that nothing was left allocated); with
        several nodes, the first node's unless ``node`` names another."""
        return (self._client if node is None else self._node_clients[node]).stats()

    async def stop(self) -> None:
        if self._controller is not None:
            await self._controller.close()
        if self._monitor is not None:
            await self._monitor.__aexit__(None, None, None)
            self._monitor = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self._pool.drain()
            except TimeoutError:
                logger.warning("abandoned calls still running at shutdown")
            await self._pool.close()
            self._pool = None
        if self._store is not None:
            self._store.close()
            self._store = None
        for client in {id(c): c for c in (self._client, *self._node_clients.values()) if c is not None}.values():
            try:
                client.close()
            except Exception as e:  # noqa: BLE001 - the sidecar may already be gone
                logger.debug("closing the gateway's client: %s", e)
        self._client = None
        self._node_clients = {}
        # workers before the sidecars: they hold mappings of their pools
        workers = [c for c in self._children if not c.name.startswith("sidecar")]
        sidecars = [c for c in self._children if c.name.startswith("sidecar")]
        if not await asyncio.to_thread(_stop_children, workers):
            self.keep_logs = True
        if not await asyncio.to_thread(_stop_children, sidecars):
            self.keep_logs = True
        self._children = []
        if self.socket_dir != Path() and self.socket_dir.exists():
            if self.keep_logs:
                self._keep_only_logs()
            else:
                shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _keep_only_logs(self) -> None:
        """Remove all but the children's logs from the run's folder, and say where they are."""
        for path in self.socket_dir.iterdir():
            if path.suffix != ".log":
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self.logs_kept = self.socket_dir
        logger.warning("the run failed; its logs are kept in %s (sidecar.log or sidecar-<node>.log, "
                       "fn-<function>-<n>.log)", self.socket_dir)

    def client_instructions(self, function: str = CLIENT_FUNCTION) -> str:
        """How a process of one's own reaches this run's data: the sidecar's socket and the identity.

        The sidecar keeps each workflow's objects apart, and a bare ``faastube.connect()``
        claims the default identity (function ``anonymous`` of workflow ``default/local``),
        which may not touch this workflow's refs. In local mode any function name is
        accepted; the workflow must be this one's.
        """
        socket, name = self.sidecar_socket, self.workflow.name
        where = (f" (node {self.nodes[0].name}'s; a get there reads any node's refs)" if self.nodes else "")
        return (f"sidecar socket: {socket}{where}\n"
                f"  clients connect as a function of workflow {name!r}:\n"
                f"    faastube.connect({socket!r}, workflow={name!r}, function={function!r})\n"
                f"  or with FAASTUBE_SOCKET={socket} FAASTUBE_WORKFLOW={name} "
                f"FAASTUBE_FUNCTION={function} set, faastube.connect()")

    def child_logs(self) -> dict[str, str]:
        return {c.name: c.log_path.read_text(errors="replace") for c in self._children if c.log_path.exists()}


def _stop_children(children: list[_Child]) -> bool:
    """Stop them (SIGTERM, then SIGKILL); whether every one ended normally."""
    clean = True
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it", child.name, STOP_TIMEOUT_S)
            child.process.kill()
            child.process.wait()
        if child.process.returncode not in (0, -signal.SIGTERM):
            clean = False
            logger.warning("%s exited with status %s; its log ends:\n%s", child.name, child.process.returncode,
                           _log_tail(child.log_path))
    return clean


def _log_tail(path: Path, limit_chars: int = 3000) -> str:
    """The last whole lines of a log, at most about ``limit_chars`` (never cut mid-line)."""
    if not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    kept: list[str] = []
    total = 0
    for line in reversed(lines):
        if kept and total + len(line) + 1 > limit_chars:
            break
        kept.append(line)
        total += len(line) + 1
    return "\n".join(reversed(kept))
