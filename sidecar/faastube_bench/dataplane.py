"""Data-plane benchmark: put+get between two function processes, against baselines.

Patterns (who produces, who consumes):
  same-gpu   GPU 0 -> GPU 0 (zero copy)
  gpu-gpu    GPU 0 -> GPU 1 (peer copy by the sidecar, NVLink)
  host-gpu   CPU process -> GPU 0 (pinned host pool, H2D by the sidecar)
  host-host  CPU -> CPU (shared memory; the only pattern without a GPU)

Baselines, measured in the same run:
  host-centric  device -> pageable host -> shared memory -> pageable host -> device,
                across two processes, as serverless platforms pass data today
  raw-cupy      one process, one CuPy/CUDA copy (the ceiling; no IPC, no metadata)

Each producer/consumer is a real process with its own CUDA context talking to a
real sidecar process. Only the put and the get are timed; the pipe hops that
hand the ref from producer to consumer are not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MB = 1_000_000
DEFAULT_SIZES_MB = (1, 10, 100)


@dataclass(frozen=True)
class Result:
    pattern: str
    method: str            # tube | host-centric | raw-cupy
    size_bytes: int
    put_us: float          # median
    get_us: float          # median
    total_us: float        # median of put+get per iteration
    total_p99_us: float
    gbps: float            # size / median total, GB/s (10^9)
    path: str
    iterations: int


# --- worker processes -------------------------------------------------------------------------

def _worker(conn: Any, socket_path: str, role: str, device: int | None) -> None:
    """A function process: executes commands from the driver, reports timings."""
    import faastube.client as ftc

    cp = None
    if device is not None:
        import cupy as cp

        cp.cuda.Device(device).use()
    client = ftc.connect(socket_path, workflow="bench", function=role)
    shm_cache: dict[str, Any] = {}
    data = None
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            if cmd == "prepare":
                (size,) = args
                rng = np.random.default_rng(size)
                host = rng.integers(0, 255, size, dtype=np.uint8)
                data = cp.asarray(host) if cp is not None else host
                if cp is not None:
                    cp.cuda.Device().synchronize()
                conn.send(("ok", int(host[:64].sum())))
            elif cmd == "put":
                t0 = time.perf_counter()
                ref = client.put(data, consumers=1)
                conn.send((ref, time.perf_counter() - t0))
            elif cmd == "get":
                (ref,) = args
                loc = "cpu" if device is None else device
                t0 = time.perf_counter()
                view = client.get(ref, device=loc)
                if cp is not None:
                    cp.cuda.Device().synchronize()
                dt = time.perf_counter() - t0
                check = int(view[:64].sum())
                path = client.last_path
                del view
                client.release(ref)
                conn.send((dt, check, path))
            elif cmd == "get-again":
                # Same-GPU get of an object that already exists: the zero-copy fast path.
                (ref, n) = args
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    view = client.get(ref, device=0 if device is not None else "cpu")
                    times.append(time.perf_counter() - t0)
                    del view
                    client.release(ref)
                conn.send(times)
            elif cmd == "put-keep":
                ref = client.put(data)
                conn.send(ref)
            elif cmd == "free":
                client.free(args[0])
                conn.send("ok")
            elif cmd == "ping":
                (n,) = args
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    client.ping()
                    times.append(time.perf_counter() - t0)
                conn.send(times)
            elif cmd == "hc-put":
                # Host-centric producer: device -> pageable host -> shared memory.
                from multiprocessing import shared_memory

                t0 = time.perf_counter()
                host = cp.asnumpy(data) if cp is not None else np.asarray(data)
                shm = shm_cache.get("out")
                if shm is None or shm.size < host.nbytes:
                    shm = shared_memory.SharedMemory(create=True, size=host.nbytes)
                    shm_cache["out"] = shm
                np.frombuffer(shm.buf, np.uint8, host.nbytes)[:] = host
                conn.send((shm.name, time.perf_counter() - t0))
            elif cmd == "hc-get":
                from multiprocessing import shared_memory

                (name, size) = args
                t0 = time.perf_counter()
                shm = shm_cache.get(name) or shared_memory.SharedMemory(name=name)
                shm_cache[name] = shm
                host = np.array(np.frombuffer(shm.buf, np.uint8, size))   # copy out of the store
                out = cp.asarray(host) if cp is not None else host         # pageable H2D
                if cp is not None:
                    cp.cuda.Device().synchronize()
                dt = time.perf_counter() - t0
                conn.send((dt, int(out[:64].sum()), "pageable"))
            else:
                conn.send(("error", f"unknown command {cmd}"))
    finally:
        for shm in shm_cache.values():
            shm.close()
        out = shm_cache.get("out")
        if out is not None:
            out.unlink()
        client.close()


class Worker:
    def __init__(self, ctx: Any, socket_path: str, role: str, device: int | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, socket_path, role, device), daemon=True)
        self.proc.start()

    def call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(300):
            raise TimeoutError(f"worker did not answer {cmd[0]}")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# --- measurements -----------------------------------------------------------------------------

def _summarise(pattern: str, method: str, size: int, puts: list[float], gets: list[float], path: str) -> Result:
    totals = [p + g for p, g in zip(puts, gets)]
    med = statistics.median(totals)
    return Result(pattern, method, size, statistics.median(puts) * 1e6, statistics.median(gets) * 1e6,
                  med * 1e6, float(np.percentile(totals, 99)) * 1e6, size / med / 1e9, path, len(totals))


def measure_tube(producer: Worker, consumer: Worker, pattern: str, size: int, iters: int, warmup: int) -> Result:
    producer.call("prepare", size)
    puts, gets, path = [], [], "?"
    for i in range(warmup + iters):
        ref, t_put = producer.call("put")
        t_get, _check, path = consumer.call("get", ref)
        if i >= warmup:
            puts.append(t_put)
            gets.append(t_get)
    return _summarise(pattern, "tube", size, puts, gets, path)


def measure_host_centric(producer: Worker, consumer: Worker, pattern: str, size: int, iters: int,
                         warmup: int) -> Result:
    producer.call("prepare", size)
    puts, gets = [], []
    for i in range(warmup + iters):
        name, t_put = producer.call("hc-put")
        t_get, _check, _path = consumer.call("hc-get", name, size)
        if i >= warmup:
            puts.append(t_put)
            gets.append(t_get)
    return _summarise(pattern, "host-centric", size, puts, gets, "pageable+shm")


def measure_raw_cupy(pattern: str, size: int, iters: int, warmup: int) -> Result:
    import cupy as cp

    rt = cp.cuda.runtime
    times = []
    if pattern == "host-gpu":
        with cp.cuda.Device(0):
            src = cp.cuda.alloc_pinned_memory(size)
            dst = cp.empty(size, cp.uint8)
            stream = cp.cuda.Stream(non_blocking=True)
            for i in range(warmup + iters):
                t0 = time.perf_counter()
                rt.memcpyAsync(dst.data.ptr, src.ptr, size, rt.memcpyHostToDevice, stream.ptr)
                stream.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        path = "h2d-pinned"
    else:
        dst_dev = 1 if pattern == "gpu-gpu" else 0
        if dst_dev != 0:
            # The ceiling is the direct NVLink copy: without peer access CUDA stages through the host.
            for a, b in ((0, dst_dev), (dst_dev, 0)):
                with cp.cuda.Device(a):
                    try:
                        rt.deviceEnablePeerAccess(b)
                    except rt.CUDARuntimeError:
                        pass   # already enabled
        with cp.cuda.Device(0):
            src = cp.ones(size, cp.uint8)
        with cp.cuda.Device(dst_dev):
            dst = cp.empty(size, cp.uint8)
            stream = cp.cuda.Stream(non_blocking=True)
            for i in range(warmup + iters):
                t0 = time.perf_counter()
                if dst_dev == 0:
                    rt.memcpyAsync(dst.data.ptr, src.data.ptr, size, rt.memcpyDeviceToDevice, stream.ptr)
                else:
                    rt.memcpyPeerAsync(dst.data.ptr, dst_dev, src.data.ptr, 0, size, stream.ptr)
                stream.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        path = "d2d" if dst_dev == 0 else "peer"
    return _summarise(pattern, "raw-cupy", size, [0.0] * len(times), times, path)


# --- driver -----------------------------------------------------------------------------------

def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        if names:
            return f"{len(names)}x {names[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return "no GPU (host backend)"


def gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy or no driver
        return 0


def start_sidecar(socket_path: str, backend: str, loop: str = "auto", spin_us: float = 0.0) -> subprocess.Popen[bytes]:
    import socket as socketlib

    cmd = [sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar", "--socket", socket_path,
           "--backend", backend, "--gpu-slab", "1Gi", "--host-slab", "256Mi", "--host-pool-max", "8Gi",
           "--loop", loop, "--spin-us", str(spin_us)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}")
        probe = socketlib.socket(socketlib.AF_UNIX)
        try:
            probe.connect(socket_path)
            return proc
        except OSError:
            time.sleep(0.1)
        finally:
            probe.close()
    proc.kill()
    raise RuntimeError("sidecar did not start")


def run_benchmark(*, sizes: list[int], iters: int, warmup: int, baselines: bool,
                  patterns: list[str] | None = None, log: Any = print, loop: str = "auto",
                  spin_us: float = 0.0, sidecar_spin_us: float = 0.0) -> dict[str, Any]:
    gpus = gpu_count()
    backend = "cuda" if gpus else "host"
    if patterns is None:
        patterns = ["same-gpu", "gpu-gpu", "host-gpu"] if gpus >= 2 else (["same-gpu", "host-gpu"] if gpus else
                                                                            ["host-host"])
    tmp = tempfile.mkdtemp(prefix="ftb-")
    socket_path = os.path.join(tmp, "faastube.sock")
    sidecar = start_sidecar(socket_path, backend, loop, sidecar_spin_us)
    ctx = mp.get_context("spawn")
    os.environ["FAASTUBE_SPIN_US"] = str(spin_us)    # inherited by the spawned function processes
    results: list[Result] = []
    extra: dict[str, Any] = {}
    try:
        devices = {"same-gpu": (0, 0), "gpu-gpu": (0, 1), "host-gpu": (None, 0), "host-host": (None, None)}
        for pattern in patterns:
            prod_dev, cons_dev = devices[pattern]
            producer = Worker(ctx, socket_path, "producer", prod_dev)
            consumer = Worker(ctx, socket_path, "consumer", cons_dev)
            try:
                for size in sizes:
                    r = measure_tube(producer, consumer, pattern, size, iters, warmup)
                    results.append(r)
                    log(f"  {pattern:9s} {size / MB:6.0f} MB tube          {r.total_us:10.1f} us  ({r.path})")
                    if baselines and (gpus or pattern == "host-host"):
                        r = measure_host_centric(producer, consumer, pattern, size, max(5, iters // 2),
                                                 min(warmup, 2))
                        results.append(r)
                        log(f"  {pattern:9s} {size / MB:6.0f} MB host-centric  {r.total_us:10.1f} us")
                    if baselines and gpus:
                        r = measure_raw_cupy(pattern, size, iters, warmup)
                        results.append(r)
                        log(f"  {pattern:9s} {size / MB:6.0f} MB raw-cupy      {r.total_us:10.1f} us")
                if pattern in ("same-gpu", "host-host"):
                    # Zero-copy get of an existing object, and a metadata-only round trip.
                    for size in sizes:
                        producer.call("prepare", size)
                        ref = producer.call("put-keep")
                        times = consumer.call("get-again", ref, iters * 4)
                        producer.call("free", ref)
                        extra.setdefault("existing_get_median_us", {})[str(size)] = statistics.median(times) * 1e6
                    pings = consumer.call("ping", 2000)
                    extra["metadata_roundtrip_median_us"] = statistics.median(pings) * 1e6
                    extra["metadata_roundtrip_p99_us"] = float(np.percentile(pings, 99)) * 1e6
            finally:
                producer.stop()
                consumer.stop()
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(20)
        except subprocess.TimeoutExpired:
            sidecar.kill()
    return {"card": card_name(), "backend": backend, "gpus": gpus, "iterations": iters,
            "sidecar_loop": loop, "client_spin_us": spin_us, "sidecar_spin_us": sidecar_spin_us,
            "results": [asdict(r) for r in results], **extra, "targets": targets(results, extra)}


def targets(results: list[Result], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the data-plane issue, measured, as a ratio against its baseline."""
    out: list[dict[str, Any]] = []
    by = {(r.pattern, r.method, r.size_bytes): r for r in results}
    existing = extra.get("existing_get_median_us", {})
    if existing:
        worst = max(existing.values())
        out.append({"goal": "same-GPU get of an existing object <= 100 us median at every size",
                    "measured_us": round(worst, 1), "met": worst <= 100})
    if "metadata_roundtrip_median_us" in extra:
        v = extra["metadata_roundtrip_median_us"]
        out.append({"goal": "metadata-only round trip <= 100 us median", "measured_us": round(v, 1), "met": v <= 100})
    big = max((r.size_bytes for r in results), default=0)
    tube = by.get(("gpu-gpu", "tube", big))
    if tube is not None:
        eff = big / (tube.get_us * 1e-6) / 1e9
        raw = by.get(("gpu-gpu", "raw-cupy", big))
        out.append({"goal": f"GPU-to-GPU at {big // MB} MB >= 300 GB/s effective (get)",
                    "measured_gbps": round(eff, 1), "raw_peer_gbps": round(raw.gbps, 1) if raw else None,
                    "met": eff >= 300})
        hc = by.get(("gpu-gpu", "host-centric", big))
        if hc is not None:
            ratio = hc.total_us / tube.total_us
            out.append({"goal": f"host-centric beaten >= 50x at {big // MB} MB GPU-to-GPU (put+get)",
                        "ratio": round(ratio, 1), "met": ratio >= 50})
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = [f"card: {report['card']}   backend: {report['backend']}",
             f"{'pattern':10s} {'size':>8s} {'method':13s} {'put us':>9s} {'get us':>9s} {'total us':>10s} "
             f"{'p99 us':>10s} {'GB/s':>8s}  path"]
    for r in report["results"]:
        lines.append(f"{r['pattern']:10s} {r['size_bytes'] / MB:6.0f}MB {r['method']:13s} {r['put_us']:9.1f} "
                     f"{r['get_us']:9.1f} {r['total_us']:10.1f} {r['total_p99_us']:10.1f} {r['gbps']:8.2f}  "
                     f"{r['path']}")
    for key in ("existing_get_median_us",):
        if key in report:
            lines.append("zero-copy get of an existing object (median us): " +
                         ", ".join(f"{int(k) / MB:.0f}MB={v:.1f}" for k, v in report[key].items()))
    if "metadata_roundtrip_median_us" in report:
        lines.append(f"metadata round trip: median {report['metadata_roundtrip_median_us']:.1f} us, "
                     f"p99 {report['metadata_roundtrip_p99_us']:.1f} us")
    for t in report.get("targets", []):
        value = {k: v for k, v in t.items() if k not in ("goal", "met")}
        lines.append(f"[{'MET ' if t['met'] else 'MISS'}] {t['goal']}: {value}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=list(DEFAULT_SIZES_MB))
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the sidecar's event loop")
    parser.add_argument("--spin-us", type=float, default=0.0,
                        help="function processes busy-poll this long for each reply")
    parser.add_argument("--sidecar-spin-us", type=float, default=0.0,
                        help="the sidecar busy-polls this long before sleeping")
    parser.add_argument("--patterns", nargs="+", choices=("same-gpu", "gpu-gpu", "host-gpu", "host-host"))
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def run(args: argparse.Namespace) -> int:
    if any(s <= 0 or s > 4096 for s in args.sizes_mb):
        raise SystemExit("faastube bench dataplane: --sizes-mb must be between 1 and 4096")
    if args.iterations < 1 or args.warmup < 0:
        raise SystemExit("faastube bench dataplane: --iterations must be >= 1 and --warmup >= 0")
    if not 0 <= args.spin_us <= 10_000:
        raise SystemExit("faastube bench dataplane: --spin-us must be in 0..10000")
    report = run_benchmark(sizes=[s * MB for s in args.sizes_mb], iters=args.iterations, warmup=args.warmup,
                           baselines=not args.no_baselines, patterns=args.patterns, loop=args.loop,
                           spin_us=args.spin_us, sidecar_spin_us=args.sidecar_spin_us)
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("dataplane" if report["gpus"] else "dataplane-host") + (f"-{args.tag}" if args.tag else "") + ".json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {args.out / name}")
    return 0
