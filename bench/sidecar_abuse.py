"""Hostile neighbours under load: fuzzed frames, and thousands of abusive connections.

    python3 bench/sidecar_abuse.py [--frames 1000000] [--abusers 5000] [--out DIR]

Starts a sidecar (host backend) and measures issue 9's load targets:

- fuzz: `--frames` frames over pipelined connections (random bytes, truncations,
  bit flips of valid frames, deep and huge-number JSON, descriptors sent to the
  sidecar); counts sidecar crashes, well-framed requests that got no reply, and the
  sidecar's RSS growth;
- abuse: `--abusers` connections held open by attacker processes (idle, half a
  header, and ones that send requests but never read), while a well-behaved client
  times put+get; reports its p99 and the sidecar's RSS against its baseline.

Prints a short table last and writes sidecar-abuse.json.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from faastube import protocol


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def start_sidecar(path: str) -> subprocess.Popen[bytes]:
    log = open(path + ".log", "wb")      # a pipe nobody reads would stall the sidecar once full
    proc = subprocess.Popen([sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar",
                             "--socket", path, "--backend", "host", "--hello-timeout", "5s"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"sidecar did not start; see {path}.log")
        time.sleep(0.05)
    return proc


# --- fuzz -------------------------------------------------------------------------------------

def _valid_bodies() -> list[dict[str, Any]]:
    ref = "ft-" + "0" * 32
    # (No get of a ref nobody published: it waits the publish grace, 0.2 s, by design; tests cover it.)
    return [{"op": "ping"}, {"op": "stats"}, {"op": "stat", "ref": ref}, {"op": "get", "ref": ref, "location": "gpu:7"},
            {"op": "release", "refs": [ref]}, {"op": "arena", "location": "host", "nbytes": 4096},
            {"op": "free", "ref": ref}, {"op": "unmap", "slabs": [1, 2]}]


def _well_framed(rng: random.Random, rid: int) -> bytes:
    """A frame whose header is sound (so it must get exactly one reply), with a body of any kind."""
    choice = rng.random()
    if choice < 0.4:
        body = json.dumps(rng.choice(_valid_bodies())).encode()
    elif choice < 0.5:
        body = b"[" * rng.randint(1000, 50_000)
    elif choice < 0.6:
        body = b'{"op":"ping","x":' + b"9" * rng.randint(4000, 20_000) + b"}"
    elif choice < 0.7:
        body = json.dumps({"op": "get", "ref": rng.randbytes(8).hex(),
                           "location": rng.choice(["host", "gpu:x", 3])}).encode()
    elif choice < 0.85:                 # a valid body with bits flipped
        data = bytearray(json.dumps(rng.choice(_valid_bodies())).encode())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        body = bytes(data)
    else:
        body = rng.randbytes(rng.randint(0, 300))
    return protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, int(protocol.Kind.REQUEST), rid, len(body)) + body


def _unframeable(rng: random.Random, rid: int) -> bytes:
    """The end of a connection: a truncated frame, a broken header, or random bytes."""
    kind = rng.random()
    data = bytearray(protocol.encode(protocol.Kind.REQUEST, rid, rng.choice(_valid_bodies())))
    if kind < 0.4:
        return bytes(data[: rng.randint(1, len(data) - 1)])
    if kind < 0.7:
        data[rng.randrange(protocol.HEADER_SIZE)] ^= 1 << rng.randrange(8)
        return bytes(data)
    return rng.randbytes(rng.randint(1, 200))


def fuzz_worker(path: str, seed: int, frames: int, out: Any) -> None:
    rng = random.Random(seed)
    sent_ok = replied = connections = 0
    r, w = os.pipe()
    done = 0
    while done < frames:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError:
            time.sleep(0.01)
            continue
        connections += 1
        hello = protocol.encode(protocol.Kind.REQUEST, 1, {"op": "hello", "version": protocol.VERSION,
                                                            "workflow": "fuzz"})
        count = min(rng.randint(100, 1000), frames - done)
        batch = [_well_framed(rng, rid) for rid in range(2, 2 + count)]
        expected = 1 + count
        done += count
        if rng.random() < 0.5 and done < frames:
            batch.append(_unframeable(rng, 2 + count))
            done += 1
        # Read while sending, as any client must: one that doesn't read its replies is cut off.
        received: list[bytes] = []

        def read_all(sock: socket.socket = s, into: list[bytes] = received) -> None:
            try:
                while True:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    into.append(chunk)
            except OSError:
                return

        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            if rng.random() < 0.05:         # descriptors sent to the sidecar: discarded, never leaked
                s.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
            else:
                s.sendall(hello)
            s.sendall(b"".join(batch))
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(60)
        data = b"".join(received)
        # Count the replies: every well-framed request before the first unframeable byte gets one.
        n = 0
        pos = 0
        while pos + protocol.HEADER_SIZE <= len(data):
            header = protocol.decode_header(data[pos:], max_body_bytes=1 << 30)
            pos += protocol.HEADER_SIZE + header.body_bytes
            if 0 < header.request_id < expected + 1:
                n += 1
        sent_ok += expected
        replied += min(n, expected)
        s.close()
    os.close(r)
    os.close(w)
    out.send({"well_framed": sent_ok, "replied": replied, "connections": connections})


def run_fuzz(path: str, sidecar: subprocess.Popen[bytes], frames: int, workers: int) -> dict[str, Any]:
    before = rss(sidecar.pid)
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    t = time.monotonic()
    for i in range(workers if frames else 0):
        a, b = ctx.Pipe()
        p = ctx.Process(target=fuzz_worker, args=(path, 1000 + i, frames // workers, b))
        p.start()
        pipes.append(a)
        procs.append(p)
    results = [a.recv() for a in pipes] if frames else [{"well_framed": 0, "replied": 0, "connections": 0}]
    for p in procs:
        p.join()
    well = sum(r["well_framed"] for r in results)
    replied = sum(r["replied"] for r in results)
    return {"frames": frames, "seconds": round(time.monotonic() - t, 1), "crashed": sidecar.poll() is not None,
            "well_framed_requests": well, "dropped_without_reply": well - replied,
            "connections": sum(r["connections"] for r in results),
            "rss_growth_bytes": rss(sidecar.pid) - before if sidecar.poll() is None else None,
            "sidecar_fds": len(os.listdir(f"/proc/{sidecar.pid}/fd")) if sidecar.poll() is None else None}


# --- abusive connections -------------------------------------------------------------------------

def abuser(path: str, n: int, style: str, ready: Any, stop: Any) -> None:
    held = []
    hello = protocol.encode(protocol.Kind.REQUEST, 1, {"op": "hello", "version": protocol.VERSION,
                                                        "workflow": "abuse"})
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            if style == "half":
                s.sendall(hello[:7])
            elif style == "unread":
                s.sendall(hello)
                s.setblocking(False)
                try:
                    for _ in range(200):
                        s.send(protocol.encode(protocol.Kind.REQUEST, 2, {"op": "stats"}) * 50)
                except OSError:
                    pass
        except OSError:
            pass
        held.append(s)
    ready.send(len(held))
    stop.recv()
    for s in held:
        s.close()


def victim_p99(path: str, seconds: float) -> dict[str, float]:
    import faastube.client as ftc
    import numpy as np

    times = []
    with ftc.connect(path, workflow="victim") as p, ftc.connect(path, workflow="victim") as c:
        x = np.ones(1 << 18, np.float32)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            ref = p.put(x, consumers=1)
            v = c.get(ref, device="cpu")
            c.release(ref)
            del v
            times.append(time.perf_counter() - t)
    s = sorted(times)
    return {"passes": len(s), "median_ms": round(statistics.median(s) * 1e3, 3),
            "p99_ms": round(s[int(len(s) * 0.99) - 1] * 1e3, 3)}


def run_abuse(path: str, sidecar: subprocess.Popen[bytes], abusers: int) -> dict[str, Any]:
    quiet = victim_p99(path, 3.0)
    base_rss = rss(sidecar.pid)
    ctx = mp.get_context("fork")
    per_process = 50
    styles = ["idle", "half", "unread"]
    procs, controls, held = [], [], 0
    for i in range(max(1, abusers // per_process)):
        ready_a, ready_b = ctx.Pipe()
        stop_a, stop_b = ctx.Pipe()
        p = ctx.Process(target=abuser, args=(path, per_process, styles[i % 3], ready_b, stop_a))
        p.start()
        procs.append(p)
        controls.append((ready_a, stop_b))
    for ready, _ in controls:
        held += ready.recv()
    loaded = victim_p99(path, 3.0)            # within the 5 s hello deadline: the abusers are all still there
    peak_rss = rss(sidecar.pid)
    for _, stop in controls:
        stop.send(b"x")
    for p in procs:
        p.join()
    return {"abusive_connections": held, "victim_quiet": quiet, "victim_under_abuse": loaded,
            "sidecar_rss_baseline_bytes": base_rss, "sidecar_rss_under_abuse_bytes": peak_rss,
            "rss_growth_bytes": peak_rss - base_rss, "crashed": sidecar.poll() is not None}


def run_metrics_churn(objects: int, scrapes: int) -> dict[str, Any]:
    """Scrape /metrics while a client puts and frees `objects` objects over and over."""
    import threading
    import urllib.error
    import urllib.request

    import faastube.client as ftc
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="ftmetrics-")
    path = os.path.join(tmp, "s.sock")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(path + ".log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar",
                             "--socket", path, "--backend", "host", "--metrics-port", str(port),
                             "--metrics-host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        while not os.path.exists(path):
            time.sleep(0.05)
        stop = threading.Event()
        churned = [0]

        def churn() -> None:
            with ftc.connect(path, workflow="churn") as c:
                x = np.ones(16, np.float32)
                while not stop.is_set():
                    refs = [c.put(x) for _ in range(objects)]
                    for ref in refs:
                        c.free(ref)
                    churned[0] += objects

        worker = threading.Thread(target=churn)
        worker.start()
        codes: dict[int, int] = {}
        for _ in range(scrapes):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    codes[r.status] = codes.get(r.status, 0) + 1
            except urllib.error.HTTPError as e:
                codes[e.code] = codes.get(e.code, 0) + 1
        stop.set()
        worker.join(120)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"objects_per_round": objects, "objects_churned": churned[0], "scrapes": scrapes, "status_codes": codes,
            "ok_fraction": codes.get(200, 0) / scrapes}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--abusers", type=int, default=5000)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-fuzz", action="store_true")
    parser.add_argument("--churn-objects", type=int, default=20_000)
    parser.add_argument("--scrapes", type=int, default=500)
    args = parser.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="ftabuse-")
    path = os.path.join(tmp, "s.sock")
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    sidecar = start_sidecar(path)
    try:
        report["fuzz"] = run_fuzz(path, sidecar, 0 if args.skip_fuzz else args.frames, args.workers)
        report["abuse"] = run_abuse(path, sidecar, args.abusers)
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(60)
        except subprocess.TimeoutExpired:
            print("the sidecar did not stop within 60 s of SIGTERM: killed")
            sidecar.kill()
            sidecar.wait()
    report["metrics_churn"] = run_metrics_churn(args.churn_objects, args.scrapes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sidecar-abuse.json"), "w") as f:
        json.dump(report, f, indent=1)
    fz, ab = report["fuzz"], report["abuse"]
    print(f"fuzz: {fz['frames']:,} frames over {fz['connections']:,} connections in {fz['seconds']} s: "
          f"crashed {fz['crashed']}, {fz['dropped_without_reply']} of {fz['well_framed_requests']:,} well-framed "
          f"requests without a reply, RSS +{(fz['rss_growth_bytes'] or 0) / 2**20:.1f} MiB, fds {fz['sidecar_fds']}")
    print(f"abuse: {ab['abusive_connections']:,} abusive connections; victim put+get p99 "
          f"{ab['victim_quiet']['p99_ms']} ms quiet, {ab['victim_under_abuse']['p99_ms']} ms under abuse; "
          f"sidecar RSS +{ab['rss_growth_bytes'] / 2**20:.1f} MiB; crashed {ab['crashed']}")
    mc = report["metrics_churn"]
    print(f"metrics: {mc['scrapes']} scrapes while {mc['objects_churned']:,} objects were put and freed "
          f"({mc['objects_per_round']:,} at a time): {mc['ok_fraction']:.1%} answered 200 ({mc['status_codes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
