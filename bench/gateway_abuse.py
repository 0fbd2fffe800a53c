"""Gateway memory under large and half-sent uploads (issue 9, "Hostile neighbours").

Starts ``faastube run`` (sidecar, one worker, the gateway; host backend) on a one-function
workflow that returns the size of what it got, and samples the resident memory of the
process that hosts the gateway (``/proc/PID/status``) every few milliseconds:

1. baseline: after two small warm-up requests;
2. ``--uploads`` concurrent uploads of ``--size-mib`` MiB each (``.npy``): peak while
   they run, and what is still held ``--settle-s`` seconds after the last answer;
3. with ``--half-sent``: as many uploads that send half their body and stall; peak while
   they are held, the status each one got, and memory after the gateway gave up on them.

Memory is split as the kernel reports it: ``RssAnon`` is the gateway's own (private)
memory; ``RssShmem`` is pages of the sidecar's shared pool that the gateway's client has
mapped and touched (the pool's memory, counted again in every process that maps it).
The target (within 10% of baseline after the uploads) is checked on both the total and
the private figure.

    .venv/bin/python bench/gateway_abuse.py                    # 6 x 300 MiB
    .venv/bin/python bench/gateway_abuse.py --size-mib 16      # quick (CI)
    .venv/bin/python bench/gateway_abuse.py --half-sent --json bench/results/gateway-abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20
FIELDS = ("VmRSS", "RssAnon", "RssShmem", "RssFile")

WORKFLOW_YAML = """\
apiVersion: faastube.io/v1alpha1
kind: Workflow
metadata: {name: abuse}
spec:
  slo: 10s
  functions:
    - {name: measure, handler: abusefunctions:measure}
  edges: []
"""

FUNCTIONS_PY = '''\
import numpy as np
from faastube.sdk import function


@function
def measure(x):
    return np.array([x.size], dtype=np.int64)
'''


def read_status(pid: int) -> dict[str, int]:
    """The memory fields of /proc/PID/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                out[name] = int(rest.split()[0]) * 1024
    return out


class Sampler:
    """Samples a process's memory on a thread; ``window()`` gives the peak over a span."""

    def __init__(self, pid: int, *, period_s: float = 0.005) -> None:
        self.pid = pid
        self.period_s = period_s
        self._peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            now = read_status(self.pid)
            with self._lock:
                for k, v in now.items():
                    self._peak[k] = max(self._peak.get(k, 0), v)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def window(self) -> Iterator[dict[str, int]]:
        """Peak of each field while the block runs (filled in when it ends)."""
        with self._lock:
            self._peak = read_status(self.pid)
        result: dict[str, int] = {}
        yield result
        with self._lock:
            result.update(self._peak)


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    url: str


def start_gateway(folder: Path, extra: list[str]) -> Gateway:
    (folder / "workflow.yaml").write_text(WORKFLOW_YAML)
    (folder / "abusefunctions.py").write_text(FUNCTIONS_PY)
    command = [sys.executable, "-m", "faastube.cli", "run", str(folder / "workflow.yaml"), "--requests", "0",
               "--port", "0", "--backend", "host", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(folder / "run.log", "wb"),
                               start_new_session=True)
    assert process.stdout is not None
    line = process.stdout.readline().decode()  # "serving workflow 'abuse' on http://...:PORT/invoke ..."
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"faastube run did not start: {line!r}\n{(folder / 'run.log').read_text()[-3000:]}")
    url = line.split(" on ", 1)[1].split("/invoke", 1)[0]
    return Gateway(process, url)


def npy_body(nbytes: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones(nbytes // 4, dtype=np.float32))
    return buffer.getvalue()


async def upload(url: str, body: bytes, *, timeout_s: float) -> tuple[int, str]:
    """POST ``body`` to ``url``/invoke on a connection of its own; the status and, on failure, the answer.

    Written on plain streams, 1 MiB at a time: Python 3.11's transports copy a large write into
    a buffer they then shift after every send, which would make the client the bottleneck.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(f"POST /invoke HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            view = memoryview(body)
            for start in range(0, len(body), MIB):
                writer.write(view[start:start + MIB])
                await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode(errors="replace")
            status = int(head.split(" ", 2)[1])
            payload = await reader.read()
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        return 0, f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return status, ("" if status == 200 else payload[:300].decode(errors="replace"))


async def half_sent(url: str, body: bytes, *, hold_s: float) -> str:
    """Send the head and half the body, then stall; what the gateway answered (or that it closed)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /invoke HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    writer.write(memoryview(body)[:len(body) // 2])
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readline(), hold_s)
        outcome = head.decode(errors="replace").strip() or "connection closed"
    except TimeoutError:
        outcome = f"still held after {hold_s:.0f}s"
    except ConnectionError as e:
        outcome = f"connection closed ({type(e).__name__})"
    writer.close()
    return outcome


def mib(status: dict[str, int]) -> dict[str, float]:
    return {k: round(v / MIB, 1) for k, v in status.items()}


def settle(pid: int, seconds: float) -> dict[str, int]:
    time.sleep(seconds)
    return read_status(pid)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gw-abuse-") as tmp:
        gw = start_gateway(Path(tmp), args.run_arg)
        pid = gw.process.pid
        try:
            small = npy_body(4096)
            for _ in range(2):
                status, error = await upload(gw.url, small, timeout_s=args.request_timeout_s)
                if status != 200:
                    raise SystemExit(f"warm-up request failed: HTTP {status}: {error}")
            baseline = settle(pid, args.settle_s)
            body = npy_body(args.size_mib * MIB)
            results: dict[str, Any] = {"baseline": mib(baseline)}
            with Sampler(pid) as sampler:
                with sampler.window() as peak:
                    started = time.monotonic()
                    answers = await asyncio.gather(*(upload(gw.url, body, timeout_s=args.request_timeout_s)
                                                     for _ in range(args.uploads)))
                    elapsed_s = time.monotonic() - started
                after = settle(pid, args.settle_s)
                results["uploads"] = {"count": args.uploads, "size_mib": args.size_mib,
                                      "statuses": [s for s, _ in answers],
                                      "errors": sorted({e for _, e in answers if e}),
                                      "seconds": round(elapsed_s, 2),
                                      "peak": mib(peak), "after": mib(after)}
                if args.half_sent:
                    with sampler.window() as held:
                        outcomes = await asyncio.gather(*(half_sent(gw.url, body, hold_s=args.hold_s)
                                                          for _ in range(args.uploads)))
                    after_half = settle(pid, args.settle_s)
                    results["half_sent"] = {"count": args.uploads, "outcomes": outcomes,
                                            "peak": mib(held), "after": mib(after_half)}
            return results
        finally:
            os.killpg(gw.process.pid, signal.SIGTERM)
            try:
                gw.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(gw.process.pid, signal.SIGKILL)
                gw.process.wait()


def verdict(baseline: dict[str, float], after: dict[str, float], field: str) -> str:
    limit = baseline[field] * 1.10
    return f"{'ok' if after[field] <= limit else 'OVER'} ({after[field]:.0f} vs limit {limit:.0f} MiB)"


def print_table(results: dict[str, Any]) -> None:
    base = results["baseline"]
    print(f"{'gateway process (MiB)':<34}" + "".join(f"{f:>10}" for f in FIELDS))
    rows = [("baseline", base)]
    up = results["uploads"]
    rows += [(f"peak, {up['count']} x {up['size_mib']} MiB uploads", up["peak"]),
             ("after the uploads", up["after"])]
    half = results.get("half_sent")
    if half:
        rows += [("peak, half-sent uploads held", half["peak"]), ("after the gateway let go", half["after"])]
    for label, values in rows:
        print(f"{label:<34}" + "".join(f"{values.get(f, 0):>10.1f}" for f in FIELDS))
    print(f"uploads: statuses {up['statuses']} in {up['seconds']} s" +
          (f"; errors {up['errors']}" if up["errors"] else ""))
    print(f"after the uploads, total (VmRSS): {verdict(base, up['after'], 'VmRSS')}; "
          f"private (RssAnon): {verdict(base, up['after'], 'RssAnon')}")
    if half:
        print(f"half-sent uploads: {half['outcomes']}")
        print(f"after the half-sent uploads, total: {verdict(base, half['after'], 'VmRSS')}; "
              f"private: {verdict(base, half['after'], 'RssAnon')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=6, help="concurrent uploads (default 6)")
    parser.add_argument("--size-mib", type=int, default=300, help="size of each upload in MiB (default 300)")
    parser.add_argument("--settle-s", type=float, default=2.0,
                        help="seconds to wait before reading 'baseline' and 'after' (default 2)")
    parser.add_argument("--half-sent", action="store_true",
                        help="also send uploads that stop half way and see what the gateway does")
    parser.add_argument("--hold-s", type=float, default=60.0,
                        help="how long a half-sent upload waits for an answer (default 60)")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--run-arg", action="append", default=[],
                        help="extra argument for 'faastube run' (repeat), e.g. --run-arg=--body-idle-timeout=2")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}
    print_table(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
