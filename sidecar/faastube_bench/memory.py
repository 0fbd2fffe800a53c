"""``faastube bench memory``: the memory policies under the example workflows' traffic.

One sidecar per run, started with the policy under test; the four example workflows run
at once against it, each under its own Azure-shaped arrival trace (bursty or sporadic),
for ``--duration-s``. This module plays every function and the gateway: each function is
one or more worker threads with a faastube client of their own, taking its requests in
queue order, reading its inputs (a GPU function reads them on its GPU), computing
(``computeTime`` of the workflow, by sleeping, after touching the data), and writing its
output where it runs, with the workflow's fan-out as its consumers. Like a gateway, it
tells the sidecar where each output's reader stands in the queue (``client.hint``: the
request's arrival number). CPU functions get ``--cpu-replicas`` workers, GPU functions
one, so requests queue at the GPU stages and their inputs wait in GPU memory.

Two parts:

- **memory**: ``static`` (keep-alive pools, no cap), ``lru`` and ``elastic+eviction``
  on free GPUs: GPU memory the pools reserve vs the bytes live in them, sampled every
  100 ms; the time-averaged ratio; P99 latency.
- **pressure**: another process holds all but 1%, 5% and 10% of each GPU's memory;
  P99 and failed requests per policy and for host-centric passing (GPU outputs copied
  to host memory and back by the functions, as INFless-style platforms do), and the
  share of gets that waited for a restore.

Writes ``memory.json`` and ``memory.png`` (reserved vs live over time) under ``--out``,
prints the targets as ``[MET ]``/``[MISS]`` lines and a table last. ``--smoke`` runs it
all in seconds on the host backend with two simulated GPUs (``--simulated-gpus``),
scaled-down sizes and simulated memory pressure, for a CPU test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from faastube_bench import sidecars

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = ("traffic", "driving", "image", "video")
MEMORY_POLICIES = ("static", "lru", "elastic+eviction")
PRESSURE_MODES = ("host-centric", "static", "lru", "elastic+eviction")
HOST_CENTRIC = "host-centric"


@dataclasses.dataclass(frozen=True)
class Targets:
    """Issue 12's targets."""

    reserved_over_live: float = 1.3       # elastic, bursty, time-averaged
    p99_vs_static: float = 1.05           # elastic P99 within 5% of an unlimited static pool
    p99_gain: float = 0.30                # under pressure, >= 30% lower than LRU and host-centric
    restore_wait_share: float = 0.01      # <= 1% of gets wait for a restore


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str                 # cuda | host (simulated GPUs)
    duration_s: float
    pressure_duration_s: float
    scale: float                 # object sizes x scale
    compute_scale: float         # compute times x compute_scale
    load: float                  # mean offered rate / the bottleneck stage's capacity
    cpu_replicas: int
    levels: tuple[float, ...]    # free shares of each GPU under pressure
    memory_policies: tuple[str, ...]
    pressure_modes: tuple[str, ...]
    arrivals: tuple[str, ...]
    workflows: tuple[str, ...]
    simulated_gpu_bytes: int = 256 * MiB
    drain_s: float = 20.0        # after the last arrival, how long requests may still finish


@dataclasses.dataclass(frozen=True)
class Stage:
    workflow: str
    name: str
    gpu: bool
    compute_s: float
    replicas: int
    out_bytes: int               # 0: the exit, whose output goes to the caller
    inputs: tuple[str, ...]
    readers: tuple[str, ...]


def stages_of(workflow: Any, *, scale: float, compute_scale: float, cpu_replicas: int) -> list[Stage]:
    out = []
    for spec in workflow.functions:
        edges = workflow.out_edges(spec.name)
        size = max((e.size_bytes for e in edges), default=0)
        out.append(Stage(workflow.name, spec.name, spec.gpu, (spec.compute_time_s or 0.01) * compute_scale,
                         1 if spec.gpu else cpu_replicas, max(512, int(size * scale)) if size else 0,
                         workflow.predecessors(spec.name), workflow.successors(spec.name)))
    return out


# --- the memory pressure --------------------------------------------------------------------------

def hog(free_share: float) -> None:
    """Hold all but `free_share` of every visible GPU's memory until stdin closes (a subprocess)."""
    import cupy

    held = []
    for device in range(cupy.cuda.runtime.getDeviceCount()):
        with cupy.cuda.Device(device):
            free, total = cupy.cuda.runtime.memGetInfo()
            want = int(free - free_share * total)
            while want > 64 * MiB:
                chunk = min(want, GiB)
                try:
                    held.append(cupy.cuda.runtime.malloc(chunk))
                    want -= chunk
                except cupy.cuda.runtime.CUDARuntimeError:
                    break
            free_after, _ = cupy.cuda.runtime.memGetInfo()
            print(f"gpu {device}: {free_after / total:.3f} free", flush=True)
    print("ready", flush=True)
    sys.stdin.read()


class Pressure:
    """Another process holding all but `free_share` of each GPU (cuda), started once the sidecar
    and the functions hold their CUDA contexts; for the host backend the simulated GPUs' busy
    memory is set on the sidecar's command line instead."""

    def __init__(self, settings: Settings, free_share: float | None) -> None:
        self.info: dict[str, Any] = {"free_share": free_share}
        self._wanted = free_share is not None and settings.backend == "cuda"
        self._share = free_share
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if not self._wanted:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"from faastube_bench.memory import hog; hog({self._share})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines = []
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            lines.append(line.strip())
            if line.strip() == "ready":
                break
        self.info["hog"] = lines

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- one sidecar ---------------------------------------------------------------------------------

def sidecar_flags(mode: str, settings: Settings, *, free_share: float | None) -> list[str]:
    flags = ["--gpu-pool-max", "64Gi", "--gpu-quota", "64Gi", "--host-pool-max", "48Gi", "--host-quota", "24Gi",
             "--gpu-arena", "64Mi", "--gpu-slab", "64Mi", "--idle-release", "30s"]
    if settings.backend == "host":
        total = settings.simulated_gpu_bytes
        busy = 0 if free_share is None else int(total * (1 - free_share))
        flags = ["--gpu-pool-max", f"{total}", "--gpu-quota", f"{total}", "--host-pool-max", "1Gi",
                 "--host-quota", "1Gi", "--gpu-arena", "1Mi", "--gpu-slab", "1Mi", "--host-slab", "1Mi",
                 "--host-arena", "1Mi", "--idle-release", "5s", "--simulated-gpus", "2",
                 "--simulated-gpu-memory", f"{total}", "--simulated-gpu-busy", f"{busy}"]
    policy = "static" if mode == HOST_CENTRIC else mode
    flags += ["--memory-policy", policy]
    if policy != "static" and settings.backend == "host":
        flags += ["--pool-floor", "1Mi", "--evict-wait", "1s"]
    return flags


@contextlib.contextmanager
def run_sidecar(backend: str, flags: Sequence[str], workdir: Path) -> Iterator[Path]:
    sock = workdir / "run" / "faastube.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "sidecar.log", "ab")
    proc = sidecars.start(sock, flags, backend=backend, log=log)
    try:
        sidecars.wait_ready(proc, sock, log_path=workdir / "sidecar.log")
        yield sock
    finally:
        sidecars.stop(proc)
        log.close()


# --- the replay -----------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Request:
    workflow: str
    seq: int
    arrival_s: float
    ready: dict[str, int] = dataclasses.field(default_factory=dict)        # stage -> inputs arrived
    refs: dict[str, str] = dataclasses.field(default_factory=dict)         # stage -> its output's ref
    done_s: float | None = None
    error: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class Counters:
    gets: int = 0
    restore_gets: int = 0
    paths: dict[str, int] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def got(self, path: str) -> None:
        with self.lock:
            self.gets += 1
            self.paths[path] = self.paths.get(path, 0) + 1
            if path == "restore":
                self.restore_gets += 1


class Device:
    """How a stage touches memory: CuPy on a GPU, NumPy for CPU stages and simulated GPUs."""

    def __init__(self, backend: str, ordinal: int | None) -> None:
        self.ordinal = ordinal
        self.cuda = backend == "cuda" and ordinal is not None
        if self.cuda:
            import cupy

            self._cp = cupy
            cupy.cuda.Device(ordinal).use()

    @property
    def where(self) -> int | str:
        return "cpu" if self.ordinal is None else self.ordinal

    def fill(self, array: Any, value: int) -> None:
        if self.cuda:
            array.fill(value)          # a memset kernel: what a GPU function's output costs
        else:
            array[:4096] = value       # a CPU function's bytes: whatever it wrote (no GIL-bound memset)

    def touch(self, array: Any) -> None:
        """Read the input (a strided sum), as a kernel would."""
        flat = array.reshape(-1)
        step = max(1, flat.size // 4096)
        if self.cuda:
            float(flat[::step].sum())
        else:
            int(flat[::step].sum())

    def upload(self, host_view: Any) -> Any:
        """Host-centric: the function copies its input to its GPU itself (pageable)."""
        if self.cuda:
            return self._cp.asarray(host_view)
        return host_view.copy()

    def compute_output(self, nbytes: int, value: int) -> Any:
        if self.cuda:
            out = self._cp.empty((nbytes,), dtype=self._cp.uint8)
        else:
            import numpy as np

            out = np.empty((nbytes,), dtype=np.uint8)
        out.fill(value)
        return out

    def download(self, array: Any) -> Any:
        """Host-centric: the function copies its GPU output to host memory (pageable)."""
        return self._cp.asnumpy(array) if self.cuda else array


class Replay:
    """All workflows' traffic against one sidecar, in one mode, under one arrival shape."""

    def __init__(self, socket_path: Path, settings: Settings, *, mode: str, arrival: str, duration_s: float,
                 gpus: int, seed: int = 0, before_arrivals: Callable[[], None] = lambda: None) -> None:
        from faastube_spec.workflow import load_workflow

        self.socket_path = str(socket_path)
        self.settings = settings
        self.mode = mode
        self.arrival = arrival
        self.duration_s = duration_s
        self.gpus = max(1, gpus)
        self.seed = seed
        self.workflows = {}
        self.stages: dict[str, dict[str, Stage]] = {}
        for name in settings.workflows:
            path = REPO_EXAMPLES / name / "workflow.yaml"
            wf = load_workflow(path)
            self.workflows[name] = wf
            self.stages[name] = {s.name: s for s in stages_of(wf, scale=settings.scale,
                                                            compute_scale=settings.compute_scale,
                                                            cpu_replicas=settings.cpu_replicas)}
        self.queues: dict[tuple[str, str], queue.PriorityQueue[tuple[int, int, Request | None]]] = {
            (w, s): queue.PriorityQueue() for w, stages in self.stages.items() for s in stages}
        self.device_of: dict[tuple[str, str], int | None] = {}
        turn = 0
        for w, stages in self.stages.items():
            for s in stages.values():
                self.device_of[(w, s.name)] = (turn % self.gpus) if s.gpu else None
                turn += s.gpu
        self.requests: list[Request] = []
        self.counters = Counters()
        self.samples: list[tuple[float, int, int]] = []     # (t, reserved, live) on the GPUs
        self.sidecar_memory: dict[str, Any] = {}            # the sidecar's policy counters, last seen
        self._stop = threading.Event()
        self._t0 = 0.0
        self._tie = 0
        self._before_arrivals = before_arrivals
        self._ready = threading.Semaphore(0)

    def rate_of(self, workflow: str) -> float:
        bottleneck = max(s.compute_s / s.replicas for s in self.stages[workflow].values())
        return self.settings.load / max(bottleneck, 1e-3)

    # --- the functions --------------------------------------------------------------------------

    def _worker(self, workflow: str, stage: Stage) -> None:
        import faastube

        try:
            device = Device(self.settings.backend, self.device_of[(workflow, stage.name)])
            device.touch(device.compute_output(4096, 0))      # its CUDA context exists before the pressure
            client = faastube.connect(self.socket_path, workflow=workflow, function=stage.name, timeout_s=120)
        finally:
            self._ready.release()
        q = self.queues[(workflow, stage.name)]
        try:
            while True:
                _, _, request = q.get()
                if request is None:
                    return
                if request.error is None:
                    try:
                        self._execute(client, device, stage, request)
                    except Exception as e:  # noqa: BLE001 - a failed request is a measurement
                        self._fail(client, request, f"{stage.name}: {type(e).__name__}: {e}")
        finally:
            client.close()

    def _execute(self, client: Any, device: Device, stage: Stage, request: Request) -> None:
        started = time.monotonic()
        host_centric = self.mode == HOST_CENTRIC
        for source in stage.inputs:
            ref = request.refs[source]
            if host_centric and device.ordinal is not None:
                view = client.get(ref, device="cpu")
                self.counters.got(client.last_path)
                data = device.upload(view)
                client.release(ref)     # one read, counted toward the object's consumers
                del view
                device.touch(data)
                del data
            else:
                view = client.get(ref, device=device.where)
                self.counters.got(client.last_path)
                device.touch(view)
                client.release(ref)
                del view
        value = request.seq % 251
        if stage.out_bytes:
            consumers = len(stage.readers)
            if host_centric and device.ordinal is not None:
                out = device.download(device.compute_output(stage.out_bytes, value))
                ref = client.put(out, consumers=consumers, ttl=600)
            else:
                w = client.empty((stage.out_bytes,), "uint8", device=device.where)
                device.fill(w.array, value)
                ref = client.seal(w, consumers=consumers, ttl=600)
                del w
            # The gateway's part: where this output's reader stands in the workflow's queue.
            client.hint({ref: request.seq})
            request.refs[stage.name] = ref
        left = stage.compute_s - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)
        self._done(request, stage)

    def _done(self, request: Request, stage: Stage) -> None:
        if not stage.readers:
            request.done_s = time.monotonic()
            return
        for reader in stage.readers:
            with request.lock:
                request.ready[reader] = request.ready.get(reader, 0) + 1
                ready = request.ready[reader] == len(self.stages[request.workflow][reader].inputs)
            if ready:
                self._enqueue(request, reader)

    def _enqueue(self, request: Request, stage: str) -> None:
        with request.lock:
            self._tie += 1
            tie = self._tie
        self.queues[(request.workflow, stage)].put((request.seq, tie, request))

    def _fail(self, client: Any, request: Request, error: str) -> None:
        with request.lock:
            if request.error is None:
                request.error = error
                request.done_s = time.monotonic()
            refs = list(request.refs.values())
        logger.debug("request %s/%d failed: %s", request.workflow, request.seq, error)
        for ref in refs:
            with contextlib.suppress(Exception):
                client.free(ref)

    # --- the gateway and the sampler ------------------------------------------------------------

    def _sampler(self) -> None:
        import faastube

        client = faastube.connect(self.socket_path, workflow="bench", function="sampler")
        try:
            while not self._stop.is_set():
                stats = client.stats()
                self.sidecar_memory = stats.get("memory", {})
                gpu = [p for p in stats["pools"] if p["location"] != "host"]
                self.samples.append((time.monotonic() - self._t0, sum(p["reserved_bytes"] for p in gpu),
                                     sum(p["used_bytes"] for p in gpu)))
                self._stop.wait(0.1)
        finally:
            client.close()

    def run(self) -> dict[str, Any]:
        from faastube_runtime import arrivals

        threads = []
        for w, stages in self.stages.items():
            for stage in stages.values():
                for _ in range(stage.replicas):
                    t = threading.Thread(target=self._worker, args=(w, stage), daemon=True,
                                         name=f"{w}-{stage.name}")
                    t.start()
                    threads.append(t)
        schedule: list[tuple[float, str]] = []
        for i, w in enumerate(self.stages):
            rate = self.rate_of(w)
            count = max(1, int(rate * self.duration_s))
            schedule += [(t, w) for t in arrivals.offsets(self.arrival, count=count, rate_per_s=rate,
                                                          seed=self.seed + i) if t < self.duration_s]
        schedule.sort()
        sampler = threading.Thread(target=self._sampler, daemon=True, name="sampler")
        for _ in threads:
            self._ready.acquire(timeout=60)             # every function connected, its GPU context made
        self._before_arrivals()
        self._t0 = time.monotonic()
        sampler.start()
        seqs = {w: 0 for w in self.stages}
        for offset, w in schedule:
            delay = self._t0 + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            seqs[w] += 1
            request = Request(w, seqs[w], self._t0 + offset)
            self.requests.append(request)
            for stage in self.stages[w].values():
                if not stage.inputs:
                    self._enqueue(request, stage.name)
        deadline = time.monotonic() + self.settings.drain_s
        while time.monotonic() < deadline and any(r.done_s is None for r in self.requests):
            time.sleep(0.05)
        self._stop.set()
        for key, q in self.queues.items():
            for _ in range(self.stages[key[0]][key[1]].replicas):
                q.put((1 << 62, 0, None))
        for t in threads:
            t.join(timeout=10)
        sampler.join(timeout=5)
        return self.result()

    def result(self) -> dict[str, Any]:
        done = [r for r in self.requests if r.done_s is not None and r.error is None]
        failed = [r for r in self.requests if r.error is not None]
        unfinished = [r for r in self.requests if r.done_s is None]
        latencies = sorted(r.done_s - r.arrival_s for r in done if r.done_s is not None)
        errors: dict[str, int] = {}
        for r in failed:
            kind = (r.error or "").split(":")[1].strip() if ":" in (r.error or "") else r.error or "?"
            errors[kind] = errors.get(kind, 0) + 1
        reserved_avg = _time_average(self.samples, 1)
        live_avg = _time_average(self.samples, 2)
        return {
            "mode": self.mode, "arrival": self.arrival, "duration_s": self.duration_s,
            "requests": len(self.requests), "ok": len(done), "failed": len(failed), "unfinished": len(unfinished),
            "errors": errors, "first_errors": [r.error for r in failed[:3]],
            "p50_s": _quantile(latencies, 0.5), "p99_s": _quantile(latencies, 0.99),
            "gets": self.counters.gets, "restore_gets": self.counters.restore_gets, "paths": self.counters.paths,
            "reserved_avg_bytes": reserved_avg, "live_avg_bytes": live_avg,
            "reserved_over_live": reserved_avg / live_avg if live_avg else None,
            "samples": [list(s) for s in self.samples], "sidecar": self.sidecar_memory,
            "rates_per_s": {w: self.rate_of(w) for w in self.stages},
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return float(sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))])


def _time_average(samples: Sequence[tuple[float, int, int]], index: int) -> float:
    """Mean of a sampled series, each sample weighted by the time until the next one."""
    if len(samples) < 2:
        return float(samples[0][index]) if samples else 0.0
    total = sum((b[0] - a[0]) * a[index] for a, b in zip(samples, samples[1:]))
    span = samples[-1][0] - samples[0][0]
    return total / span if span > 0 else float(samples[0][index])


# --- the benchmark -------------------------------------------------------------------------------

def _gpus(backend: str) -> int:
    if backend == "host":
        return 2
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy or no driver: no GPU
        return 0


def one_run(settings: Settings, *, mode: str, arrival: str, duration_s: float, free_share: float | None,
            workdir: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    backend = settings.backend
    hog = Pressure(settings, free_share)
    try:
        with run_sidecar(backend, sidecar_flags(mode, settings, free_share=free_share), workdir) as sock:
            started = time.monotonic()
            result = Replay(sock, settings, mode=mode, arrival=arrival, duration_s=duration_s,
                            gpus=_gpus(backend), seed=seed, before_arrivals=hog.start).run()
            result["pressure"] = hog.info
            result["wall_s"] = time.monotonic() - started
    finally:
        hog.stop()
    p99 = result["p99_s"]
    ratio = result["reserved_over_live"]
    log(f"  {mode:<17} {arrival:<9} free={'-' if free_share is None else f'{free_share:.0%}':>4}: "
        f"{result['ok']}/{result['requests']} ok, {result['failed']} failed, "
        f"P99 {'-' if p99 is None else f'{p99 * 1e3:.0f} ms'}, reserved/live "
        f"{'-' if ratio is None else f'{ratio:.2f}'}, restore gets {result['restore_gets']}/{result['gets']}, "
        f"evictions {result['sidecar'].get('evictions', 0)}, restores {result['sidecar'].get('restores', {})}")
    return result


def run_all(settings: Settings, workdir: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    data: dict[str, Any] = {"benchmark": "memory", "settings": dataclasses.asdict(settings), "memory": {},
                            "pressure": {}, "machine": _machine(settings.backend)}
    started = time.monotonic()
    log(f"memory part: {', '.join(settings.memory_policies)} x {', '.join(settings.arrivals)}, "
        f"{settings.duration_s:g} s each")
    for arrival in settings.arrivals:
        for i, mode in enumerate(settings.memory_policies):
            data["memory"].setdefault(arrival, {})[mode] = one_run(
                settings, mode=mode, arrival=arrival, duration_s=settings.duration_s, free_share=None,
                workdir=workdir / f"m-{arrival}-{i}", log=log)
    arrival = "bursty" if "bursty" in settings.arrivals else settings.arrivals[0]
    log(f"pressure part ({arrival}): {', '.join(settings.pressure_modes)} with "
        f"{', '.join(f'{lv:.0%}' for lv in settings.levels)} of each GPU free, {settings.pressure_duration_s:g} s each")
    for level in settings.levels:
        for i, mode in enumerate(settings.pressure_modes):
            data["pressure"].setdefault(f"{level:g}", {})[mode] = one_run(
                settings, mode=mode, arrival=arrival, duration_s=settings.pressure_duration_s, free_share=level,
                workdir=workdir / f"p-{level:g}-{i}", log=log)
    data["elapsed_s"] = time.monotonic() - started
    data["targets"] = evaluate(data, Targets())
    return data


def evaluate(data: dict[str, Any], targets: Targets) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(goal: str, met: bool | None, measured: str) -> None:
        out.append({"goal": goal, "met": met, "measured": measured})

    bursty = data["memory"].get("bursty", {})
    el, st = bursty.get("elastic+eviction"), bursty.get("static")
    if el is not None:
        ratio = el["reserved_over_live"]
        static_ratio = st["reserved_over_live"] if st else None
        add(f"elastic pool reserves <= {targets.reserved_over_live}x live bytes (bursty, time-averaged)",
            None if ratio is None else ratio <= targets.reserved_over_live,
            f"elastic {_fmt(ratio)}x, static {_fmt(static_ratio)}x")
        if st is not None:
            p_el, p_st = el["p99_s"], st["p99_s"]
            met = None if p_el is None or p_st is None else (p_el <= targets.p99_vs_static * p_st and
                                                             el["failed"] == 0)
            add(f"elastic P99 within {targets.p99_vs_static - 1:.0%} of the unlimited static pool (bursty)", met,
                f"elastic {_ms(p_el)}, static {_ms(p_st)}, elastic failures {el['failed']}")
    for level, modes in data["pressure"].items():
        el = modes.get("elastic+eviction")
        if el is None:
            continue
        add(f"{float(level):.0%} free: no request fails for lack of pool memory", el["failed"] == 0,
            f"{el['failed']} failed of {el['requests']} ({el['errors'] or 'none'})")
        for other in ("lru", HOST_CENTRIC):
            o = modes.get(other)
            if o is None:
                continue
            p_el, p_o = el["p99_s"], o["p99_s"]
            if p_el is None or el["failed"]:
                met, text = False, f"elastic+eviction {_ms(p_el)} with {el['failed']} failed; {other} {_ms(p_o)}"
            elif p_o is None or o["failed"]:
                met, text = True, f"elastic+eviction {_ms(p_el)}; {other} {_ms(p_o)} with {o['failed']} failed"
            else:
                met = p_el <= (1 - targets.p99_gain) * p_o
                text = f"elastic+eviction {_ms(p_el)}, {other} {_ms(p_o)} ({1 - p_el / p_o:+.0%} lower)"
            add(f"{float(level):.0%} free: P99 >= {targets.p99_gain:.0%} lower than {other}", met, text)
        share = el["restore_gets"] / el["gets"] if el["gets"] else 0.0
        add(f"{float(level):.0%} free: <= {targets.restore_wait_share:.0%} of gets wait for a restore",
            share <= targets.restore_wait_share, f"{el['restore_gets']} of {el['gets']} ({share:.2%})")
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f} ms"


def table(data: dict[str, Any]) -> str:
    rows = [f"{'part':<10}{'mode':<18}{'free':>5}{'ok/req':>10}{'fail':>6}{'P50 ms':>9}{'P99 ms':>9}"
            f"{'rsv/live':>9}{'restore':>9}"]

    def row(part: str, mode: str, free: str, r: dict[str, Any]) -> str:
        p50 = "-" if r["p50_s"] is None else f"{r['p50_s'] * 1e3:.0f}"
        p99 = "-" if r["p99_s"] is None else f"{r['p99_s'] * 1e3:.0f}"
        ratio = "-" if r["reserved_over_live"] is None else f"{r['reserved_over_live']:.2f}"
        share = f"{r['restore_gets'] / r['gets']:.1%}" if r["gets"] else "-"
        return (f"{part:<10}{mode:<18}{free:>5}{str(r['ok']) + '/' + str(r['requests']):>10}{r['failed']:>6}"
                f"{p50:>9}{p99:>9}{ratio:>9}{share:>9}")

    for arrival, modes in data["memory"].items():
        for mode, r in modes.items():
            rows.append(row(arrival, mode, "-", r))
    for level, modes in data["pressure"].items():
        for mode, r in modes.items():
            rows.append(row("pressure", mode, f"{float(level):.0%}", r))
    rows.append("latency from arrival to the exit's end; rsv/live: GPU memory the pools reserve over the bytes "
                "live in them, time-averaged; restore: gets that waited for an evicted object")
    return "\n".join(rows)


def goal_lines(data: dict[str, Any]) -> list[str]:
    return [f"[{'N/A ' if t['met'] is None else 'MET ' if t['met'] else 'MISS'}] {t['goal']}: {t['measured']}"
            for t in data.get("targets", [])]


def plot(data: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no memory.png")
        return None
    parts = data["memory"]
    if not parts:
        return None
    fig, axes = plt.subplots(len(parts), 1, figsize=(10, 3.6 * len(parts)), squeeze=False)
    for ax, (arrival, modes) in zip(axes[:, 0], parts.items()):
        for mode, r in modes.items():
            samples = r["samples"]
            if not samples:
                continue
            t = [s[0] for s in samples]
            line, = ax.plot(t, [s[1] / MiB for s in samples], label=f"{mode}: reserved", linewidth=1.2)
            ax.plot(t, [s[2] / MiB for s in samples], linestyle=":", color=line.get_color(),
                    label=f"{mode}: live", linewidth=1.0)
        ax.set_title(f"GPU pool memory, {arrival} arrivals (four workflows at once)", fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine(backend: str) -> dict[str, Any]:
    info: dict[str, Any] = {"backend": backend, "cpus": os.cpu_count()}
    if backend == "cuda":
        try:
            import cupy

            rt = cupy.cuda.runtime
            info["gpus"] = [rt.getDeviceProperties(i)["name"].decode() for i in range(rt.getDeviceCount())]
            info["gpu_memory_bytes"] = [rt.getDeviceProperties(i)["totalGlobalMem"]
                                        for i in range(rt.getDeviceCount())]
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            info["gpus_error"] = str(e)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for memory.json/png")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds on the host backend: two simulated GPUs, sizes / 256, short runs")
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    parser.add_argument("--duration-s", type=float, help="memory part: seconds of arrivals per run (default 20)")
    parser.add_argument("--pressure-duration-s", type=float, help="pressure part: seconds per run (default 10)")
    parser.add_argument("--levels", help="free shares of each GPU under pressure (default 0.01,0.05,0.10)")
    parser.add_argument("--policies", help=f"memory part (default {','.join(MEMORY_POLICIES)})")
    parser.add_argument("--pressure-modes", help=f"pressure part (default {','.join(PRESSURE_MODES)})")
    parser.add_argument("--arrivals", help="comma-separated arrival shapes (default bursty,sporadic)")
    parser.add_argument("--workflows", default=",".join(EXAMPLES), help="example workflows run together")
    parser.add_argument("--scale", type=float, help="object sizes x this (default 1; smoke 1/256)")
    parser.add_argument("--load", type=float,
                        help="mean offered rate over the bottleneck stage's capacity (default 0.7; smoke 0.3)")
    parser.add_argument("--cpu-replicas", type=int, default=4, help="workers per CPU function (default 4)")
    parser.add_argument("--plot-only", action="store_true", help="redraw memory.png from memory.json")


def settings_from(args: argparse.Namespace) -> Settings:
    def floats(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
        return default if not text else tuple(float(x) for x in text.split(",") if x.strip())

    def names(text: str | None, default: tuple[str, ...], known: tuple[str, ...] | None = None) -> tuple[str, ...]:
        got = default if not text else tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [g for g in got if known is not None and g not in known]
        if bad:
            raise SystemExit(f"faastube bench memory: unknown {', '.join(bad)} (known: {', '.join(known or ())})")
        return got

    backend = args.backend
    if args.smoke:
        backend = "host"
    elif backend == "auto":
        backend = "cuda" if _gpus("cuda") else "host"
    smoke = args.smoke or backend == "host"
    settings = Settings(
        backend=backend,
        duration_s=args.duration_s or (2.0 if smoke else 20.0),
        pressure_duration_s=args.pressure_duration_s or (2.0 if smoke else 10.0),
        scale=args.scale or (1 / 256 if smoke else 1.0),
        compute_scale=1.0,
        load=args.load if args.load is not None else (0.3 if smoke else 0.7), cpu_replicas=args.cpu_replicas,
        levels=floats(args.levels, (0.02,) if args.smoke else (0.01, 0.05, 0.10)),
        memory_policies=names(args.policies, MEMORY_POLICIES, MEMORY_POLICIES + ("elastic",)),
        pressure_modes=names(args.pressure_modes, PRESSURE_MODES, PRESSURE_MODES + ("elastic",)),
        arrivals=names(args.arrivals, ("bursty",) if args.smoke else ("bursty", "sporadic")),
        workflows=names(args.workflows, EXAMPLES),
        simulated_gpu_bytes=1 * GiB,
        drain_s=10.0 if smoke else 15.0)
    if not all(0 < lv < 1 for lv in settings.levels):
        raise SystemExit("faastube bench memory: --levels are shares of each GPU in (0, 1)")
    return settings


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "memory.json"
    if args.plot_only:
        data = json.loads(json_path.read_text())
    else:
        settings = settings_from(args)
        with tempfile.TemporaryDirectory(prefix="ft-mem-", dir="/tmp") as tmp:
            data = run_all(settings, Path(tmp))
        json_path.write_text(json.dumps(data, indent=1))
    png = plot(data, args.out)
    print(f"wrote {json_path}" + (f", {png}" if png else ""))
    for line in goal_lines(data):
        print(line)
    print(f"== memory: {data['settings']['backend']} backend, {', '.join(data['settings']['workflows'])} at once")
    print(table(data))
    return 0
