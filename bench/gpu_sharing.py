"""Several replicas of a GPU function on one GPU: CUDA MPS or plain time-slicing?

FaaSTube lets up to ``sharingSlots`` function replicas share a GPU. Whether their
kernels should interleave by the driver's time-slicing (the default: one context at a
time on the GPU) or run concurrently under MPS (one shared context, kernels from
several processes side by side) is measured here, with the examples' kind of model:

- each replica is a process running a torchvision ResNet-50 (random weights, fp16,
  channels-last, inference mode) on GPU 0 in a closed loop for ``--seconds``;
- replicas 1, 2, 4 (and 8 with ``--replicas``) at batch sizes 1 and 8, under
  time-slicing and, where ``nvidia-cuda-mps-control`` exists and starts, under MPS;
- reported: images per second over all replicas, per-call p50/p99, and each ratio
  against one replica at the same batch size in the same mode (the floor: the GPU
  with one process). "What a user would do by hand" is one process with a bigger
  batch: the batch-8 single replica is in every table.

Run on the GPU machine: ``python bench/gpu_sharing.py --out DIR`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, torchvision
batch, seconds = int(sys.argv[1]), float(sys.argv[2])
torch.backends.cudnn.benchmark = True
model = torchvision.models.resnet50(weights=None).cuda().half().eval().to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(15):
        model(x)
    torch.cuda.synchronize()
    print("READY", flush=True)
    start_at = float(sys.stdin.readline())  # the parent's common start, once all are warm
    while time.time() < start_at:
        time.sleep(0.001)
    lat = []
    end = start_at + seconds
    while time.time() < end:
        t = time.perf_counter()
        model(x)
        torch.cuda.synchronize()
        lat.append(time.perf_counter() - t)
print(json.dumps({"latencies_s": lat}), flush=True)
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_config(replicas: int, batch: int, seconds: float, env: dict[str, str]) -> dict[str, float]:
    procs = []
    script = Path(tempfile.mkstemp(suffix=".py")[1])
    script.write_text(CHILD)
    for _ in range(replicas):
        procs.append(subprocess.Popen([sys.executable, str(script), str(batch), str(seconds)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    # Start together: every child loads and warms up, then all start at one time.
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"a replica did not start: {line!r} {p.stderr.read()[-500:] if p.stderr else ''}")
    start_at = time.time() + 0.5
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at}\n")
        p.stdin.flush()
    lat: list[float] = []
    errors = []
    for p in procs:
        out, err = p.communicate(timeout=120 + seconds)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not lines:
            errors.append(err[-500:])
            continue
        lat.extend(json.loads(lines[-1])["latencies_s"])
    script.unlink(missing_ok=True)
    if errors:
        raise RuntimeError("; ".join(errors))
    return {"replicas": replicas, "batch": batch, "calls": len(lat),
            "images_per_s": len(lat) * batch / seconds,
            "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * _percentile(lat, 0.99)}


class Mps:
    """An MPS control daemon private to this run (its own pipe and log directories)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ft-mps-"))
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(self.dir / "pipe"),
                        CUDA_MPS_LOG_DIRECTORY=str(self.dir / "log"))
        (self.dir / "pipe").mkdir()
        (self.dir / "log").mkdir()

    def start(self) -> str | None:
        control = shutil.which("nvidia-cuda-mps-control")
        if control is None:
            return "nvidia-cuda-mps-control is not installed"
        r = subprocess.run([control, "-d"], env=self.env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"nvidia-cuda-mps-control -d failed: {r.stderr.strip() or r.returncode}"
        return None

    def stop(self) -> None:
        control = shutil.which("nvidia-cuda-mps-control")
        if control:
            subprocess.run([control], input="quit\n", env=self.env, capture_output=True, text=True, timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name(0)
    replica_counts = [int(r) for r in args.replicas.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, object] = {"card": card, "seconds": args.seconds, "modes": {}}
    modes: dict[str, list[dict[str, float]]] = {}
    env = dict(os.environ)
    modes["time-slicing"] = [run_config(r, b, args.seconds, env) for b in batches for r in replica_counts]
    mps = Mps()
    why_not = mps.start()
    if why_not is None:
        try:
            modes["mps"] = [run_config(r, b, args.seconds, mps.env) for b in batches for r in replica_counts]
        finally:
            mps.stop()
    else:
        results["mps_unavailable"] = why_not
    for rows in modes.values():
        for row in rows:
            base = next(x for x in rows if x["replicas"] == 1 and x["batch"] == row["batch"])
            row["throughput_vs_one_replica"] = row["images_per_s"] / base["images_per_s"]
            row["p99_vs_one_replica"] = row["p99_ms"] / base["p99_ms"]
    results["modes"] = modes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-sharing.json").write_text(json.dumps(results, indent=2))
    print(f"== GPU sharing on {card} (ResNet-50 fp16, {args.seconds:g} s closed loop per config)")
    if "mps_unavailable" in results:
        print(f"MPS not measured: {results['mps_unavailable']}")
    print(f"{'mode':13} {'repl':>4} {'batch':>5} {'img/s':>8} {'x1 repl':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99 x1':>6}")
    for mode, rows in modes.items():
        for row in rows:
            print(f"{mode:13} {row['replicas']:>4} {row['batch']:>5} {row['images_per_s']:>8.0f} "
                  f"{row['throughput_vs_one_replica']:>7.2f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
                  f"{row['p99_vs_one_replica']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
