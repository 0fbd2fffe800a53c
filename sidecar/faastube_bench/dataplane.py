"""`faastube bench dataplane`: one pass of an array between two function processes, timed whole.

A pass starts when the producer starts publishing and ends when the consumer's data
is usable (its stream synchronized); the ref travels between the two processes over
a multiprocessing pipe. Every method uses that same pipe, so each can be set
against the pipe alone (the floor) and against the baselines measured in the same
run (torch CUDA IPC, host-centric passing, an in-process raw copy). The passes
themselves are in `dataplane_passes`; the statistics, targets, table and plots in
`dataplane_report`; this module starts the sidecar and the processes and decides
what runs.

Patterns: same-gpu (GPU 0 -> GPU 0), gpu-gpu (GPU 0 -> GPU 1, with 2+ GPUs), host
(CPU functions, the host pool). Methods: tube-put, tube-seal, torch-ipc,
host-centric, floor, raw-copy, ping; and passes/s of 1, 4, 8 concurrent pairs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import multiprocessing as mp
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from faastube_spec import units

from faastube_bench import dataplane_passes as passes
from faastube_bench import dataplane_report as report
from faastube_bench import sidecars
from faastube_bench.dataplane_report import Cell, Concurrency, Measurements, Summary

logger = logging.getLogger(__name__)

KiB, MiB, GiB = report.KiB, report.MiB, report.GiB
DEFAULT_SIZES = (64 * KiB, MiB, 16 * MiB, 128 * MiB, GiB)
DEFAULT_PAIRS = (1, 4, 8)
CONCURRENCY_SIZE = MiB
ROTATE_BYTES = 256 * MiB        # rotate buffers until they span this much: far beyond any GPU's L2
CELL_TIMEOUT_S = 240.0

TIMING = {
    "clock": "CLOCK_MONOTONIC, shared by all processes of the machine",
    "pass": "producer starts publishing (t0) -> consumer's data usable, its stream synchronized (t_end)",
    "put": "t0 -> the producer's message is ready to send (before the pipe)",
    "get": "the message arrived -> data usable (after the pipe)",
    "untimed": "marking the next source buffer and syncing before t0; reading the markers back, release and "
               "the ack after t_end; one pass in flight per pair",
    report.TUBE_PUT: "t0, put(array, consumers=1) (alloc, copy on the producer's GPU, seal), send ref | "
                            "recv, get(ref, device), sync the consumer's current stream, t_end",
    report.TUBE_SEAL: "t0, empty(), 3 marker bytes written (standing for the producer's own kernel), seal, send ref "
                      "| recv, get, sync, t_end",
    report.TORCH_IPC: "t0, clone(), send the tensor (torch.multiprocessing CUDA IPC pickling) | recv (opens the "
                      "IPC handle, orders the stream after the producer's event), .to(consumer GPU) if another "
                      "GPU, sync, t_end; put/get are not split (the work is inside the pipe's pickling)",
    report.HOST_CENTRIC: "t0, D2H into a pageable buffer, memcpy into a shared-memory slot (2 slots, created and "
                         "faulted in before timing), send its name | recv, pageable H2D straight from the slot into "
                         "the consumer's buffer, sync, t_end (host pattern: memcpy in, memcpy out)",
    report.FLOOR: "t0, send a ref-sized message | recv, t_end",
    report.RAW_COPY: "one process: wall time of one copy including its stream sync (same GPU: cudaMemcpyAsync D2D; "
                     "GPU to GPU: cudaMemcpyPeerAsync with peer access on; host: np.copyto), CUDA events as 'gpu'",
    report.PING: "one client.ping() round trip, wall time in the consumer process",
    "concurrency": "N pairs on one GPU (host on the host backend), each looping put -> pipe -> get -> sync -> "
                   "release -> ack for a fixed window; passes acked inside the window / window; markers checked "
                   "every 8th pass; sidecar CPU from /proc/<pid>/stat over the same window",
}


@dataclass(frozen=True)
class Config:
    backend: str                        # "cuda" | "host"
    patterns: tuple[str, ...]
    methods: tuple[str, ...]
    sizes: tuple[int, ...]
    pairs: tuple[int, ...]
    warmup: int
    max_passes: int
    min_passes: int
    cell_budget_s: float
    floor_passes: int
    pings: int
    loop_s: float
    spin_us: float
    sidecar_spin_us: float
    loop: str                           # the sidecar's event loop
    quick: bool
    concurrency_pattern: str = ""       # "" : same-gpu on the cuda backend, host on the host backend


def config_from_args(args: argparse.Namespace, *, gpus: int) -> Config:
    backend = args.backend if args.backend != "auto" else ("cuda" if gpus else "host")
    if backend == "cuda" and gpus == 0:
        raise ValueError("--backend cuda: no GPU is visible here (CuPy sees none); use --backend host")
    if args.patterns:
        patterns = tuple(args.patterns)
    elif backend == "cuda":
        patterns = (report.SAME_GPU, report.GPU_GPU, report.HOST) if gpus >= 2 else (report.SAME_GPU, report.HOST)
    else:
        patterns = (report.HOST,)
    if backend == "host" and any(p != report.HOST for p in patterns):
        raise ValueError("--backend host runs only the host pattern")
    sizes = tuple(sorted(set(args.sizes))) if args.sizes else DEFAULT_SIZES
    quick = bool(args.quick)
    return Config(
        backend=backend, patterns=patterns, methods=tuple(args.methods or report.METHODS), sizes=sizes,
        pairs=tuple(sorted({p for p in (args.pairs if args.pairs is not None else DEFAULT_PAIRS) if p > 0})),
        warmup=args.warmup if args.warmup is not None else (2 if quick else 3),
        max_passes=args.iterations if args.iterations is not None else (40 if quick else 300),
        min_passes=5 if quick else 10, cell_budget_s=0.25 if quick else 1.0,
        floor_passes=200 if quick else 1000, pings=300 if quick else 2000, loop_s=1.0 if quick else 3.0,
        spin_us=args.spin_us, sidecar_spin_us=args.sidecar_spin_us, loop=args.loop, quick=quick,
        concurrency_pattern=getattr(args, "concurrency_pattern", None) or "")


def rotation(size_bytes: int) -> int:
    """How many buffers a cell uses in turn: enough to span ROTATE_BYTES, 2 to 64."""
    return max(2, min(64, math.ceil(ROTATE_BYTES / max(1, size_bytes))))


def devices(pattern: str) -> tuple[int | None, int | None]:
    """(producer's, consumer's) CUDA ordinal; None: a CPU function."""
    return {report.SAME_GPU: (0, 0), report.GPU_GPU: (0, 1), report.HOST: (None, None)}[pattern]


def methods_for(pattern: str, cfg: Config, *, torch: bool) -> tuple[list[str], list[str]]:
    """The per-size methods this pattern runs, and why the others are skipped."""
    run: list[str] = []
    skipped: list[str] = []
    for method in (report.TUBE_PUT, report.TUBE_SEAL, report.TORCH_IPC, report.HOST_CENTRIC, report.RAW_COPY):
        if method not in cfg.methods:
            continue
        if method == report.TORCH_IPC and pattern == report.HOST:
            continue                                  # CUDA IPC: GPU patterns only
        if method == report.TORCH_IPC and not torch:
            skipped.append(f"{pattern} {method}: torch is not installed")
            continue
        run.append(method)
    return run, skipped


# --- processes ----------------------------------------------------------------------------------

class WorkerError(RuntimeError):
    """A function process reported an error: that cell is lost, the process goes on."""


class WorkerLost(WorkerError):
    """A function process died or did not answer in time: its pair can't be trusted any more."""


class Worker:
    def __init__(self, ctx: Any, spec: passes.WorkerSpec, peer: Any) -> None:
        self.spec = spec
        self.control, child = ctx.Pipe()
        self.proc = ctx.Process(target=passes.serve, args=(child, peer, spec), daemon=True,
                                name=f"ftb-{spec.role}-{spec.index}")
        self.proc.start()
        child.close()

    def send(self, cmd: str, arg: Any = None) -> None:
        self.control.send((cmd, arg))

    def reply(self, timeout_s: float) -> Any:
        if not self.control.poll(timeout_s):
            raise WorkerLost(f"{self.proc.name} did not answer within {timeout_s:.0f} s")
        try:
            status, payload = self.control.recv()
        except EOFError as e:
            raise WorkerLost(f"{self.proc.name} exited (code {self.proc.exitcode})") from e
        if status == "error":
            raise WorkerError(f"{self.proc.name}: {payload}")
        return payload

    def call(self, cmd: str, arg: Any = None, timeout_s: float = CELL_TIMEOUT_S) -> Any:
        self.send(cmd, arg)
        return self.reply(timeout_s)

    def stop(self) -> None:
        try:
            self.control.send(("stop", None))
        except OSError:
            pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class Pair:
    """A producer and a consumer process, linked by the pipe every method's message takes."""

    def __init__(self, ctx: Any, socket_path: str, pattern: str, index: int, spin_us: float) -> None:
        prod_dev, cons_dev = devices(pattern)
        a, b = ctx.Pipe(duplex=True)
        self.producer = Worker(ctx, passes.WorkerSpec("producer", index, prod_dev, socket_path, spin_us), a)
        self.consumer = Worker(ctx, passes.WorkerSpec("consumer", index, cons_dev, socket_path, spin_us), b)
        a.close()
        b.close()

    def ready(self, timeout_s: float = 180.0) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.producer.reply(timeout_s), self.consumer.reply(timeout_s)

    def both(self, cmd: str, arg: Any, timeout_s: float = CELL_TIMEOUT_S) -> tuple[Any, Any]:
        self.producer.send(cmd, arg)
        self.consumer.send(cmd, arg)
        errors: list[WorkerError] = []
        out: list[Any] = []
        for w in (self.producer, self.consumer):
            try:
                out.append(w.reply(timeout_s))
            except WorkerError as e:
                errors.append(e)
                out.append(None)
        if errors:
            kind = WorkerLost if any(isinstance(e, WorkerLost) for e in errors) else WorkerError
            raise kind("; ".join(map(str, errors)))
        return out[0], out[1]

    def stop(self) -> None:
        self.producer.stop()
        self.consumer.stop()


def start_sidecar(socket_path: str, backend: str, loop: str = "auto", spin_us: float = 0.0) -> subprocess.Popen[bytes]:
    proc = sidecars.start(socket_path, ["--gpu-slab", "1Gi", "--host-slab", "256Mi", "--host-pool-max", "8Gi",
                                        "--loop", loop, "--spin-us", str(spin_us)], backend=backend)
    sidecars.wait_ready(proc, socket_path, timeout_s=120)
    return proc


def stop_sidecar(proc: subprocess.Popen[bytes]) -> None:
    sidecars.stop(proc, timeout_s=20)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --- measuring --------------------------------------------------------------------------------

def cell_from(plan: passes.CellPlan, prod: dict[str, Any], cons: dict[str, Any]) -> Cell:
    """The timed passes (after warm-up) of one cell, from both sides' timestamps."""
    err = prod.get("error") or cons.get("error")
    if err:
        raise WorkerError(err)
    t0, sent, recv, end = prod["t0"], prod["t_sent"], cons["t_recv"], cons["t_end"]
    if not (len(t0) == len(sent) == len(recv) == len(end)):
        raise WorkerError(f"{plan.method}: producer and consumer disagree on the passes "
                          f"({len(t0)} vs {len(end)})")
    w = plan.warmup
    if len(t0) <= w:
        raise WorkerError(f"{plan.method}: no timed pass")
    split = plan.method not in (report.TORCH_IPC, report.FLOOR)
    return Cell(plan.pattern, plan.method, plan.size_bytes,
                Summary.of_seconds([(e - s) / 1e9 for s, e in zip(t0[w:], end[w:])]),
                Summary.of_seconds([(e - s) / 1e9 for s, e in zip(t0[w:], sent[w:])]) if split else None,
                Summary.of_seconds([(e - s) / 1e9 for s, e in zip(recv[w:], end[w:])]) if split else None,
                bad_passes=int(cons["bad"]), warmup=w)


class Run:
    """One benchmark run: a sidecar, then pairs of function processes per pattern."""

    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.cells: list[Cell] = []
        self.ping: Summary | None = None
        self.concurrency: list[Concurrency] = []
        self.skipped: list[str] = []
        self.workers_info: list[dict[str, Any]] = []
        self.sidecar_after: dict[str, Any] = {}
        self.torch = importlib.util.find_spec("torch") is not None
        self._ctx = mp.get_context("spawn")

    def execute(self) -> None:
        tmp = tempfile.mkdtemp(prefix="ftb-")
        self.socket_path = os.path.join(tmp, "faastube.sock")
        self.sidecar = start_sidecar(self.socket_path, self.cfg.backend, self.cfg.loop, self.cfg.sidecar_spin_us)
        try:
            for pattern in self.cfg.patterns:
                self._pattern(pattern)
            if self.cfg.pairs:
                self._concurrency(self.cfg.concurrency_pattern
                                  or (report.SAME_GPU if self.cfg.backend == "cuda" else report.HOST))
        finally:
            stop_sidecar(self.sidecar)
            shutil.rmtree(tmp, ignore_errors=True)

    def _plan(self, pattern: str, method: str, size: int) -> passes.CellPlan:
        c = self.cfg
        if method == report.FLOOR:
            return passes.CellPlan(pattern, method, 0, max(c.warmup, 10), c.floor_passes, c.floor_passes,
                                   c.cell_budget_s, 1)
        src, dst = devices(pattern)
        return passes.CellPlan(pattern, method, size, c.warmup, c.max_passes, c.min_passes, c.cell_budget_s,
                               rotation(size), src, dst)

    def _pattern(self, pattern: str) -> None:
        log = self.log
        methods, skipped = methods_for(pattern, self.cfg, torch=self.torch)
        for s in skipped:
            log(f"  skipped: {s}")
        self.skipped.extend(skipped)
        log(f"{pattern}: starting a producer and a consumer process")
        pair = Pair(self._ctx, self.socket_path, pattern, 0, self.cfg.spin_us)
        try:
            infos = pair.ready()
            self.workers_info.extend(infos)
            if report.FLOOR in self.cfg.methods:
                self._cell(pair, self._plan(pattern, report.FLOOR, 0))
            if report.PING in self.cfg.methods and self.ping is None:
                times = pair.consumer.call("ping", (max(50, self.cfg.pings // 10), self.cfg.pings))
                self.ping = Summary.of_seconds(times)
                log(f"  {pattern:8s}        ping         median {self.ping.median_us:9.1f} us  "
                    f"p99 {self.ping.p99_us:9.1f} us")
            for size in self.cfg.sizes:
                for method in methods:
                    self._cell(pair, self._plan(pattern, method, size))
            self.sidecar_after[pattern] = pair.consumer.call("stats", None, 30)
        except WorkerError as e:
            # A process that hung or died: the rest of this pattern can't be trusted to it.
            log(f"  {pattern}: giving up on this pattern: {e}")
            self.skipped.append(f"{pattern}: {e}")
        finally:
            pair.stop()

    def _cell(self, pair: Pair, plan: passes.CellPlan) -> None:
        label = f"  {plan.pattern:8s} {report.size_label(plan.size_bytes) if plan.size_bytes else '':>5s}  " \
                f"{plan.method:12s}"
        try:
            if plan.method == report.RAW_COPY:
                raw = pair.consumer.call("raw", plan)
                cell = Cell(plan.pattern, plan.method, plan.size_bytes, Summary.of_seconds(raw["wall_s"]),
                            gpu=Summary.of_seconds(raw["gpu_s"]) if raw["gpu_s"] else None,
                            bad_passes=int(raw["bad"]), warmup=plan.warmup, note=raw["note"])
            else:
                prod, cons = pair.both("cell", plan)
                cell = cell_from(plan, prod, cons)
        except WorkerLost:
            raise
        except WorkerError as e:
            self.log(f"{label} FAILED: {str(e).splitlines()[0]}")
            self.skipped.append(f"{plan.pattern} {plan.method} {plan.size_bytes}: {e}")
            return
        self.cells.append(cell)
        extra = f"  {cell.effective_gbps:7.1f} GB/s" if plan.size_bytes else ""
        if cell.put is not None and cell.get is not None:
            extra += f"  (put {cell.put.median_us:.1f}, get {cell.get.median_us:.1f} us)"
        bad = f"  {cell.bad_passes} BAD PASSES" if cell.bad_passes else ""
        self.log(f"{label} median {cell.passes.median_us:9.1f} us  p99 {cell.passes.p99_us:9.1f} us  "
                 f"n={cell.passes.n}{extra}{bad}")

    def _concurrency(self, pattern: str) -> None:
        cfg = self.cfg
        plan = passes.LoopPlan(CONCURRENCY_SIZE, warmup=max(cfg.warmup, 20), rotate=4, check_every=8)
        for n in cfg.pairs:
            self.log(f"concurrency: {n} pair(s) on {pattern}, {report.size_label(plan.size_bytes)}B, "
                     f"{cfg.loop_s:.0f} s")
            pairs = [Pair(self._ctx, self.socket_path, pattern, i + 1, cfg.spin_us) for i in range(n)]
            try:
                for p in pairs:
                    p.ready()
                for p in pairs:
                    p.producer.send("loop-warm", plan)
                    p.consumer.send("loop-warm", plan)
                for p in pairs:
                    p.producer.reply(CELL_TIMEOUT_S)
                    p.consumer.reply(CELL_TIMEOUT_S)
                start_ns = passes.now_ns() + 300_000_000
                end_ns = start_ns + int(cfg.loop_s * 1e9)
                for p in pairs:
                    p.producer.send("loop-run", (start_ns, end_ns))
                    p.consumer.send("loop-run", (start_ns, end_ns))
                time.sleep(max(0.0, (start_ns - passes.now_ns()) / 1e9))
                cpu0, wall0 = cpu_seconds(self.sidecar.pid), passes.now_ns()
                time.sleep(max(0.0, (end_ns - passes.now_ns()) / 1e9))
                cpu1, wall1 = cpu_seconds(self.sidecar.pid), passes.now_ns()
                total = bad = 0
                errors = []
                for p in pairs:
                    prod = p.producer.reply(CELL_TIMEOUT_S)
                    cons = p.consumer.reply(CELL_TIMEOUT_S)
                    total += prod["passes"]
                    bad += cons["bad"]
                    errors += [e for e in (prod["error"], cons["error"]) if e]
                if errors:
                    raise WorkerError(errors[0])
                cpu = None if cpu0 is None or cpu1 is None else 100.0 * (cpu1 - cpu0) / ((wall1 - wall0) / 1e9)
                c = Concurrency(pattern, n, plan.size_bytes, (end_ns - start_ns) / 1e9, total, bad, cpu)
                self.concurrency.append(c)
                self.log(f"  {n} pair(s): {c.passes_per_s:,.0f} passes/s" +
                         ("" if cpu is None else f", sidecar CPU {cpu:.0f}%") + (f", {bad} BAD" if bad else ""))
            except WorkerError as e:
                self.log(f"  {n} pair(s) FAILED: {str(e).splitlines()[0]}")
                self.skipped.append(f"concurrency {n} pairs: {e}")
            finally:
                for p in pairs:
                    p.stop()

    def measurements(self) -> Measurements:
        return Measurements(tuple(self.cells), self.ping, tuple(self.concurrency))


# --- the report's context -----------------------------------------------------------------------

def gpu_count() -> int:
    if importlib.util.find_spec("cupy") is None:
        return 0
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - CuPy without a driver or a GPU: none
        return 0


def nvidia_smi() -> list[dict[str, str]]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append(dict(zip(("index", "name", "driver", "memory"), parts)))
    return rows


def card_name(smi: Sequence[dict[str, str]], workers: Sequence[dict[str, Any]]) -> str:
    names = [r["name"] for r in smi] or sorted({w["device_name"] for w in workers if "device_name" in w})
    if not names:
        return "no GPU (host backend)"
    return f"{len(smi)}x {names[0]}" if smi else names[0]


def versions(workers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("faastube", "numpy", "cupy-cuda13x", "cupy-cuda12x", "torch", "cuda-core", "matplotlib", "uvloop"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = next((w for w in workers if "cuda_runtime" in w), None)
    if gpu is not None:
        out.update(cupy=gpu["cupy"], cuda_runtime=gpu["cuda_runtime"], cuda_driver=gpu["cuda_driver"])
    try:
        here = pathlib.Path(__file__).resolve().parent
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def build_report(cfg: Config, m: Measurements, *, card: str, gpus: int, smi: Sequence[dict[str, str]],
                 workers: Sequence[dict[str, Any]], skipped: Sequence[str], sidecar_after: dict[str, Any],
                 wall_s: float) -> dict[str, Any]:
    return {
        "benchmark": "faastube bench dataplane", "schema": 2, "card": card, "gpus": gpus, "nvidia_smi": list(smi),
        "device_names": sorted({w["device_name"] for w in workers if "device_name" in w}),
        "backend": cfg.backend, "versions": versions(workers), "config": asdict(cfg), "timing": TIMING,
        **m.to_dict(),
        "ratios": [asdict(r) for r in report.ratios(m)],
        "targets": [asdict(t) for t in report.targets(m, gpus=gpus)],
        "skipped": list(skipped), "sidecar_after": sidecar_after, "wall_s": round(wall_s, 1),
    }


def output_suffix(backend: str, tag: str) -> str:
    return ("-host" if backend == "host" else "") + (f"-{tag}" if tag else "")


# --- CLI ----------------------------------------------------------------------------------------

def _size(text: str) -> int:
    try:
        n = units.parse_size(text)
    except units.UnitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 0 < n <= 4 * GiB:
        raise argparse.ArgumentTypeError(f"a size between 1 byte and 4Gi, got {text!r}")
    return n


def _nonneg_int(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _spin(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 10_000:
        raise argparse.ArgumentTypeError(f"must be in 0..10000 us, got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto",
                        help="the sidecar's backend (auto: cuda when CuPy sees a GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer passes per cell, shorter loops")
    parser.add_argument("--sizes", type=_size, nargs="+", metavar="SIZE",
                        help="object sizes (default 64Ki 1Mi 16Mi 128Mi 1Gi)")
    parser.add_argument("--patterns", nargs="+", choices=report.PATTERNS,
                        help="default: same-gpu, gpu-gpu (2+ GPUs), host; host only on the host backend")
    parser.add_argument("--methods", nargs="+", choices=report.METHODS, help="default: all")
    parser.add_argument("--pairs", type=_nonneg_int, nargs="*", metavar="N",
                        help="concurrent pairs at 1 MiB (default 1 4 8; none or 0: skip)")
    parser.add_argument("--concurrency-pattern", choices=(report.SAME_GPU, report.HOST),
                        help="where the concurrent pairs pass data (default: same-gpu on a GPU; host shows what "
                             "the sidecar alone sustains, with no GPU contexts to time-slice)")
    parser.add_argument("--iterations", type=_nonneg_int, metavar="N",
                        help="timed passes per cell at most (default 300, --quick 40)")
    parser.add_argument("--warmup", type=_nonneg_int, metavar="N", help="untimed passes first (default 3)")
    parser.add_argument("--spin-us", type=_spin, default=0.0,
                        help="function processes busy-poll this long for each sidecar reply")
    parser.add_argument("--sidecar-spin-us", type=_spin, default=0.0,
                        help="the sidecar busy-polls this long before sleeping")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the sidecar's event loop")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"),
                        help="directory for dataplane[-host][-TAG].json and the PNGs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot-only", type=pathlib.Path, metavar="JSON",
                        help="redraw the plots and reprint targets and table from a saved JSON; run nothing")


def _print_summary(m: Measurements, *, gpus: int, card: str) -> None:
    for t in report.targets(m, gpus=gpus):
        print(t.line())
    print(report.format_table(m, card=card))


def run(args: argparse.Namespace) -> int:
    if args.plot_only is not None:
        try:
            data = json.loads(args.plot_only.read_text())
        except (OSError, ValueError) as e:
            print(f"faastube bench dataplane: --plot-only: cannot read {args.plot_only}: {e}")
            return 2
        m = Measurements.from_dict(data)
        out = args.out if args.out != pathlib.Path("bench/results") else args.plot_only.parent
        out.mkdir(parents=True, exist_ok=True)
        suffix = output_suffix(data.get("backend", ""), args.tag)
        written = report.plot(m, out, suffix=suffix, title=str(data.get("card", "")))
        print("wrote " + (", ".join(map(str, written)) or "nothing (matplotlib missing)"))
        _print_summary(m, gpus=int(data.get("gpus", 0)), card=str(data.get("card", "")))
        return 0
    if args.iterations == 0:
        print("faastube bench dataplane: --iterations must be >= 1")
        return 2
    gpus = 0 if args.backend == "host" else gpu_count()
    try:
        cfg = config_from_args(args, gpus=gpus)
    except ValueError as e:
        print(f"faastube bench dataplane: {e}")
        return 2
    if cfg.backend == "cuda" and gpus < 2 and report.GPU_GPU in cfg.patterns:
        print("  skipped: gpu-gpu needs 2 GPUs")
        cfg = replace(cfg, patterns=tuple(p for p in cfg.patterns if p != report.GPU_GPU))
    t_start = time.monotonic()
    print(f"faastube bench dataplane: backend {cfg.backend}, {gpus} GPU(s), patterns {' '.join(cfg.patterns)}, "
          f"sizes {' '.join(report.size_label(s) for s in cfg.sizes)}")
    bench = Run(cfg, log=lambda line: print(line, flush=True))
    bench.execute()
    m = bench.measurements()
    smi = nvidia_smi() if cfg.backend == "cuda" else []
    card = card_name(smi, bench.workers_info)
    data = build_report(cfg, m, card=card, gpus=gpus, smi=smi, workers=bench.workers_info,
                        skipped=bench.skipped, sidecar_after=bench.sidecar_after,
                        wall_s=time.monotonic() - t_start)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = output_suffix(cfg.backend, args.tag)
    path = args.out / f"dataplane{suffix}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    written = [] if args.no_plot else report.plot(m, args.out, suffix=suffix, title=card)
    print("wrote " + ", ".join(str(p) for p in (path, *written)))
    print(f"({data['wall_s']:.0f} s)")
    _print_summary(m, gpus=gpus, card=card)
    return 0
