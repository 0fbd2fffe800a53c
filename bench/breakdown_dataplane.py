"""Where each microsecond of a put and a get goes, on one GPU, between two processes.

    python3 bench/breakdown_dataplane.py [--out DIR] [--sizes-kib 64 1024 16384] [--spin-us 0]

A sidecar (CUDA backend, metrics on), a producer that puts and hands the ref over a
pipe, a consumer that gets, synchronizes and releases. The client's own steps are
timed by wrapping its internal methods (each wrapper costs ~0.3 us, counted in the
step it wraps); the sidecar's service time per get comes from its request histogram.
Prints a table and writes breakdown-dataplane.json.
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
import urllib.request
from collections import defaultdict
from typing import Any

ITERS, WARMUP = 400, 50


def _timed(cls: Any, name: str, sink: dict[str, list[float]], label: str) -> None:
    original = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink[label].append(time.perf_counter() - t)

    setattr(cls, name, wrapper)


def producer(path: str, sizes: list[int], conn: Any, spin_us: float) -> None:
    import cupy as cp
    import faastube.client as ftc
    from faastube import arrays

    steps: dict[str, list[float]] = defaultdict(list)
    real_describe = arrays.describe

    def describe(obj: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_describe(obj)
        finally:
            steps["describe"].append(time.perf_counter() - t)

    ftc.arrays.describe = describe  # type: ignore[attr-defined]
    _timed(ftc.Client, "_place", steps, "place in arena")
    _timed(ftc.Client, "_copy_in", steps, "copy + fence (CUDA calls)")
    _timed(ftc.Client, "_publish", steps, "publish (encode + send)")
    c = ftc.connect(path, workflow="bd", function="producer", spin_us=spin_us)
    out: dict[int, dict[str, Any]] = {}
    for size in sizes:
        srcs = [cp.full(size // 4, i, cp.float32) for i in range(4)]
        cp.cuda.Device(0).synchronize()
        totals = []
        steps.clear()
        for i in range(WARMUP + ITERS):
            t = time.perf_counter()
            ref = c.put(srcs[i % 4], consumers=1)
            totals.append(time.perf_counter() - t)
            conn.send(ref)
            conn.recv()
        out[size] = {"put total": _stats(totals[WARMUP:]),
                     **{k: _stats(v[-ITERS:]) for k, v in steps.items()}}
    conn.send(None)
    conn.send(out)
    c.close()


def consumer(path: str, conn: Any, spin_us: float) -> None:
    import cupy as cp
    import faastube.client as ftc

    steps: dict[str, list[float]] = defaultdict(list)
    _timed(ftc.Client, "_send", steps, "send request (+ ended reads)")
    _timed(ftc.Client, "_next_frame", steps, "wait for the reply (sidecar + wake-ups)")
    _timed(ftc.Client, "_slab_for", steps, "slab lookup / first map")
    _timed(ftc.Client, "_wait_fence", steps, "order stream after fence")
    _timed(ftc.Client, "_view", steps, "build CuPy view")
    c = ftc.connect(path, workflow="bd", function="consumer", spin_us=spin_us)
    results = []
    totals: list[float] = []
    syncs: list[float] = []
    stream = cp.cuda.get_current_stream()
    while True:
        ref = conn.recv()
        if ref is None:
            break
        t = time.perf_counter()
        x = c.get(ref, device=0)
        t1 = time.perf_counter()
        stream.synchronize()
        t2 = time.perf_counter()
        totals.append(t1 - t)
        syncs.append(t2 - t1)
        c.release(ref)
        del x
        conn.send(b"k")
        if len(totals) == WARMUP + ITERS:
            results.append({"get total": _stats(totals[WARMUP:]), "synchronize after get": _stats(syncs[WARMUP:]),
                            **{k: _stats(v[-ITERS:]) for k, v in steps.items()}})
            totals, syncs = [], []
            steps.clear()
    pings = []
    for _ in range(2000):
        t = time.perf_counter()
        c.ping()
        pings.append(time.perf_counter() - t)
    conn.send({"gets": results, "ping": _stats(pings[200:])})
    c.close()


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median_us": round(statistics.median(s) * 1e6, 2), "p99_us": round(s[max(0, int(len(s) * 0.99) - 1)] * 1e6, 2),
            "n": len(s)}


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("faastube_request_seconds_sum") or line.startswith("faastube_request_seconds_count"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--sizes-kib", type=int, nargs="*", default=[64, 1024, 16384])
    parser.add_argument("--spin-us", type=float, default=0.0)
    parser.add_argument("--sidecar-spin-us", type=float, default=0.0)
    args = parser.parse_args()
    sizes = [k << 10 for k in args.sizes_kib]
    tmp = tempfile.mkdtemp(prefix="ftbd-")
    path = os.path.join(tmp, "s.sock")
    port = 19000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar", "--socket", path,
           "--backend", "cuda", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    if args.sidecar_spin_us:
        cmd += ["--spin-us", str(args.sidecar_spin_us), "--loop", "asyncio"]
    sidecar = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if sidecar.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("sidecar did not start")
            time.sleep(0.1)
        ctx = mp.get_context("spawn")
        a, b = ctx.Pipe()
        c1, c2 = ctx.Pipe()
        cons = ctx.Process(target=consumer, args=(path, c2, args.spin_us))
        cons.start()
        before = scrape(port)
        prod = ctx.Process(target=producer, args=(path, sizes, b, args.spin_us))
        prod.start()
        # relay refs from producer to consumer through this process? No: connect them directly.
        while True:
            ref = a.recv()
            c1.send(ref)
            if ref is None:
                break
            a.send(c1.recv())
        put_steps = a.recv()
        got = c1.recv()
        after = scrape(port)
        prod.join(30)
        cons.join(30)
    finally:
        sidecar.terminate()
        sidecar.wait(20)
    get_sum = after.get('faastube_request_seconds_sum{op="get"}', 0) - before.get('faastube_request_seconds_sum{op="get"}', 0)
    get_n = after.get('faastube_request_seconds_count{op="get"}', 0) - before.get('faastube_request_seconds_count{op="get"}', 0)
    report = {"note": "refs travel producer -> this driver -> consumer (two pipe hops); put and get are timed "
                      "in their own processes, so the relay is not in them",
              "sizes": {}, "ping": got["ping"],
              "sidecar_get_service_mean_us": round(get_sum / get_n * 1e6, 2) if get_n else None,
              "spin_us": args.spin_us, "sidecar_spin_us": args.sidecar_spin_us}
    for size, gets in zip(sizes, got["gets"]):
        report["sizes"][str(size)] = {"put": put_steps[size], "get": gets}
    try:
        import cupy

        report["card"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # noqa: BLE001
        pass
    os.makedirs(args.out, exist_ok=True)
    name = "breakdown-dataplane" + (f"-spin{int(args.spin_us)}" if args.spin_us else "") + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(report, f, indent=1)
    print(f"card: {report.get('card')}  ping median {got['ping']['median_us']} us  "
          f"sidecar get service mean {report['sidecar_get_service_mean_us']} us")
    for size, parts in report["sizes"].items():
        print(f"--- {int(size) >> 10} KiB ---")
        for side in ("put", "get"):
            for step, st in parts[side].items():
                print(f"  {side:3s} {step:42s} {st['median_us']:9.2f} us (p99 {st['p99_us']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
