"""Where does a GPU get that needs a copy spend its time? (diagnostic, one GPU is enough)

Starts a CUDA sidecar (with and without inter-process copy events), puts 1 MB and
64 MB host arrays, and times each step of `get(device=0)`: the round trip, the
slab lookup, the stream wait on the copy event, and the device sync.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sidecar"))

import faastube.client as ftc
from faastube import protocol


def run(events: bool) -> None:
    import subprocess

    import cupy as cp

    d = tempfile.mkdtemp(prefix="diag-")
    path = os.path.join(d, "s.sock")
    cmd_extra = [] if events else ["--no-copy-events"]
    sc = subprocess.Popen([sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar", "--socket",
                           path, "--backend", "cuda", "--gpu-slab", "1Gi", *cmd_extra])
    while not os.path.exists(path):
        time.sleep(0.05)
    time.sleep(0.5)
    c = ftc.connect(path)
    cp.cuda.Device(0).use()
    for size in (1 << 20, 64 << 20):
        host = np.ones(size, np.uint8)
        steps: dict[str, list[float]] = {"rt": [], "slab": [], "wait": [], "sync": [], "local_get": []}
        for i in range(40):
            ref = c.put(host)
            t0 = time.perf_counter()
            reply, fds = c._call(protocol.Op.GET, {"ref": ref, "location": "gpu:0"})
            t1 = time.perf_counter()
            slab = c._slab_for(reply, fds)
            t2 = time.perf_counter()
            if "wait" in reply:
                c._order_after_copy(reply["wait"], slab)
            t3 = time.perf_counter()
            cp.cuda.Device(0).synchronize()
            t4 = time.perf_counter()
            c._call(protocol.Op.RELEASE, {"refs": [ref]})
            t5 = time.perf_counter()
            c.get(ref, device=0)
            t6 = time.perf_counter()
            c.free(ref)
            if i >= 5:
                for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5)):
                    steps[k].append(v * 1e6)
        print(f"events={events} size={size >> 20}MiB path={reply.get('path')} wait={'wait' in reply}: " +
              ", ".join(f"{k} {statistics.median(v):.0f}us" for k, v in steps.items()), flush=True)
    c.close()
    sc.terminate()
    sc.wait(20)


if __name__ == "__main__":
    run(True)
    run(False)
